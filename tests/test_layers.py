"""Imports only point down: chain < economy < swarm < peer < dllm (scripts/ and tests/ sit on top).

Every module of the five packages is parsed (ast, so lazy imports inside functions and `TYPE_CHECKING`
blocks count too) and any import of a package above the module's own is reported as file:line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("chain", "economy", "swarm", "peer", "dllm")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in `tree`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def upward_imports(root: Path) -> list[str]:
    """`path:line imports module` for every import that runs against the layering."""
    bad: list[str] = []
    for rank, package in enumerate(LAYERS):
        for path in sorted((root / package).rglob("*.py")):
            if "node_modules" in path.parts:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for line, module in imported_modules(tree):
                top = module.split(".")[0]
                if top in LAYERS and LAYERS.index(top) > rank:
                    bad.append(f"{path.relative_to(root)}:{line} imports {module}")
    return bad


def test_no_module_imports_a_package_above_its_own() -> None:
    bad = upward_imports(ROOT)
    assert not bad, "imports that run upward (chain < economy < swarm < peer < dllm):\n" + "\n".join(bad)


def test_relative_imports_are_not_used() -> None:
    """Relative imports would hide which package a module reaches into."""
    relative = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "node_modules" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level > 0:
                    relative.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not relative, relative


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        ("economy", "import peer.span\n", "economy/probe.py:1 imports peer.span"),
        ("swarm", "def f():\n    from dllm import cli\n", "swarm/probe.py:2 imports dllm"),
        (
            "chain",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import swarm.records\n",
            "chain/probe.py:3 imports swarm.records",
        ),
    ],
)
def test_checker_catches_lazy_and_type_only_imports(tmp_path: Path, package: str, source: str, expected: str) -> None:
    for name in LAYERS:
        (tmp_path / name).mkdir()
    (tmp_path / package / "probe.py").write_text(source)
    assert upward_imports(tmp_path) == [expected]

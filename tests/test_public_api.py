"""Each package's public API: `__all__` in its `__init__.py`, loaded lazily (PEP 562).

Every name in `__all__` imports and is the object its defining module holds; nothing private is exported;
`__all__`, the `_EXPORTS` table and the type-checking imports name the same things. Importing a package alone
loads none of the heavy dependencies: a process pays for torch, hivemind, transformers or substrate-interface
only through the submodules its path uses (the peer's start-up time depends on it).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chain", "economy", "swarm", "peer", "dllm")
HEAVY = ("torch", "hivemind", "transformers", "substrateinterface", "scalecodec", "scipy", "fastapi")


def _package(name: str) -> ModuleType:
    return importlib.import_module(name)


def _type_checking_imports(package: str) -> dict[str, str]:
    """name -> module of the `from M import N` statements under `if TYPE_CHECKING:` in the package's __init__."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom) and statement.module, ast.dump(statement)
                found.update({alias.name: statement.module for alias in statement.names if alias.asname is None})
    return found


def _imported_heavy(code: str) -> list[str]:
    """The HEAVY top-level modules in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    found: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_imports_and_is_public(package: str) -> None:
    module = _package(package)
    exported = module.__all__
    assert isinstance(exported, list) and exported, f"{package}.__all__ is missing or empty"
    assert len(set(exported)) == len(exported), f"{package}.__all__ names something twice"
    for name in exported:
        assert not name.startswith("_"), f"{package}.__all__ exports the private name {name}"
        value = getattr(module, name)
        assert value is not None, f"{package}.{name} resolves to None"
        own_name = str(getattr(value, "__name__", name))
        assert not own_name.startswith("_"), f"{package}.{name} is the private {own_name}"
    namespace: dict[str, object] = {}  # `from package import *` gives exactly those names
    exec(f"from {package} import *", namespace)
    assert {n for n in namespace if n != "__builtins__"} == set(exported)


@pytest.mark.parametrize("package", PACKAGES)
def test_the_lazy_table_matches_all_and_the_type_checking_imports(package: str) -> None:
    module = _package(package)
    table: dict[str, str] = module._EXPORTS
    defined_here = set(module.__all__) - set(table)  # functions the __init__ defines itself
    for name in defined_here:
        assert inspect.getmodule(getattr(module, name)) is module, f"{package}.{name} is neither lazy nor local"
    assert set(table) <= set(module.__all__), f"{package}._EXPORTS names what __all__ does not"
    assert _type_checking_imports(package) == table, f"{package}: TYPE_CHECKING imports differ from _EXPORTS"
    for name, source in table.items():
        assert source.split(".")[0] == package, f"{package}.{name} comes from another package ({source})"
        value = getattr(importlib.import_module(source), name)
        assert getattr(module, name) is value
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ == source, f"{package}.{name}: defined in {value.__module__}, not {source}"
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute"):
        module.__getattr__("no_such_name")


def test_importing_the_packages_loads_no_heavy_dependency() -> None:
    assert _imported_heavy("import chain, economy, swarm, peer, dllm") == []


@pytest.mark.parametrize(
    "code",
    [
        "import chain.errors, chain.units, chain.records",  # the error tree and units: everywhere, cheap
        "from chain import DLLMError, PLANCK_PER_TOKEN, Payment",
        "from economy import Quote, Bill, ProviderRate, Usage",  # prices a client shows cost no chain client
        "from dllm import default_model_path; default_model_path()",
    ],
)
def test_light_names_stay_light(code: str) -> None:
    assert _imported_heavy(code) == []

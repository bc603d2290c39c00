"""One exception tree: every project exception derives from DLLMError and is drawn in chain/errors.py.

Every module of the five packages is imported and each exception class it defines is checked, so a new
exception that skips the tree, or a drawing that misses a class or names one that no longer exists, fails
here. The wire table (swarm/wire_errors.py) is checked both ways: every kind maps to the class a client
raises and back, and every local class a serving process raises maps to its kind.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import typer

import chain.errors
from chain.errors import DLLMError

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("chain", "economy", "swarm", "peer", "dllm")
NOT_IMPORTABLE_HERE = {"economy.gossip_node"}  # py-libp2p runs in its own process: it cannot load beside hivemind


def module_names() -> list[str]:
    names = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "node_modules" in path.parts or path.name == "__main__.py":
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def project_exceptions() -> list[type[BaseException]]:
    found = []
    for name in module_names():
        if name in NOT_IMPORTABLE_HERE:
            continue
        module = importlib.import_module(name)
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name:
                found.append(value)
    return found


EXCEPTIONS = project_exceptions()
CLICK_EXCEPTIONS = [cls for cls in EXCEPTIONS if issubclass(cls, typer.TyperException)]
TREE = chain.errors.__doc__ or ""


def test_the_modules_not_imported_here_define_no_exception() -> None:
    for name in NOT_IMPORTABLE_HERE:
        tree = ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
        classes = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
        assert not [c for c in classes if c.endswith(("Error", "Exception"))], (name, classes)


def test_every_project_exception_derives_from_dllm_error() -> None:
    assert len(EXCEPTIONS) > 80  # the walk found the packages' exceptions, not an empty list
    outside = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in EXCEPTIONS
        if not issubclass(cls, DLLMError) and cls not in CLICK_EXCEPTIONS
    ]
    assert not outside, f"exceptions outside the DLLMError tree: {outside}"


def test_only_the_cli_errors_are_click_exceptions() -> None:
    """typer prints them and sets the exit code; they are named in the tree's docstring as outside it."""
    assert {cls.__name__ for cls in CLICK_EXCEPTIONS} == {"CommandError", "ConfigFileError"}
    for cls in CLICK_EXCEPTIONS:
        assert cls.__name__ in TREE


def test_the_tree_names_every_public_exception_class() -> None:
    missing = [
        f"{cls.__module__}.{cls.__name__}"
        for cls in EXCEPTIONS
        if not cls.__name__.startswith("_") and not re.search(rf"\b{cls.__name__}\b", TREE)
    ]
    assert not missing, f"add these to the tree in chain/errors.py: {missing}"


def test_the_tree_names_no_class_that_does_not_exist() -> None:
    known = {cls.__name__ for cls in EXCEPTIONS}
    drawn = set(re.findall(r"[├└]── (\w+)", TREE))
    assert drawn, "the tree drawing was not found"
    assert not drawn - known, f"the tree names classes that do not exist: {sorted(drawn - known)}"


def test_the_tree_draws_each_class_under_its_real_base() -> None:
    """Each drawn line's parent is the nearest drawn ancestor of the class (indentation = depth)."""
    by_name = {cls.__name__: cls for cls in EXCEPTIONS}
    stack: list[tuple[int, str]] = []
    for line in TREE.splitlines():
        match = re.match(r"^(\s*)((?:[│ ]   )*)[├└]── (\w+)", line)
        if match is None:
            root = re.match(r"^\s*(DLLMError)\s*$", line)
            if root:
                stack = [(-1, "DLLMError")]
            continue
        depth, name = len(match.group(2)) // 4, match.group(3)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = by_name[stack[-1][1]]
        assert issubclass(by_name[name], parent), f"{name} is drawn under {parent.__name__} but does not derive from it"
        stack.append((depth, name))


@pytest.fixture(scope="module")
def wire():
    from swarm import protocol, wire_errors

    return protocol, wire_errors


def test_every_wire_kind_maps_to_a_class_and_back(wire) -> None:
    protocol, wire_errors = wire
    kinds = [row.kind for row in wire_errors.WIRE_ERRORS]
    assert len(kinds) == len(set(kinds)), "a kind appears twice in the table"
    for row in wire_errors.WIRE_ERRORS:
        for local in row.local:
            # a serving process that raises the row's class answers with the row's kind ...
            error = local.__new__(local)
            Exception.__init__(error, f"a {local.__name__}")
            assert wire_errors.kind_of(error) == row.kind, (local, row.kind)
            reply = wire_errors.reply_for(error, "test", __import__("logging").getLogger("test"))
            metadata = protocol.unpack_metadata(reply.metadata)
            # ... and the caller raises the row's client class with that kind and the peer's id
            with pytest.raises(row.remote) as info:
                wire_errors.raise_if_error(metadata, "peer-x")
            assert type(info.value) is row.remote and info.value.kind == row.kind
            assert info.value.peer_id == "peer-x" and local.__name__ in info.value.remote_message
        assert wire_errors.remote_class(row.kind) is row.remote


def test_an_unexpected_exception_is_internal_and_an_unknown_kind_is_kept(wire) -> None:
    protocol, wire_errors = wire
    assert wire_errors.kind_of(ZeroDivisionError("bug")) is None
    reply = wire_errors.reply_for(ZeroDivisionError("bug"), "test", __import__("logging").getLogger("test"))
    metadata = protocol.unpack_metadata(reply.metadata)
    assert metadata["error"]["kind"] == wire_errors.INTERNAL
    with pytest.raises(protocol.RemotePeerError) as info:
        wire_errors.raise_if_error({"error": {"kind": "from_a_newer_peer", "message": "m"}}, "peer-y")
    assert type(info.value) is protocol.RemotePeerError and info.value.kind == "from_a_newer_peer"


def test_client_classes_of_the_table_are_remote_peer_errors_with_distinct_kinds(wire) -> None:
    protocol, wire_errors = wire
    for row in wire_errors.WIRE_ERRORS:
        assert issubclass(row.remote, protocol.RemotePeerError)
        assert all(issubclass(local, DLLMError) for local in row.local)

"""Lazy public names for a package's `__init__`: `from swarm import DistributedModel` imports only what it names.

Each package lists its public names in `__all__` and the module defining each in an `_EXPORTS` table, then
takes its module-level `__getattr__` and `__dir__` from `lazy_exports`. Importing the package itself loads
nothing heavy (no torch, hivemind, substrate-interface): a peer process pays only for the modules its path
uses. Invariant: a name resolves to the object its defining module holds, and is cached in the package's
globals after the first look-up; a name outside the table raises AttributeError as a module would.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, whose globals are `namespace`."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__

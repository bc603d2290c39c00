"""Numeric ranges of configuration fields, declared once on the `*Config` dataclass field.

A field declares its range with `bounded(default, ge=..., le=...)`; the dataclass enforces it in `__post_init__`
with `check_bounds(self)`, and tests/dllm/test_config_sources.py checks every `dllm` command-line option's default
and `min`/`max` against the field it sets, so neither a default nor a range is written twice. `None` is always
allowed for an optional field (it means "not set"). This module sits in chain/, the lowest layer, because every
layer's configuration uses it; it imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_METADATA_KEY = "dllm.bounds"

__all__ = ["Bounds", "bounded", "bounds_of", "check_bounds", "field_default"]


@dataclass(frozen=True)
class Bounds:
    """A range like click's: `min`/`max` (None: unbounded), each open (exclusive) or closed."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return False
        return not (self.max is not None and (value >= self.max if self.max_open else value > self.max))

    def __str__(self) -> str:
        low = "(-inf" if self.min is None else f"{'(' if self.min_open else '['}{self.min:g}"
        high = "inf)" if self.max is None else f"{self.max:g}{')' if self.max_open else ']'}"
        return f"{low}, {high}"


def bounded(
    default: T,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> T:
    """A dataclass field with `default` whose value must be >= ge (or > gt) and <= le (or < lt)."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("give at most one lower bound (ge or gt) and one upper bound (le or lt)")
    bounds = Bounds(
        min=gt if gt is not None else ge,
        max=lt if lt is not None else le,
        min_open=gt is not None,
        max_open=lt is not None,
    )
    result: T = dataclasses.field(default=default, metadata={_METADATA_KEY: bounds})
    return result


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    for item in dataclasses.fields(cls):
        if item.name == name:
            return item
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def bounds_of(cls: type, name: str) -> Bounds | None:
    """The range declared on `cls`'s field `name` (None: no range)."""
    bounds = _field(cls, name).metadata.get(_METADATA_KEY)
    return bounds if isinstance(bounds, Bounds) else None


def field_default(cls: type, name: str) -> Any:
    """The default value of `cls`'s field `name` (a factory is called); KeyError if it has none."""
    item = _field(cls, name)
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def check_bounds(config: Any) -> None:
    """Raise ValueError naming the first field of dataclass instance `config` outside its declared range."""
    for item in dataclasses.fields(config):
        bounds = item.metadata.get(_METADATA_KEY)
        value = getattr(config, item.name)
        if isinstance(bounds, Bounds) and value is not None and not bounds.contains(value):
            raise ValueError(f"{item.name} must be in {bounds}, got {value!r}")

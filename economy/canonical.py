"""Canonical byte encoding of signed economy records (receipts, verdicts, price announcements).

A record is a msgpack array of its fields in a fixed order, the first being a type tag. Decoding
checks every field against a schema and then re-encodes: only the one canonical byte string of a
record is accepted, so its hash (the record id) names the content and nothing else. Any input,
however malformed, ends in `CanonicalFormatError`, never in another exception.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from chain.errors import EconomyError

MAX_U64 = 2**64 - 1
MAX_RECORD_BYTES = 64 * 1024


class CanonicalFormatError(EconomyError, ValueError):
    """Bytes are not the canonical encoding of the expected record."""


@dataclass(frozen=True)
class FieldSpec:
    """One field of a record schema: its name, kind and size limit."""

    name: str
    kind: str
    """One of: u64, bool, str, bytes, ss58, bytes_list."""
    max_len: int = 0
    exact_len: int | None = None

    def check(self, value: Any) -> Any:
        kind = self.kind
        if kind == "u64":
            if type(value) is not int or not 0 <= value <= MAX_U64:
                raise CanonicalFormatError(f"{self.name} must be an integer in [0, 2^64), got {value!r:.60}")
        elif kind == "bool":
            if type(value) is not bool:
                raise CanonicalFormatError(f"{self.name} must be a bool, got {type(value).__name__}")
        elif kind == "str":
            if type(value) is not str or len(value) > self.max_len:
                raise CanonicalFormatError(f"{self.name} must be a string of at most {self.max_len} characters")
        elif kind == "bytes":
            self._check_bytes(value)
        elif kind == "ss58":
            check_ss58(value, self.name)
        elif kind == "bytes_list":
            if type(value) is not list or len(value) > self.max_len:
                raise CanonicalFormatError(f"{self.name} must be a list of at most {self.max_len} digests")
            for item in value:
                if type(item) is not bytes or len(item) != self.exact_len:
                    raise CanonicalFormatError(f"{self.name} items must be {self.exact_len}-byte strings")
        else:  # a programming error in a schema, not bad input
            raise AssertionError(f"unknown field kind {kind}")
        return value

    def _check_bytes(self, value: Any) -> None:
        if type(value) is not bytes:
            raise CanonicalFormatError(f"{self.name} must be bytes, got {type(value).__name__}")
        if self.exact_len is not None and len(value) != self.exact_len:
            raise CanonicalFormatError(f"{self.name} must be exactly {self.exact_len} bytes, got {len(value)}")
        if self.exact_len is None and not 1 <= len(value) <= self.max_len:
            raise CanonicalFormatError(f"{self.name} must be 1..{self.max_len} bytes, got {len(value)}")


def check_ss58(value: Any, name: str = "address") -> str:
    """Returns `value` if it is a valid ss58 address of a 32-byte public key, else raises."""
    if type(value) is not str or not 40 <= len(value) <= 60:
        raise CanonicalFormatError(f"{name} must be an ss58 address string")
    from scalecodec.utils.ss58 import ss58_decode  # loaded by the first address: a free peer checks none

    try:
        public = ss58_decode(value)
    except Exception as e:  # scalecodec raises ValueError or lower-level errors on bad checksums
        raise CanonicalFormatError(f"{name} {value!r} is not a valid ss58 address: {e}") from None
    if len(public) != 64:
        raise CanonicalFormatError(f"{name} {value!r} does not hold a 32-byte public key")
    return value


def encode(tag: str, schema: tuple[FieldSpec, ...], values: tuple[Any, ...]) -> bytes:
    """Canonical bytes of a record (values in schema order). Raises CanonicalFormatError."""
    if len(values) != len(schema):
        raise CanonicalFormatError(f"{tag}: expected {len(schema)} fields, got {len(values)}")
    checked = [spec.check(v) for spec, v in zip(schema, values, strict=True)]
    packed: bytes = msgpack.packb([tag, *checked], use_bin_type=True)
    return packed


def decode(tag: str, schema: tuple[FieldSpec, ...], data: Any) -> tuple[Any, ...]:
    """Field values of the record `data` encodes; raises CanonicalFormatError on anything else."""
    if type(data) is not bytes:
        raise CanonicalFormatError(f"{tag}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_RECORD_BYTES:
        raise CanonicalFormatError(f"{tag}: {len(data)} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
    try:
        items = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=MAX_RECORD_BYTES,
            max_str_len=MAX_RECORD_BYTES,
            max_array_len=4096,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise CanonicalFormatError(f"{tag}: not valid msgpack ({type(e).__name__})") from None
    if type(items) is not list or len(items) != len(schema) + 1:
        raise CanonicalFormatError(f"{tag}: expected an array of {len(schema) + 1} items")
    if items[0] != tag:
        raise CanonicalFormatError(f"expected a {tag!r} record, got tag {items[0]!r:.40}")
    values = tuple(spec.check(v) for spec, v in zip(schema, items[1:], strict=True))
    if msgpack.packb(items, use_bin_type=True) != data:
        raise CanonicalFormatError(f"{tag}: not the canonical encoding of its fields")
    return values


def record_id(data: bytes) -> str:
    """Id of a record: 0x-prefixed blake2b-256 of its canonical bytes (the chain's hash)."""
    return "0x" + hashlib.blake2b(data, digest_size=32).hexdigest()


def digest(data: bytes) -> bytes:
    """blake2b-256 of `data` (evidence hashes)."""
    return hashlib.blake2b(data, digest_size=32).digest()

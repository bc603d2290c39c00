"""The protocol's on-chain records: versioned `System.remark_with_event` payloads.

Format: `dllm:v<version>:<kind>:<compact JSON>`. Each kind has its own current version
(`VERSIONS`), the one written; every version from 1 up to it is still read, so records already on
chain keep their meaning. `settle` is at v2: each receipt also carries the compute it paid for
(docs/chain.md, "Compute on chain"). Accounts are hex account ids, so records read the same
whatever SS58 prefix a chain uses. The runtime emits `System.Remarked {sender, hash}` with
hash = blake2_256(payload); the ledger only trusts a payload whose hash appears in such an event of
the same extrinsic, with the sender the record kind requires.

The lineage kinds (`data-batch`, `adapter-version`: docs/data.md, chain/lineage.py) are validated here, strictly,
both when written and when read: exact key sets, lowercase 32-byte hex, bounded lists and strings, finite
losses, a batch's root equal to the Merkle root of its hashes (chain/merkle.py) and a total body size cap.
A record that fails is a MalformedRemarkError: readers skip it with a log line and go on.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chain.errors import ChainError
from chain.merkle import merkle_root

STEM = b"dllm:v"
"""What every version's payload starts with."""
KINDS = (
    "register",
    "compute",
    "settle",
    "unbond-request",
    "unbond",
    "slash",
    "slash-open",
    "dispute",
    "data-batch",
    "adapter-version",
)
VERSIONS = {kind: 2 if kind == "settle" else 1 for kind in KINDS}
"""The version each kind is written at; versions 1..VERSIONS[kind] are read."""
_MAX_VERSION_DIGITS = 3

# Bounds of the lineage records (docs/data.md): a record past them is malformed, written or read.
MAX_BATCH_HASHES = 256
"""Content hashes one `data-batch` record lists."""
MAX_DATA_ROOTS = 256
"""Batch roots one `adapter-version` record names."""
MAX_REPLICAS = 64
"""Replica peer ids one `adapter-version` record names."""
MAX_CANARY_CATEGORIES = 16
"""Canary categories per `before` / `after` map."""
MAX_NAME_CHARS = 128
"""Characters of a model name, a replica's peer id or a canary category."""
MAX_SPAN_END = 1 << 16
"""The highest block index a span may end at."""
MAX_VERSION = 2**31 - 1
"""The highest adapter version a record may name (exact in every JSON reader)."""
MAX_LINEAGE_BODY_BYTES = 24_576
"""Bytes of a lineage record's JSON body (a full batch of 256 hashes takes about 17.5 KiB)."""


class MalformedRemarkError(ChainError, ValueError):
    """Bytes that start with the protocol stem but are not a valid record."""


@dataclass(frozen=True)
class Remark:
    kind: str
    body: dict[str, Any]
    version: int = 1


def encode_remark(kind: str, body: dict[str, Any]) -> bytes:
    """The payload of a `kind` record at the kind's current version."""
    if kind not in KINDS:
        raise ValueError(f"unknown remark kind {kind!r}")
    head = STEM + str(VERSIONS[kind]).encode() + b":" + kind.encode() + b":"
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    check_body(kind, body, len(text))
    return head + text


def decode_remark(payload: bytes) -> Remark:
    if not payload.startswith(STEM):
        raise MalformedRemarkError("not a dllm remark")
    digits, sep, rest = payload[len(STEM) :].partition(b":")
    if not sep or not digits.isdigit() or len(digits) > _MAX_VERSION_DIGITS or digits.startswith(b"0"):
        raise MalformedRemarkError(f"bad record version {digits[:8]!r}")
    version = int(digits)
    kind, sep, body = rest.partition(b":")
    name = kind.decode(errors="replace")
    if not sep or name not in KINDS:
        raise MalformedRemarkError(f"unknown record kind {kind[:32]!r}")
    if version > VERSIONS[name]:
        raise MalformedRemarkError(f"{name} records are read up to v{VERSIONS[name]}, not v{version}")
    try:
        parsed = json.loads(body.decode("utf-8"))  # strictly UTF-8, as the Node reader decodes it
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedRemarkError(f"record body is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise MalformedRemarkError("record body must be a JSON object")
    check_body(name, parsed, len(body))
    return Remark(name, parsed, version)


def check_body(kind: str, body: dict[str, Any], size: int) -> None:
    """Raises MalformedRemarkError when a lineage record's body (`size` bytes of JSON) breaks its format; the
    other kinds are checked where they are applied (chain/history.py)."""
    check = _BODY_CHECKS.get(kind)
    if check is None:
        return
    if size > MAX_LINEAGE_BODY_BYTES:
        raise MalformedRemarkError(f"{kind} record of {size} bytes (at most {MAX_LINEAGE_BODY_BYTES})")
    check(body)


_HEX32 = re.compile(r"[0-9a-f]{64}")
# C0 and C1 controls and DEL: names are printed by the lineage tools, so no terminal escapes get in.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _keys(body: dict[str, Any], expected: frozenset[str], kind: str) -> None:
    if body.keys() != expected:
        extra, missing = sorted(body.keys() - expected), sorted(expected - body.keys())
        raise MalformedRemarkError(f"{kind} record: unknown keys {extra}, missing keys {missing}")


def _hex32(value: object, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        raise MalformedRemarkError(f"{what} must be 32 bytes of lowercase hex")
    return bytes.fromhex(value)


def _whole(value: object, what: str, low: int, high: int) -> int:
    # An integral float (`2.0`) is the integer it names: JSON readers in other languages cannot tell them apart.
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        raise MalformedRemarkError(f"{what} must be an integer in {low}..{high}, got {value!r:.40}")
    return value


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or _CONTROL.search(value):
        raise MalformedRemarkError(f"{what} must be 1..{MAX_NAME_CHARS} printable characters")
    return value


def _span(value: object) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise MalformedRemarkError("span must be [start, end]")
    start = _whole(value[0], "span start", 0, MAX_SPAN_END - 1)
    end = _whole(value[1], "span end", start + 1, MAX_SPAN_END)
    return start, end


def _hex_list(value: object, what: str, low: int, high: int) -> list[bytes]:
    if not isinstance(value, list) or not low <= len(value) <= high:
        raise MalformedRemarkError(f"{what} must list {low}..{high} hashes")
    hashes = [_hex32(item, what) for item in value]
    if len(set(hashes)) != len(hashes):
        raise MalformedRemarkError(f"{what} lists a hash twice")
    return hashes


def _losses(value: object, what: str) -> None:
    if not isinstance(value, dict) or len(value) > MAX_CANARY_CATEGORIES:
        raise MalformedRemarkError(f"{what} must map at most {MAX_CANARY_CATEGORIES} categories to losses")
    for category, loss in value.items():
        _name(category, f"{what} category")
        if type(loss) not in (int, float) or not math.isfinite(loss):
            raise MalformedRemarkError(f"{what}[{category!r}] must be a finite number")


_DATA_BATCH_KEYS = frozenset({"model", "span", "root", "count", "hashes"})
_ADAPTER_VERSION_KEYS = frozenset(
    {"model", "span", "version", "parent", "sha256", "parent_sha256", "data_roots", "replicas", "canary"}
)


def _check_data_batch(body: dict[str, Any]) -> None:
    _keys(body, _DATA_BATCH_KEYS, "data-batch")
    _name(body["model"], "model")
    _span(body["span"])
    hashes = _hex_list(body["hashes"], "hashes", 1, MAX_BATCH_HASHES)
    if _whole(body["count"], "count", 1, MAX_BATCH_HASHES) != len(hashes):
        raise MalformedRemarkError("count differs from the number of hashes")
    if _hex32(body["root"], "root") != merkle_root(hashes):
        raise MalformedRemarkError("root is not the Merkle root of the hashes")


def _check_adapter_version(body: dict[str, Any]) -> None:
    _keys(body, _ADAPTER_VERSION_KEYS, "adapter-version")
    _name(body["model"], "model")
    _span(body["span"])
    version = _whole(body["version"], "version", 1, MAX_VERSION)
    _whole(body["parent"], "parent", 0, version - 1)
    _hex32(body["sha256"], "sha256")
    if body["parent_sha256"] is not None:
        _hex32(body["parent_sha256"], "parent_sha256")
    _hex_list(body["data_roots"], "data_roots", 0, MAX_DATA_ROOTS)
    replicas = body["replicas"]
    if not isinstance(replicas, list) or len(replicas) > MAX_REPLICAS:
        raise MalformedRemarkError(f"replicas must list at most {MAX_REPLICAS} peer ids")
    if len({_name(r, "replica") for r in replicas}) != len(replicas):
        raise MalformedRemarkError("replicas lists a peer twice")
    canary = body["canary"]
    if not isinstance(canary, dict) or canary.keys() != {"before", "after"}:
        raise MalformedRemarkError('canary must be {"before": {...}, "after": {...}}')
    _losses(canary["before"], "canary before")
    _losses(canary["after"], "canary after")


_BODY_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "data-batch": _check_data_batch,
    "adapter-version": _check_adapter_version,
}


def find_candidate_payloads(extrinsic: bytes) -> list[bytes]:
    """Every way to read a SCALE `Vec<u8>` starting with the stem out of raw extrinsic bytes.

    Decoding nested calls (batches, multisig, derivatives) needs the runtime's type registry and
    breaks across runtime versions; instead every occurrence of the stem is read with each
    possible compact length in front of it. False candidates are harmless: only a payload whose
    blake2_256 matches a Remarked event is ever trusted.
    """
    found = []
    start = extrinsic.find(STEM)
    while start != -1:
        for width in (1, 2, 4):
            if start - width < 0:
                continue
            raw = int.from_bytes(extrinsic[start - width : start], "little")
            mode = raw & 0b11
            if (width, mode) not in ((1, 0), (2, 1), (4, 2)):
                continue
            length = raw >> 2
            if start + length <= len(extrinsic):
                found.append(extrinsic[start : start + length])
        start = extrinsic.find(STEM, start + 1)
    return found

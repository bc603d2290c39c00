"""The protocol's on-chain records: versioned `System.remark_with_event` payloads.

Format: `dllm:v<version>:<kind>:<compact JSON>`. Each kind has its own current version
(`VERSIONS`), the one written; every version from 1 up to it is still read, so records already on
chain keep their meaning. `settle` is at v2: each receipt also carries the compute it paid for
(docs/chain.md, "Compute on chain"). Accounts are hex account ids, so records read the same
whatever SS58 prefix a chain uses. The runtime emits `System.Remarked {sender, hash}` with
hash = blake2_256(payload); the ledger only trusts a payload whose hash appears in such an event of
the same extrinsic, with the sender the record kind requires.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chain.errors import ChainError

STEM = b"dllm:v"
"""What every version's payload starts with."""
KINDS = ("register", "compute", "settle", "unbond-request", "unbond", "slash", "slash-open", "dispute")
VERSIONS = {kind: 2 if kind == "settle" else 1 for kind in KINDS}
"""The version each kind is written at; versions 1..VERSIONS[kind] are read."""
_MAX_VERSION_DIGITS = 3


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
    return head + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


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
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedRemarkError(f"record body is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise MalformedRemarkError("record body must be a JSON object")
    return Remark(name, parsed, version)


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

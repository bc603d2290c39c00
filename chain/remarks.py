"""The protocol's on-chain records: versioned `System.remark_with_event` payloads.

Format: `dllm:v1:<kind>:<compact JSON>`. Accounts are hex account ids, so records read the same
whatever SS58 prefix a chain uses. The runtime emits `System.Remarked {sender, hash}` with
hash = blake2_256(payload); the ledger only trusts a payload whose hash appears in such an event of
the same extrinsic, with the sender the record kind requires.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chain.errors import ChainError

PREFIX = b"dllm:v1:"
KINDS = ("register", "compute", "settle", "unbond-request", "unbond", "slash")


class MalformedRemarkError(ChainError, ValueError):
    """Bytes that start with the protocol prefix but are not a valid record."""


@dataclass(frozen=True)
class Remark:
    kind: str
    body: dict[str, Any]


def encode_remark(kind: str, body: dict[str, Any]) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown remark kind {kind!r}")
    return PREFIX + kind.encode() + b":" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode_remark(payload: bytes) -> Remark:
    if not payload.startswith(PREFIX):
        raise MalformedRemarkError("not a dllm:v1 remark")
    kind, sep, body = payload[len(PREFIX) :].partition(b":")
    if not sep or kind.decode(errors="replace") not in KINDS:
        raise MalformedRemarkError(f"unknown record kind {kind[:32]!r}")
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedRemarkError(f"record body is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise MalformedRemarkError("record body must be a JSON object")
    return Remark(kind.decode(), parsed)


def find_candidate_payloads(extrinsic: bytes) -> list[bytes]:
    """Every way to read a SCALE `Vec<u8>` starting with the prefix out of raw extrinsic bytes.

    Decoding nested calls (batches, multisig, derivatives) needs the runtime's type registry and
    breaks across runtime versions; instead every occurrence of the prefix is read with each
    possible compact length in front of it. False candidates are harmless: only a payload whose
    blake2_256 matches a Remarked event is ever trusted.
    """
    found = []
    start = extrinsic.find(PREFIX)
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
        start = extrinsic.find(PREFIX, start + 1)
    return found

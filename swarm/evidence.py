"""Fetching published evidence by hash from the verifiers announced in the DHT (`dllm.v1.evidence`).

Verifiers serve what their `EvidenceStore` holds: `{"evidence": sha256}` answers the canonical evidence
bytes, `{"sample": hash}` an encoded work sample. The serving verifier is not trusted: the fetcher
re-hashes every answer against the hash it asked for (`Evidence.decode_checked`, the sample's own
hash) and tries the next verifier on a mismatch, an error reply or a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from economy.evidence_store import Evidence, EvidenceNotFoundError, MalformedEvidenceError
from economy.work_sample import WorkSample
from swarm import protocol, wire_errors

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def verifier_peer_ids(dht: Any) -> list[str]:
    """Peer ids of the verifiers announced under `dllm/verifiers`, sorted."""
    found = await dht.get(protocol.VERIFIERS_KEY, latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    peers = set()
    for entry in found.value.values():
        value = getattr(entry, "value", None)
        if isinstance(value, dict) and isinstance(value.get("peer_id"), str):
            peers.add(value["peer_id"])
    return sorted(peers)


async def _ask(p2p: Any, peer_id: str, request: dict[str, bytes], timeout_s: float) -> bytes:
    message = runtime_pb2.ExpertRequest(metadata=msgpack.packb(request, use_bin_type=True))
    response = await asyncio.wait_for(
        p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), protocol.HANDLER_EVIDENCE, message, runtime_pb2.ExpertResponse
        ),
        timeout_s,
    )
    meta = msgpack.unpackb(response.metadata, raw=False) if response.metadata else {}
    wire_errors.raise_if_error(meta, peer_id)
    data = meta.get("data") if isinstance(meta, dict) else None
    if type(data) is not bytes:
        raise MalformedEvidenceError(f"verifier {peer_id} answered no evidence bytes")
    return data


async def _first_checked(
    dht: Any,
    p2p: Any,
    request: dict[str, bytes],
    check: Callable[[bytes], T],
    peers: list[str] | None,
    timeout_s: float,
) -> T:
    candidates = peers if peers is not None else await verifier_peer_ids(dht)
    problems: list[str] = []
    for peer_id in candidates:
        try:
            return check(await _ask(p2p, peer_id, request, timeout_s))
        except Exception as e:  # an untrusted or unreachable server: try the next one
            problems.append(f"{peer_id}: {type(e).__name__}: {e}")
    what = next(iter(request))
    raise EvidenceNotFoundError(
        f"no verifier served the {what} {next(iter(request.values())).hex()} "
        f"({'; '.join(problems) or 'no verifier announced'})"
    )


async def fetch_evidence(
    dht: Any, p2p: Any, digest: bytes, peers: list[str] | None = None, timeout_s: float = 30.0
) -> Evidence:
    """The evidence whose SHA-256 is `digest`, from the first verifier that serves it intact."""
    return await _first_checked(
        dht, p2p, {"evidence": digest}, lambda data: Evidence.decode_checked(data, digest), peers, timeout_s
    )


async def fetch_sample(
    dht: Any, p2p: Any, digest: bytes, peers: list[str] | None = None, timeout_s: float = 30.0
) -> bytes:
    """The encoded work sample whose hash (the one verdicts cite) is `digest`."""

    def check(data: bytes) -> bytes:
        if WorkSample.decode(data).evidence_hash != digest:
            raise MalformedEvidenceError(f"the sample served does not hash to {digest.hex()}")
        return data

    return await _first_checked(dht, p2p, {"sample": digest}, check, peers, timeout_s)

"""Handing a learning peer's adapters to verifiers: `dllm.v1.adapters`, by digest.

A receipt for adapted work names its adapters by content (`adapter_digest`). The serving peer keeps
each version a receipt named in its `AdapterArchive` for ADAPTER_RETENTION_S and answers a request
`{"digest": 32 bytes}` with the bundle, streamed in chunks (swarm/chunks.py) since a large span's
adapters outgrow one 4 MiB message. The fetching side trusts nothing it receives: the bundle must
hash to the digest it asked for (`AdapterDigestMismatchError` otherwise), so any replica of the span
that holds the same version is as good a source as the provider itself.
Threats: a peer that answers garbage or other adapters is caught by the digest; one that never
answers is bounded by `timeout_s` per source; the reply is capped at MAX_ADAPTER_BUNDLE_BYTES.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from scalecodec.utils.ss58 import ss58_decode

from economy.receipts import UsageReceipt
from peer.adapters import (
    MAX_ADAPTER_BUNDLE_BYTES,
    AdapterArchive,
    AdapterBundle,
    AdapterDigestMismatchError,
)
from swarm import chunks, protocol, wire_errors

logger = logging.getLogger(__name__)

BUNDLE_DTYPE = "uint8"


class AdapterServer:
    """Serves the archived adapter bundles of one peer."""

    def __init__(self, archive: AdapterArchive):
        self.archive = archive

    async def add_handlers(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(
            protocol.HANDLER_ADAPTERS, self.rpc_adapters, runtime_pb2.ExpertRequest, stream_output=True
        )

    async def rpc_adapters(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            metadata = protocol.unpack_metadata(request.metadata)
            digest = protocol.get_field(metadata, "digest", bytes)
            if len(digest) != 32:
                raise protocol.ProtocolError("digest must be 32 bytes (a receipt's adapter_digest)")
            data = await asyncio.to_thread(self.archive.get(digest).encode)
        except Exception as e:  # an RPC boundary: any failure becomes an error reply (wire_errors picks its kind)
            yield wire_errors.reply_for(e, "adapters request", logger)
            return
        self.archive.handed_over += 1
        whole = runtime_pb2.Tensor(buffer=data, dtype=BUNDLE_DTYPE, size=[len(data)])
        first = True
        for part in chunks.split(whole):
            meta = protocol.pack_metadata({"digest": digest, "bytes": len(data)}) if first else b""
            yield runtime_pb2.ExpertResponse(tensors=[part], metadata=meta)
            first = False


async def fetch_bundle(p2p: P2P, peer_id: str, digest: bytes, *, timeout_s: float) -> AdapterBundle:
    """The bundle `peer_id` answers for `digest`, NOT checked against it (the caller hashes it).

    Raises RemotePeerError subclasses for a refusal, TimeoutError, ProtocolError / AdapterStateError
    for a malformed reply.
    """

    async def run() -> AdapterBundle:
        request = runtime_pb2.ExpertRequest(metadata=protocol.pack_metadata({"digest": digest}))
        stream = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), protocol.HANDLER_ADAPTERS, request, runtime_pb2.ExpertResponse
        )
        metadata, tensors = await chunks.receive(stream, max_bytes=MAX_ADAPTER_BUNDLE_BYTES)
        wire_errors.raise_if_error(metadata, peer_id)
        if len(tensors) != 1 or tensors[0].dtype != BUNDLE_DTYPE:
            raise protocol.ProtocolError("an adapters reply must hold one byte buffer")
        return await asyncio.to_thread(AdapterBundle.decode, tensors[0].buffer)

    return await asyncio.wait_for(run(), timeout_s)


async def fetch_adapters(p2p: P2P, peer_id: str, digest: bytes, timeout_s: float) -> AdapterBundle:
    """The bundle `peer_id` holds under `digest`, checked against it (AdapterDigestMismatchError if not)."""
    bundle = await fetch_bundle(p2p, peer_id, digest, timeout_s=timeout_s)
    got = await asyncio.to_thread(lambda: bundle.digest)
    if got != digest:
        raise AdapterDigestMismatchError(
            f"peer {peer_id} handed over adapters with digest {got.hex()[:16]}..., not {digest.hex()[:16]}..."
        )
    return bundle


async def fetch_for_receipt(
    dht: Any, p2p: P2P, receipt: UsageReceipt, *, attempts: int = 3, backoff_s: float = 2.0, timeout_s: float = 60.0
) -> AdapterBundle | None:
    """The receipt's adapters, digest-checked, from any peer of its span; None after `attempts` rounds
    (`backoff_s`, doubled, between them): what a council member or `dllm verify --recheck` re-runs with."""
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
        for peer_id in await span_sources(dht, receipt):
            try:
                return await fetch_adapters(p2p, peer_id, receipt.adapter_digest, timeout_s)
            except Exception as e:  # any source failing (refusal, timeout, other adapters) leaves the others to try
                logger.info("no adapters %s from %s: %s", receipt.adapter_digest.hex()[:16], peer_id, e)
    return None


async def span_sources(dht: Any, receipt: UsageReceipt) -> list[str]:
    """Peer ids announcing the receipt's exact span (only they can hold adapters of its names): provider first."""
    from swarm.records import fetch_model_records

    records = await fetch_model_records(dht, receipt.model)
    provider = _account_id(receipt.provider)
    same_span = [r for r in records if (r.start, r.end) == (receipt.start, receipt.end)]
    ordered = sorted(same_span, key=lambda r: _account_id(r.chain_account) != provider)
    return list(dict.fromkeys(r.peer_id for r in ordered))


def _account_id(address: str | None) -> str | None:
    """The public key an ss58 address names, whatever its format prefix (None if it is no address)."""
    try:
        return ss58_decode(address) if address else None
    except ValueError:
        return None

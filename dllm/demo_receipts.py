"""Co-signed usage receipts for the demo's queries, built from the route each query really took.

Peers do not meter sessions and co-sign receipts over RPC yet, so the demo operator, who started
every provider with a key it holds, issues each hop's receipt from what the client observed: the
route (which peer served which blocks), the prompt and generated token counts, and the provider's
advertised rate from its signed DHT record. Amounts come from economy.pricing, signatures from
economy.receipts, exactly as peer-issued receipts will; only the issuer differs.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

from economy.metering import chain_commitment, commitment_start
from economy.pricing import ProviderRate, Usage
from economy.receipts import SignedReceipt, receipt_for_segment
from swarm.records import ServerRecord


class UnknownHopError(LookupError):
    """A route names a peer whose record or key the demo does not have."""


@dataclass(frozen=True)
class ServedHop:
    """One leg of a finished query: `peer_id` ran blocks start..end-1."""

    peer_id: str
    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> "ServedHop":
        """From GenerationResult.route's "peer_id:start:end"."""
        peer_id, start, end = text.rsplit(":", 2)
        return cls(peer_id, int(start), int(end))


def hop_usage(prompt_tokens: int, completion_tokens: int, sampled: bool) -> Usage:
    """What every hop computed for one query: the prompt's prefill, then one step per generated token
    except the last (the client samples it from the head and stops without sending it back)."""
    generated = max(0, completion_tokens - 1)
    return Usage(prompt_tokens=prompt_tokens, generated_tokens=generated,
                 max_context=prompt_tokens + generated, sampled=sampled)


def receipts_for_query(
    result: Any,
    records: Mapping[str, ServerRecord],
    provider_keys: Mapping[str, Any],
    client_key: Any,
    network: str,
    sampled: bool = False,
) -> list[SignedReceipt]:
    """One receipt per hop of `result.route`, signed by the hop's provider and by the client."""
    session_id = os.urandom(16)
    usage = hop_usage(result.prompt_tokens, result.completion_tokens, sampled)
    observed = hashlib.blake2b(repr(result.token_ids).encode(), digest_size=32).digest()
    receipts = []
    for sequence, text in enumerate(result.route):
        hop = ServedHop.parse(text)
        record = records.get(hop.peer_id)
        if record is None or not record.chain_account:
            raise UnknownHopError(f"peer {hop.peer_id} served blocks {hop.start}:{hop.end} but announced no chain account")
        provider_key = provider_keys.get(record.chain_account)
        if provider_key is None:
            raise UnknownHopError(f"no key for provider account {record.chain_account}")
        before = commitment_start(session_id)
        receipt = receipt_for_segment(
            network=network,
            session_id=session_id,
            sequence=sequence,
            model=record.model,
            start=hop.start,
            end=hop.end,
            params_served=(hop.end - hop.start) * record.params_per_block,
            rate=ProviderRate.from_advertised(record.rate),
            usage=usage,
            provider=record.chain_account,
            client=client_key.ss58_address,
            commitment_before=before,
            commitment=chain_commitment(before, [observed]),
            issued_at=int(time.time()),
        )
        receipts.append(SignedReceipt.create(receipt, provider_key, client_key))
    return receipts

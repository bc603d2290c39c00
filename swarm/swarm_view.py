"""A snapshot of the live swarm read from the DHT: models, peers and how well each block is covered.

The dashboard polls it; it only reads signed, unexpired records (swarm.records), so a peer that
stopped announcing drops out within its record TTL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from swarm.records import ServerRecord, fetch_model_records, fetch_models


@dataclass
class PeerView:
    """One peer's announcement for one model, as shown on the dashboard."""

    peer_id: str
    start: int
    end: int
    throughput: float
    cache_tokens_free: int
    rate: int
    chain_account: str | None
    adapter_version: int  # the live adapter version of the span (0 also for a frozen peer)
    learning: bool  # trains adapters: its adapter_version moves as versions go live
    addrs: list[str]
    expires_in_s: float

    @classmethod
    def from_record(cls, record: ServerRecord, now: float) -> PeerView:
        return cls(
            peer_id=record.peer_id,
            start=record.start,
            end=record.end,
            throughput=float(record.throughput),
            cache_tokens_free=record.cache_tokens_free,
            rate=record.rate,
            chain_account=record.chain_account,
            adapter_version=record.adapter_version,
            learning=record.learning,
            addrs=list(record.addrs),
            expires_in_s=round(max(0.0, record.expires_at - now), 1),
        )


@dataclass
class ModelView:
    """A model's peers and, per block, how many peers serve it (0 = a gap: no route exists)."""

    name: str
    num_blocks: int
    peers: list[PeerView] = field(default_factory=list)
    coverage: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.coverage) and min(self.coverage) > 0

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["complete"] = self.complete
        return body


def block_coverage(peers: list[PeerView], num_blocks: int) -> list[int]:
    """How many peers serve each block 0..num_blocks-1 (spans past the end are clipped)."""
    counts = [0] * num_blocks
    for peer in peers:
        for block in range(max(0, peer.start), min(num_blocks, peer.end)):
            counts[block] += 1
    return counts


async def read_swarm(dht: Any) -> list[ModelView]:
    """Every announced model with its peers (sorted by first block) and block coverage."""
    from hivemind.utils import get_dht_time

    models = await fetch_models(dht)
    views = []
    now = get_dht_time()
    for name, num_blocks in sorted(models.items()):
        records = await fetch_model_records(dht, name, num_blocks)
        peers = sorted((PeerView.from_record(r, now) for r in records), key=lambda p: (p.start, p.end, p.peer_id))
        views.append(ModelView(name, num_blocks, peers, block_coverage(peers, num_blocks)))
    return views

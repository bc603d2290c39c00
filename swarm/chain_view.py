"""What the chain says about the swarm's providers: stake, earnings, compute, settlements and slashes.

Read through chain.ledger.ComputeLedger, which is synchronous and must stay on one thread: every call
runs on this view's single worker thread. A chain that is down makes `read` report the error instead
of failing the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chain.lineage import LineageIndex, MergedVersion

logger = logging.getLogger(__name__)

RECENT_SETTLEMENTS = 12


@dataclass
class ProviderChainView:
    """One provider account's standing on chain."""

    account: str
    state: str
    stake: int
    earned: int
    tokens_x_params: int
    requests: int
    slashes: int
    slashed_amount: int
    open_slashes: int = 0  # slashes a council member opened, not executed or cancelled yet
    unbond_ready_at: int | None = None  # block from which the council may return an unbonding stake
    # Why a client (min_stake > 0) would not route to it (chain.records.ProviderStatus.routing_refusal); None: it may.
    refusal: str | None = None


@dataclass
class ChainSnapshot:
    url: str
    connected: bool
    error: str | None = None
    providers: dict[str, ProviderChainView] = field(default_factory=dict)
    settlements: list[dict[str, Any]] = field(default_factory=list)
    slashes: list[dict[str, Any]] = field(default_factory=list)
    # Per (model, span): the committed adapter versions (chain/lineage.py), for the lineage graph and canary plot.
    lineage: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def lineage_json(versions: Iterable[MergedVersion], batch_counts: dict[bytes, int]) -> list[dict[str, Any]]:
    """The dashboard's lineage view: one entry per (model, span), its versions oldest first (fork sides apart)."""
    spans: dict[tuple[str, tuple[int, int]], list[dict[str, Any]]] = {}
    for v in versions:
        first = v.commits[0]
        spans.setdefault((v.model, v.span), []).append(
            {
                "version": v.version,
                "parent": v.parent,
                "sha256": v.sha256.hex(),
                "parent_sha256": v.parent_sha256.hex() if v.parent_sha256 is not None else None,
                "data_roots": [{"root": r.hex(), "examples": batch_counts.get(r)} for r in v.data_roots],
                "replicas": list(v.replicas),
                "committers": list(v.committers),
                "block": v.first_block,
                "fork": v.fork,
                "canary_before": dict(first.canary_before),
                "canary_after": dict(first.canary_after),
            }
        )
    return [
        {"model": model, "span": list(span), "versions": sorted(group, key=lambda g: (g["version"], g["block"]))}
        for (model, span), group in sorted(spans.items())
    ]


class ChainView:
    """Reads provider standings from the chain at `url` (connects lazily, reconnects after errors)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-chain-view")
        self._ledger: Any = None
        self._lineage: LineageIndex | None = None  # kept across reads: each sync scans only new blocks

    async def read(self, accounts: Iterable[str]) -> ChainSnapshot:
        """The standing of `accounts` plus the chain's recent settlements and every slash."""
        wanted = sorted({a for a in accounts if a})
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._read_sync, wanted)
        except Exception as error:  # a chain hiccup shows on the page; the next refresh retries
            logger.warning("reading the chain at %s failed: %s", self.url, error)
            self._executor.submit(self._drop_ledger)
            return ChainSnapshot(self.url, connected=False, error=f"{type(error).__name__}: {error}")

    def close(self) -> None:
        self._executor.submit(self._drop_ledger)
        self._executor.shutdown(wait=True)

    def _drop_ledger(self) -> None:
        if self._ledger is not None:
            with contextlib.suppress(Exception):  # closing a broken websocket may fail too; it is discarded either way
                self._ledger.close()
            self._ledger = None
            self._lineage = None

    def _read_sync(self, accounts: list[str]) -> ChainSnapshot:
        from chain.account_derivation import account_id
        from chain.ledger import ComputeLedger

        if self._ledger is None:
            self._ledger = ComputeLedger(self.url)
        ledger = self._ledger
        history = ledger.settlement_history()
        earned: dict[str, int] = {}
        for settled in history:
            for provider, amount in settled.payouts:
                earned[provider] = earned.get(provider, 0) + amount
        # Accounts may arrive in any SS58 prefix (DHT records); the ledger reports the chain's own.
        canonical = {account: ledger.address(account_id(account)) for account in accounts}
        # Slashed providers may have left the swarm: include every provider the ledger has indexed.
        indexed = [ledger.address(raw) for raw in getattr(ledger.index, "providers", {})]
        snapshot = ChainSnapshot(self.url, connected=True)
        views: dict[str, ProviderChainView] = {}
        slashes = []
        for own in sorted(set(canonical.values()) | set(indexed)):
            status = ledger.provider_status(own)
            totals = ledger.compute_ledger(own)
            views[own] = ProviderChainView(
                account=own,
                state=status.state.value,
                stake=status.stake,
                earned=earned.get(own, 0),
                tokens_x_params=totals.tokens_x_params,
                requests=totals.requests,
                slashes=len(status.slashes),
                slashed_amount=sum(s.amount for s in status.slashes),
                open_slashes=len(status.open_slashes),
                unbond_ready_at=status.unbond_ready_at,
                refusal=status.routing_refusal(1),
            )
            slashes += [
                {"provider": own, "amount": s.amount, "evidence": s.evidence_hash.hex(), "block": s.block_number}
                for s in status.slashes
            ]
        # Keyed both by the chain's address and by the form the DHT records use, for the page to match.
        snapshot.providers = {**views, **{account: views[own] for account, own in canonical.items()}}
        snapshot.slashes = sorted(slashes, key=lambda s: -s["block"])
        snapshot.settlements = [
            {
                "receipt": s.receipt_id.hex(),
                "client": s.client,
                "amount": s.amount,
                "payouts": [{"provider": p, "amount": a} for p, a in s.payouts],
                "block": s.block_number,
            }
            for s in reversed(history[-RECENT_SETTLEMENTS:])
        ]
        snapshot.lineage = self._read_lineage(ledger)
        return snapshot

    def _read_lineage(self, ledger: Any) -> list[dict[str, Any]]:
        from chain.lineage import LineageIndex

        if self._lineage is None:
            self._lineage = LineageIndex(ledger)
        self._lineage.sync()
        counts = {b.root: b.count for b in self._lineage.data_batches()}
        return lineage_json(self._lineage.merged(), counts)

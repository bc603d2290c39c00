"""Settling stored receipts on chain in batches, exactly once across crashes.

Protocol per batch: store.begin_batch (receipts -> settling, committed) -> ledger.settle(batch)
-> store.mark_settled. A crash before the chain includes the batch leaves receipts `settling` that
the chain reports unsettled: reconcile returns them to `unsettled`, the next run pays them. A crash
after inclusion but before mark_settled leaves receipts the chain reports settled: reconcile marks
them settled without paying again. The ledger must be atomic per batch and must itself refuse a
receipt id it has already paid (defence in depth; the chain side does this).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from economy.receipt_store import ReceiptStore, SettlementBatch

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SettlementLedger(Protocol):
    """What settlement needs from the chain client (chain.ComputeLedger or an adapter over it).

    Either method may be sync (run in a worker thread) or async.
    """

    def settle(self, batch: SettlementBatch) -> str | Awaitable[str]:
        """Pays every payment of `batch` in one atomic transaction; returns its hash."""
        ...

    def is_settled(self, receipt_id: str) -> bool | Awaitable[bool]:
        """True once the chain has paid `receipt_id`."""
        ...


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    # Blocking chain clients (substrate-interface) must not stall the event loop.
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(result):
        return await result
    return result


@dataclass(frozen=True)
class ReconcileReport:
    """What reconciliation found among receipts left `settling` by an earlier run."""

    confirmed: int
    """The chain had paid them: now `settled`."""
    released: int
    """The chain had not: back to `unsettled`, to be paid by the next batch."""


@dataclass(frozen=True)
class BatchResult:
    """One settled batch."""

    batch_id: str
    client: str
    tx_hash: str
    receipts: int
    total: int


class Settler:
    """Pays a provider's stored receipts through a ledger, in batches of at most `batch_size`."""

    def __init__(self, store: ReceiptStore, ledger: SettlementLedger, batch_size: int = 50):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.store = store
        self.ledger = ledger
        self.batch_size = batch_size
        self.failed_rounds = 0
        """Rounds of run() that failed (each logged at ERROR); the receipts they held stay unpaid until a later one."""

    async def reconcile(self) -> ReconcileReport:
        """Resolves receipts a crashed run left `settling` by asking the chain; call on startup."""
        confirmed: list[str] = []
        released: list[str] = []
        for rid in self.store.settling_receipt_ids():
            (confirmed if await _call(self.ledger.is_settled, rid) else released).append(rid)
        self.store.mark_settled(confirmed)
        self.store.release(released)
        if confirmed or released:
            logger.info("reconciled %d receipts paid before a crash, %d to pay again", len(confirmed), len(released))
        return ReconcileReport(len(confirmed), len(released))

    async def settle_batch(self, batch: SettlementBatch) -> BatchResult:
        """Submits one settling batch; on failure returns its unpaid receipts to `unsettled`."""
        try:
            tx_hash = await _call(self.ledger.settle, batch)
        except Exception:  # whatever failed, the transaction may have landed: ask the chain, then re-raise
            await self.reconcile()
            raise
        self.store.record_submission(batch.batch_id, tx_hash)
        self.store.mark_settled(batch.receipt_ids, tx_hash)
        logger.info(
            "settled %d receipts of %s for %d planck in %s", len(batch.receipts), batch.client, batch.total, tx_hash
        )
        return BatchResult(batch.batch_id, batch.client, tx_hash, len(batch.receipts), batch.total)

    async def settle_pending(self) -> list[BatchResult]:
        """Reconciles, then settles every unsettled receipt, one client's batch at a time."""
        await self.reconcile()
        results = []
        for client in self.store.unsettled_clients():
            while (batch := self.store.begin_batch(client, self.batch_size)) is not None:
                results.append(await self.settle_batch(batch))
        return results

    async def run(self, interval_s: float = 30.0, stop: asyncio.Event | None = None) -> None:
        """Settles pending receipts every `interval_s` seconds until `stop` is set.

        A failed round is logged and retried next round (the chain may be briefly unreachable).
        """
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.settle_pending()
            except Exception:  # a background loop: a failed round is logged, counted and retried, never ends it
                self.failed_rounds += 1
                logger.exception("settlement round failed; retrying in %.0f s", interval_s)
            with contextlib.suppress(TimeoutError):  # the interval passed: next round
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

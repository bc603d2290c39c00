"""A provider's settlement through its clients' pre-signed extrinsics (see presigned_settlement.py).

`PresignedSettlementLedger` is the `SettlementLedger` a provider's `Settler` uses: to pay a batch
it submits the pre-signed extrinsic stored with each receipt (skipping one already on chain, e.g.
submitted by the client or another provider of the same session). `settle_round` settles receipt
by receipt, so one receipt whose extrinsic cannot be included yet never holds up the others.
Crash safety is the Settler's: receipts are marked `settling` before submission and reconciled
against the chain's receipt markers after a crash or a failed submission.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from chain.errors import EconomyError
from chain.ledger import ComputeLedger
from economy.presigned_settlement import (
    SettlementNotReadyError,
    StaleSettlementError,
    account_nonce,
)
from economy.receipt_store import ReceiptStore, SettlementBatch
from economy.settlement import BatchResult, Settler

logger = logging.getLogger(__name__)

ALREADY_SETTLED = "already-settled"
"""Returned instead of a transaction hash when someone else's submission already paid the batch."""


class MissingSettlementError(EconomyError, LookupError):
    """A stored receipt came without a pre-signed settlement: the provider cannot get it paid alone."""


class PresignedSettlementLedger:
    """Pays batches with stored pre-signed extrinsics; `ledger` is used under `lock` only.

    The store is read on the event loop's thread (SQLite connections stay on their thread); chain
    calls run in worker threads, serialized by the lock because a ComputeLedger is not thread-safe.
    """

    def __init__(self, ledger: ComputeLedger, store: ReceiptStore, lock: threading.Lock | None = None):
        self.ledger = ledger
        self.store = store
        self.lock = lock or threading.Lock()

    async def settle(self, batch: SettlementBatch) -> str:
        """Submits the extrinsics paying `batch` in nonce order; returns the last one's hash."""
        offers: dict[bytes, int] = {}
        for rid in batch.receipt_ids:
            offer = self.store.settlement_for(rid)
            if offer is None:
                raise MissingSettlementError(
                    f"receipt {rid} has no pre-signed settlement; ask the client {batch.client} to pay it"
                )
            offers[offer[1]] = offer[0]
        ids = [bytes.fromhex(r.removeprefix("0x")) for r in batch.receipt_ids]
        return await asyncio.to_thread(self._submit, batch.client, ids, sorted(offers.items(), key=lambda kv: kv[1]))

    def _submit(self, client: str, receipt_ids: list[bytes], offers: list[tuple[bytes, int]]) -> str:
        with self.lock:
            tx_hash = ALREADY_SETTLED
            for extrinsic, nonce in offers:
                if len(self.ledger.settled_on_chain(client, receipt_ids)) == len(receipt_ids):
                    break
                next_nonce = account_nonce(self.ledger, client)
                if nonce > next_nonce:
                    raise SettlementNotReadyError(
                        f"settlement at nonce {nonce} of {client} waits for nonce {next_nonce}"
                    )
                if nonce < next_nonce:
                    raise StaleSettlementError(
                        f"nonce {nonce} of {client} was used by another transaction; these receipts stay unpaid"
                    )
                tx_hash = self.ledger.submit_signed(extrinsic).extrinsic_hash
            if len(self.ledger.settled_on_chain(client, receipt_ids)) != len(receipt_ids):
                raise StaleSettlementError(f"the settlements of {client} were included but do not mark every receipt")
            return tx_hash

    async def is_settled(self, receipt_id: str) -> bool:
        client = self.store.client_of(receipt_id)
        rid = bytes.fromhex(receipt_id.removeprefix("0x"))
        return await asyncio.to_thread(self._is_settled, client, rid)

    def _is_settled(self, client: str, rid: bytes) -> bool:
        with self.lock:
            return bool(self.ledger.settled_on_chain(client, [rid]))


async def settle_round(settler: Settler) -> list[BatchResult]:
    """Reconciles, then settles every unsettled receipt one at a time, client by client.

    A receipt that cannot be paid now (an earlier nonce is missing, the chain refused) stops that
    client's receipts for this round (later nonces cannot be included either) but not other clients'.
    """
    await settler.reconcile()
    results: list[BatchResult] = []
    for client in settler.store.unsettled_clients():
        while (batch := settler.store.begin_batch(client, 1)) is not None:
            try:
                results.append(await settler.settle_batch(batch))
            except SettlementNotReadyError as e:
                logger.info("not yet: %s", e)
                break
            except Exception as e:  # noqa: BLE001 - logged; the next round retries
                logger.warning("settling receipts of %s failed: %s: %s", client, type(e).__name__, e)
                break
    return results

"""A provider's settlement through its clients' pre-signed extrinsics (see presigned_settlement.py).

`PresignedSettlementLedger` is the `SettlementLedger` a provider's `Settler` uses: to pay a batch
it submits the pre-signed extrinsic stored with each receipt (skipping one already on chain, e.g.
submitted by the client or another provider of the same session). `settle_round` settles receipt
by receipt, so one receipt whose extrinsic cannot be included yet never holds up the others.
Crash safety is the Settler's: receipts are marked `settling` before submission and reconciled
against the chain after a crash or a failed submission.

Paid means paid on chain: a receipt counts as settled only when the successful extrinsic that created
its marker also transferred the provider at least the sum of all of its receipts marked there
(`ComputeLedger.paid_on_chain`). A marker alone proves nothing: the client can make one with a bare
`Multisig.approve_as_multi` at the nonce of the settlement it handed over; its receipts then stay
unsettled (and owed) for good. A stored settlement is dry-run before it is sent, so one that would
fail now (the client's funds are short) is not spent on a failure; it waits for a later round.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from chain.errors import EconomyError
from chain.ledger import ComputeLedger
from economy.presigned_settlement import (
    SettlementNotReadyError,
    SettlementOfferError,
    StaleSettlementError,
    account_nonce,
    dry_run,
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
        payee = _Payee(batch.client, batch.receipts[0].receipt.provider, self.store.amounts_from(batch.client))
        return await asyncio.to_thread(self._submit, payee, ids, sorted(offers.items(), key=lambda kv: kv[1]))

    def _submit(self, payee: _Payee, receipt_ids: list[bytes], offers: list[tuple[bytes, int]]) -> str:
        client = payee.client
        with self.lock:
            tx_hash = ALREADY_SETTLED
            for extrinsic, nonce in offers:
                if self._paid(payee, receipt_ids) == set(receipt_ids):
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
                try:  # a settlement that would fail is not sent: it would spend the nonce and pay nothing
                    dry_run(self.ledger, extrinsic)
                except SettlementOfferError as e:
                    raise SettlementNotReadyError(f"settlement at nonce {nonce} of {client} would fail now: {e}") from e
                tx_hash = self.ledger.submit_signed(extrinsic).extrinsic_hash
            if self._paid(payee, receipt_ids) != set(receipt_ids):
                raise StaleSettlementError(f"the settlements of {client} were included but do not pay every receipt")
            return tx_hash

    def _paid(self, payee: _Payee, receipt_ids: list[bytes]) -> set[bytes]:
        """Receipts the chain shows paid to the provider: marked by a successful extrinsic of the client that
        transferred the provider at least all of its receipts marked there (a marker alone is not payment)."""
        known = payee.amounts
        return self.ledger.paid_on_chain(
            payee.client, payee.provider, receipt_ids, lambda ids: {r: known[r] for r in ids if r in known}
        )

    async def is_settled(self, receipt_id: str) -> bool:
        """Whether the chain shows the receipt paid (not merely marked): see `_paid`."""
        receipt = self.store.get(receipt_id).signed.receipt
        payee = _Payee(receipt.client, receipt.provider, self.store.amounts_from(receipt.client))
        rid = bytes.fromhex(receipt_id.removeprefix("0x"))
        return await asyncio.to_thread(self._is_settled, payee, rid)

    def _is_settled(self, payee: _Payee, rid: bytes) -> bool:
        with self.lock:
            return bool(self._paid(payee, [rid]))


@dataclass(frozen=True)
class _Payee:
    """Whose payment a check looks for: the paying client, the provider, and the amount of each receipt
    of that client the provider holds (read from the store on its thread, before the chain calls)."""

    client: str
    provider: str
    amounts: dict[bytes, int]


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

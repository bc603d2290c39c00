"""Settling receipts on the real dev chain: a crash before or after submission still pays once."""

from __future__ import annotations

import time

import pytest

from economy.chain_settlement import ComputeLedgerSettlement, MissingClientKeyError
from economy.pricing import ProviderRate, Usage
from economy.receipt_store import ReceiptState, ReceiptStore
from economy.receipts import SignedReceipt, receipt_for_segment
from economy.settlement import Settler
from tests.chain.ledger_helpers import fresh_account

pytestmark = pytest.mark.timeout(300)


def receipts(provider, client, n: int, tag: bytes) -> list[SignedReceipt]:
    rate = ProviderRate(10**12, 4 * 10**12)  # large enough that amounts are well above dust
    out = []
    for i in range(n):
        usage = Usage(prompt_tokens=16, generated_tokens=8 + i, max_context=24 + i)
        r = receipt_for_segment(
            network="dllm-dev",
            session_id=tag,
            sequence=i,
            model="tiny",
            start=0,
            end=4,
            params_served=800_000,
            rate=rate,
            usage=usage,
            provider=provider.ss58_address,
            client=client.ss58_address,
            commitment_before=bytes(32),
            commitment=bytes([i]) * 32,
            issued_at=int(time.time()),
        )
        out.append(SignedReceipt.create(r, provider, client))
    return out


async def test_crash_before_and_after_submission_settles_exactly_once(ledger, tmp_path) -> None:
    client, provider = fresh_account(ledger), fresh_account(ledger)
    batch_a = receipts(provider, client, 3, b"session-a")
    batch_b = receipts(provider, client, 2, b"session-b")
    total = sum(s.receipt.amount for s in batch_a + batch_b)
    before = ledger.balance(provider.ss58_address)
    chain = ComputeLedgerSettlement(ledger, {client.ss58_address: client})

    def reopen() -> ReceiptStore:
        return ReceiptStore(tmp_path / "r.db", network="dllm-dev", provider=provider.ss58_address)

    store = reopen()
    for s in batch_a + batch_b:
        store.add(s)
    # crash 1: a batch is marked settling, the process dies before submitting it
    unsubmitted = store.begin_batch(client.ss58_address, limit=3)
    store.close()
    # crash 2: the next batch is paid on chain, the process dies before recording that
    store = reopen()
    paid = store.begin_batch(client.ss58_address, limit=3)
    assert len(unsubmitted.receipts) == 3 and len(paid.receipts) == 2
    chain.settle(paid)
    store.close()

    store = reopen()
    settler = Settler(store, chain, batch_size=10)
    report = await settler.reconcile()
    assert (report.confirmed, report.released) == (2, 3)
    results = await settler.settle_pending()
    assert sum(r.receipts for r in results) == 3  # only the 3 never paid
    assert store.counts()[ReceiptState.SETTLED] == 5
    assert ledger.balance(provider.ss58_address) - before == total
    assert await settler.settle_pending() == []
    assert all(chain.is_settled(s.receipt_id) for s in batch_a + batch_b)
    store.close()


def test_missing_client_key_is_a_clear_error(ledger, tmp_path, keys) -> None:
    store = ReceiptStore(tmp_path / "r.db")
    store.add(receipts(keys["bob"], keys["alice"], 1, b"nokey")[0])
    batch = store.begin_batch(keys["alice"].ss58_address)
    with pytest.raises(MissingClientKeyError, match="only the paying client"):
        ComputeLedgerSettlement(ledger, {}).settle(batch)
    store.close()

"""Subprocess for the crash tests: stores receipts and settles them into a file-backed ledger.

The ledger here is a plain SQLite file standing in for the chain's bookkeeping: each `settle` is one
atomic transaction that appends one payment row per receipt and deliberately does NOT deduplicate,
so the test can count how many times each receipt was paid. `--pause-at` makes the process announce
a point and wait there until the test SIGKILLs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time

from substrateinterface import Keypair

from economy.pricing import ProviderRate, Usage, provider_amount
from economy.receipt_store import ReceiptStore, SettlementBatch
from economy.receipts import SignedReceipt, UsageReceipt
from economy.settlement import Settler

PAUSE_POINTS = ("none", "after-store", "before-pay", "after-pay")


def announce_and_wait(point: str) -> None:
    print(f"PAUSED {point}", flush=True)
    while True:
        time.sleep(60)


class FileLedger:
    def __init__(self, path: str, pause_at: str, delay_s: float):
        self.path, self.pause_at, self.delay_s = path, pause_at, delay_s
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS payments (receipt_id TEXT, client TEXT, provider TEXT, amount INTEGER, tx TEXT)"
        )
        db.close()

    def settle(self, batch: SettlementBatch) -> str:
        if self.pause_at == "before-pay":
            announce_and_wait(self.pause_at)
        time.sleep(self.delay_s)
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO payments VALUES (?, ?, ?, ?, ?)",
                [(p.receipt_id, p.client, p.provider, p.amount, batch.batch_id) for p in batch.payments],
            )
            db.execute("COMMIT")
        finally:
            db.close()
        if self.pause_at == "after-pay":
            announce_and_wait(self.pause_at)
        return "0x" + batch.batch_id

    def is_settled(self, receipt_id: str) -> bool:
        db = sqlite3.connect(self.path)
        try:
            return db.execute("SELECT COUNT(*) FROM payments WHERE receipt_id = ?", (receipt_id,)).fetchone()[0] > 0
        finally:
            db.close()


def make_receipts(n: int) -> list[SignedReceipt]:
    provider = Keypair.create_from_uri("//Bob")
    clients = [Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Charlie")]
    rate = ProviderRate.from_advertised(10**9)
    out = []
    for i in range(n):
        client = clients[i % 2]
        usage = Usage(prompt_tokens=8, generated_tokens=1 + i % 5, max_context=16)
        r = UsageReceipt(
            "dllm-dev",
            f"session-{i // 3}".encode(),
            i % 3,
            "tiny",
            0,
            4,
            800_000,
            usage.prompt_tokens,
            usage.generated_tokens,
            0,
            usage.max_context,
            False,
            rate.prompt,
            rate.generated,
            provider_amount(rate, 800_000, usage),
            provider.ss58_address,
            client.ss58_address,
            bytes(32),
            bytes([i % 256]) * 32,
            1_700_000_000 + i,
        )
        out.append(SignedReceipt.create(r, provider, client))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("ledger")
    parser.add_argument("--receipts", type=int, default=0)
    parser.add_argument("--pause-at", choices=PAUSE_POINTS, default="none")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    store = ReceiptStore(args.store, network="dllm-dev")
    for signed in make_receipts(args.receipts):
        store.add(signed)
    if args.pause_at == "after-store":
        announce_and_wait(args.pause_at)
    print("SETTLING", flush=True)
    settler = Settler(store, FileLedger(args.ledger, args.pause_at, args.delay), batch_size=args.batch_size)
    report = await settler.reconcile()
    await settler.settle_pending()
    counts = {state.value: n for state, n in store.counts().items()}
    print("DONE " + json.dumps({"confirmed": report.confirmed, "released": report.released, **counts}), flush=True)
    store.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)

#!/usr/bin/env python
"""Settlement throughput on the dev chain: receipts/s for 1, 10 and 100 receipts per extrinsic,
and block build time. Starts its own dev chain (in memory) on a free 127.0.0.1 port.

Run: .venv/bin/python scripts/bench/chain.py [--extrinsics 5]
The anchor is batch size 1 measured in the same run; the target is >= 200 receipts/s with batching.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from substrateinterface import Keypair  # noqa: E402
from tqdm import tqdm  # noqa: E402

from chain.devchain.dev_accounts import dev_keypair  # noqa: E402
from chain.devchain.launcher import DevChain, DevChainConfig  # noqa: E402
from chain.ledger import ComputeLedger  # noqa: E402
from chain.records import Payment, ProviderShare  # noqa: E402
from chain.units import PLANCK_PER_TOKEN as UNIT  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def receipt_id(tag: str) -> bytes:
    return hashlib.blake2b(tag.encode(), digest_size=32).digest()


def measure(ledger: ComputeLedger, batch: int, extrinsics: int, providers: list[str]) -> dict:
    client = Keypair.create_from_uri(f"//bench-{uuid.uuid4().hex}", ss58_format=ledger.ss58_format)
    ledger.submitter.submit(
        dev_keypair("Ferdie", ledger.ss58_format),
        ledger.substrate.compose_call(
            "Balances", "transfer_keep_alive", {"dest": client.ss58_address, "value": 10_000 * UNIT}
        ),
    )
    durations, inclusion, fees = [], [], []
    for n in tqdm(range(extrinsics), desc=f"batch {batch:>3}", leave=False):
        payments = [
            Payment(
                receipt_id(f"{client.ss58_address}-{n}-{i}"),
                UNIT // 100,
                tuple(ProviderShare(p, 1 + j) for j, p in enumerate(providers)),
            )
            for i in range(batch)
        ]
        start = time.perf_counter()
        call, outflow = ledger.build_settlement(client, payments)
        ledger._require_funds(client, call, outflow)
        signed = ledger.submitter.sign(client, call)
        submit_at = time.perf_counter()
        result = ledger.submitter.submit_extrinsic(signed)
        end = time.perf_counter()
        durations.append(end - start)
        inclusion.append(end - submit_at)
        fees.append(result.fee)
    total = sum(durations)
    return {
        "batch": batch,
        "extrinsics": extrinsics,
        "receipts_per_s": batch * extrinsics / total,
        "latency_s": statistics.median(durations),
        "inclusion_s": statistics.median(inclusion),
        "fee_per_receipt": statistics.median(fees) / batch,
    }


async def block_build_time(chain: DevChain, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await chain.new_blocks(1)
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extrinsics", type=int, default=5, help="settlement extrinsics per batch size")
    args = parser.parse_args()
    if args.extrinsics < 1:
        parser.error("--extrinsics must be >= 1")
    console = Console(width=150)
    loop = asyncio.new_event_loop()
    chain = DevChain(DevChainConfig(port=free_port(), state_dir=None))
    loop.run_until_complete(chain.start())
    try:
        empty_block = loop.run_until_complete(block_build_time(chain, 5))
        with ComputeLedger(chain.url) as ledger:
            providers = [dev_keypair(n, ledger.ss58_format).ss58_address for n in ("Dave", "Eve")]
            rows = [measure(ledger, b, args.extrinsics, providers) for b in (1, 10, 100, 500)]
    finally:
        loop.run_until_complete(chain.stop())
        loop.close()
    anchor = rows[0]["receipts_per_s"]
    table = Table(title="Settlement on the dev chain (Rococo Asset Hub runtime, chopsticks, Instant mode)")
    for col in (
        "receipts/extrinsic",
        "extrinsics",
        "receipts/s",
        "x vs batch 1",
        "median latency s",
        "median inclusion s",
        "fee/receipt (planck)",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch"]),
            str(r["extrinsics"]),
            f"{r['receipts_per_s']:.1f}",
            f"{r['receipts_per_s'] / anchor:.1f}",
            f"{r['latency_s']:.3f}",
            f"{r['inclusion_s']:.3f}",
            f"{r['fee_per_receipt']:,.0f}",
        )
    console.print(table)
    console.print(
        f"empty block build (dev_newBlock): {empty_block:.3f} s; target >= 200 receipts/s with batching: "
        + ("met" if max(r["receipts_per_s"] for r in rows) >= 200 else "NOT met")
    )


if __name__ == "__main__":
    main()

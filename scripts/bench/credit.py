#!/usr/bin/env python
"""Cost of the credit check (peer/credit_guard.py) per generated token, against a token's time on a 2-peer swarm.

A charging peer runs `CreditGuard.admit` once per step before computing it; a token through a 2-peer route
takes one step on each peer, so the check costs 2 x admit per token. admit is timed in this process on a
guard as a busy peer holds it (a real SQLite receipt store with receipts of the client, several open
sessions of it, a long current segment); the token time is the median of greedy generations through a real
2-peer swarm (blocks 0:4 and 4:8, free peers: the check's share is what matters). Prints one table.

    .venv/bin/python scripts/bench/credit.py [--tokens 32] [--runs 5] [--checks 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path and its chain.py would shadow the `chain` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from substrateinterface import Keypair  # noqa: E402

from dllm import default_model_path  # noqa: E402
from dllm.processes import LocalSwarm  # noqa: E402
from economy.metering import StepKind  # noqa: E402
from economy.pricing import ProviderRate  # noqa: E402
from economy.receipt_store import ReceiptStore  # noqa: E402
from economy.receipts import SignedReceipt, receipt_for_segment  # noqa: E402
from peer.credit_guard import CreditGuard  # noqa: E402
from peer.metering_hook import SessionMeters  # noqa: E402
from swarm.client import ClientConfig, DistributedModel  # noqa: E402
from swarm.sampling import GenerationParams  # noqa: E402

PARAMS_PER_BLOCK = 200_000
BLOCKS = range(0, 4)


def _busy_guard(folder: Path) -> tuple[CreditGuard, str]:
    """A guard over a store holding 50 unpaid receipts of the client, and 4 open sessions of it (256 steps each)."""
    provider, client = Keypair.create_from_uri("//Bob"), Keypair.create_from_uri("//Alice")
    rate = ProviderRate.from_advertised(10**9)
    store = ReceiptStore(folder / "receipts.sqlite3", network="bench", provider=provider.ss58_address)
    meters = SessionMeters("bench", PARAMS_PER_BLOCK, idle_s=3600)
    meta = {"client": client.ss58_address, "sampled": False}
    hidden = torch.zeros(1, 1, 8)
    for s in range(4):
        meters.open(f"session-{s}", BLOCKS, meta)
        meters.record(f"session-{s}", torch.zeros(1, 16, 8), torch.zeros(1, 16, 8), 0)
        for position in range(16, 256):
            meters.record(f"session-{s}", hidden, hidden, position)
    for sequence in range(50):
        session = meters.get("session-0")
        meters.record("session-0", hidden, hidden, 256 + sequence)
        usage, before, after = session.meter.close_segment()
        receipt = receipt_for_segment(
            network="bench",
            session_id=session.meter.session_id,
            sequence=sequence,
            model="bench",
            start=0,
            end=4,
            params_served=session.meter.params_served,
            rate=rate,
            usage=usage,
            provider=provider.ss58_address,
            client=client.ss58_address,
            commitment_before=before,
            commitment=after,
            issued_at=int(time.time()),
        )
        store.add(SignedReceipt.create(receipt, provider, client))
    limit = 10**15  # nothing is refused: the common path is what every token pays for
    return CreditGuard(meters, store, rate, limit, confirm=None), "session-1"


def admit_us(checks: int) -> float:
    """Median microseconds of one admit on a busy guard (batches of 1000)."""
    with tempfile.TemporaryDirectory() as tmp:
        guard, session_id = _busy_guard(Path(tmp))

        async def run() -> list[float]:
            samples = []
            for _ in range(max(1, checks // 1000)):
                started = time.perf_counter()
                for position in range(1000):
                    await guard.admit(session_id, StepKind.GENERATED, 1, 257 + position)
                samples.append((time.perf_counter() - started) / 1000 * 1e6)
            return samples

        samples = asyncio.run(run())
        guard.store.close()
    return statistics.median(samples)


def token_ms(tokens: int, runs: int) -> float:
    """Median milliseconds per generated token through a 2-peer swarm (P2P and direct streams alike)."""
    path = default_model_path()
    with LocalSwarm(str(path)) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(b, wait=False) for b in ("0:4", "4:8")]
        for p in peers:
            swarm.wait_ready(p, timeout=180)
        model = DistributedModel.from_pretrained(str(path), swarm.initial_peers, config=ClientConfig())
        try:
            params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
            model.generate("The module", params)  # warm-up
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                model.generate("The module", params)
                times.append((time.perf_counter() - started) / tokens * 1000)
        finally:
            model.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--checks", type=int, default=20_000)
    args = parser.parse_args()
    check = admit_us(args.checks)
    token = token_ms(args.tokens, args.runs)
    per_token_us = 2 * check  # one check on each of the 2 peers
    table = Table(title="Credit check per generated token, 2-peer swarm")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("one credit check (admit, busy guard), µs", f"{check:.1f}")
    table.add_row("checks per token (one per peer)", "2")
    table.add_row("credit checks per token, µs", f"{per_token_us:.1f}")
    table.add_row("token time on the 2-peer swarm, ms", f"{token:.2f}")
    table.add_row("credit checks / token time", f"{per_token_us / (token * 1000) * 100:.2f} %")
    Console().print(table)


if __name__ == "__main__":
    main()

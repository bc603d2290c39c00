#!/usr/bin/env python
"""Settlement throughput on the dev chain: receipts/s for 1, 10, 100 and 500 receipts per extrinsic,
and block build time. Starts its own dev chain (in memory) on a free 127.0.0.1 port.

Each settlement's time includes what a provider checks: the offer checks before it is sent (exact
protocol calls, parsed byte for byte by chain/settlement_codec.py; runtime validation; dry run:
`economy.presigned_settlement`), its submission as the provider submits a pre-signed settlement
(`ComputeLedger.submit_signed`) and, once included, that the chain shows every provider paid
(`ComputeLedger.paid_on_chain`: the markers' timepoints, and the events of the extrinsic they name, which
the submission already read). `--profile FILE` writes a cProfile of the settlement loop in this process's
CPU time, which load does not blur.

Then the client releases the markers it made (`ComputeLedger.release_markers`, batches of up to 500
`Multisig.cancel_as_multi`): the release fee per receipt, and the check that the client's reserved balance
is back where it started. The bench releases at once to measure it; a client releases a marker only once
its receipt has expired (economy/receipts.py). The steady-state line: what a client settling
`--receipt-rate` receipts/s keeps locked when markers live one receipt lifetime plus the release interval.

Run: .venv/bin/python scripts/bench/chain.py [--extrinsics 5] [--sizes 500] [--receipt-rate 1]
The anchor is the first size measured in the same run; the target is >= 200 receipts/s with batching.
On a shared machine wall-clock figures mostly measure waiting for a core: the CPU columns (this process and
the chain's node process, per extrinsic) do not, and 1 / their sum is the rate on an idle machine if no
step waited on anything else (the two processes take turns; RPC latency comes on top).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psutil  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from substrateinterface import Keypair  # noqa: E402
from tqdm import tqdm  # noqa: E402

from chain.devchain.dev_accounts import dev_keypair  # noqa: E402
from chain.devchain.launcher import DevChain, DevChainConfig  # noqa: E402
from chain.ledger import ComputeLedger  # noqa: E402
from chain.pro_rata import split_pro_rata  # noqa: E402
from chain.records import Payment, ProviderShare  # noqa: E402
from chain.units import PLANCK_PER_TOKEN as UNIT  # noqa: E402
from economy.presigned_settlement import (  # noqa: E402
    RELEASE_AFTER_BLOCKS,
    decode_settlement,
    dry_run,
    validate_on_chain,
)
from swarm.billing import MARKER_RELEASE_INTERVAL_S  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _reserved(ledger: ComputeLedger, ss58: str) -> int:
    reserved: int = ledger.substrate.query("System", "Account", [ss58]).value["data"]["reserved"]
    return reserved


def receipt_id(tag: str) -> bytes:
    return hashlib.blake2b(tag.encode(), digest_size=32).digest()


def _chain_cpu_s() -> float:
    """CPU seconds used so far by this process's children: the dev chain's node process."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _known(amounts: dict[bytes, int]) -> Callable[[set[bytes]], dict[bytes, int]]:
    """The provider's receipt amounts, as paid_on_chain asks for them."""
    return lambda marked: {r: a for r, a in amounts.items() if r in marked}


def measure(ledger: ComputeLedger, batch: int, extrinsics: int, providers: list[str]) -> dict[str, float]:
    client = Keypair.create_from_uri(f"//bench-{uuid.uuid4().hex}", ss58_format=ledger.ss58_format)
    ledger.submitter.submit(
        dev_keypair("Ferdie", ledger.ss58_format),
        ledger.substrate.compose_call(
            "Balances", "transfer_keep_alive", {"dest": client.ss58_address, "value": 10_000 * UNIT}
        ),
    )
    durations, inclusion, fees, marked = [], [], [], []
    own_cpu: list[float] = []
    chain_cpu: list[float] = []
    reserved_before = _reserved(ledger, client.ss58_address)
    for n in tqdm(range(extrinsics), desc=f"batch {batch:>3}", leave=False):
        payments = [
            Payment(
                receipt_id(f"{client.ss58_address}-{n}-{i}"),
                UNIT // 100,
                # Record fields of realistic size: a 512-token segment of a 3.5 B-parameter route.
                tuple(ProviderShare(p, (1 + j) * 1_166_666_667) for j, p in enumerate(providers)),
                tokens=512,
                requests=1,
            )
            for i in range(batch)
        ]
        chain_cpu_at, cpu_at = _chain_cpu_s(), time.process_time()
        start = time.perf_counter()
        call, outflow = ledger.build_settlement(client, payments)
        ledger._require_funds(client, call, outflow)
        signed = ledger.submitter.sign(client, call)
        extrinsic = bytes(signed.data.data)
        decode_settlement(ledger, extrinsic)
        validate_on_chain(ledger, extrinsic)
        dry_run(ledger, extrinsic)
        submit_at = time.perf_counter()
        result = ledger.submit_signed(extrinsic)
        ids = [p.receipt_id for p in payments]
        marked += ids
        for provider in providers:
            owed = {p.receipt_id: a for p in payments for s, a in split_pro_rata(p) if s == provider}
            paid = ledger.paid_on_chain(client.ss58_address, provider, ids, _known(owed))
            if paid != set(ids):
                raise RuntimeError(f"{len(ids) - len(paid)} receipts not shown paid to {provider}")
        end = time.perf_counter()
        own_cpu.append(time.process_time() - cpu_at)
        chain_cpu.append(_chain_cpu_s() - chain_cpu_at)
        durations.append(end - start)
        inclusion.append(end - submit_at)
        fees.append(result.fee)
    total = sum(durations)
    # What the client keeps locked per receipt: the marker's Multisig deposit, read back from its reserved
    # balance (and, to cross-check, DepositBase + 2 x DepositFactor from the runtime's constants).
    deposit = (_reserved(ledger, client.ss58_address) - reserved_before) / (batch * extrinsics)
    constants = int(ledger.substrate.get_constant("Multisig", "DepositBase").value) + 2 * int(
        ledger.substrate.get_constant("Multisig", "DepositFactor").value
    )
    if deposit != constants:
        raise RuntimeError(f"reserved {deposit} planck per receipt, the constants say {constants}")
    release_fees = []
    for start in range(0, len(marked), 500):
        released = ledger.release_markers(client, marked[start : start + 500])
        release_fees.append(released.fee if released is not None else 0)
    still_locked = _reserved(ledger, client.ss58_address) - reserved_before
    if still_locked != 0 or ledger.open_markers(client.ss58_address):
        raise RuntimeError(f"{still_locked} planck still reserved after releasing every marker")
    return {
        "deposit_per_receipt": deposit,
        "release_fee_per_receipt": sum(release_fees) / len(marked),
        "locked_after_release": still_locked,
        "batch": batch,
        "extrinsics": extrinsics,
        "receipts_per_s": batch * extrinsics / total,
        "latency_s": statistics.median(durations),
        "inclusion_s": statistics.median(inclusion),
        "fee_per_receipt": statistics.median(fees) / batch,
        "own_cpu_s": statistics.median(own_cpu),
        "chain_cpu_s": statistics.median(chain_cpu),
    }


async def block_build_time(chain: DevChain, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await chain.new_blocks(1)
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extrinsics", type=int, default=5, help="settlement extrinsics per batch size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 500], help="receipts per extrinsic")
    parser.add_argument("--receipt-rate", type=float, default=1.0, help="receipts/s for the steady-state line")
    parser.add_argument("--block-time-s", type=float, default=12.0, help="the chain's block time (Asset Hub: 12 s)")
    parser.add_argument(
        "--profile", type=Path, default=None, help="write a cProfile (CPU time) of the settlement loop here"
    )
    args = parser.parse_args()
    if args.extrinsics < 1 or min(args.sizes) < 1:
        parser.error("--extrinsics and --sizes must be >= 1")
    console = Console(width=200)
    loop = asyncio.new_event_loop()
    chain = DevChain(DevChainConfig(port=free_port(), state_dir=None))
    loop.run_until_complete(chain.start())
    try:
        empty_block = loop.run_until_complete(block_build_time(chain, 5))
        with ComputeLedger(chain.url) as ledger:
            providers = [dev_keypair(n, ledger.ss58_format).ss58_address for n in ("Dave", "Eve")]
            profile = cProfile.Profile(time.process_time) if args.profile else None
            if profile is not None:
                profile.enable()
            rows = [measure(ledger, b, args.extrinsics, providers) for b in args.sizes]
            if profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
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
        "median inclusion + paid check s",
        "median CPU s (bench + chain)",
        "receipts/s at CPU time",
        "fee/receipt (planck)",
        "locked deposit/receipt (planck)",
        "release fee/receipt (planck)",
        "locked after release (planck)",
        "fees/receipt (mROC)",
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
            f"{r['own_cpu_s']:.2f} + {r['chain_cpu_s']:.2f}",
            f"{r['batch'] / (r['own_cpu_s'] + r['chain_cpu_s']):.1f}",
            f"{r['fee_per_receipt']:,.0f}",
            f"{r['deposit_per_receipt']:,.0f}",
            f"{r['release_fee_per_receipt']:,.0f}",
            f"{r['locked_after_release']:,.0f}",
            f"{(r['fee_per_receipt'] + r['release_fee_per_receipt']) * 1000 / UNIT:.4f}",
        )
    console.print(table)
    # A marker lives at most RELEASE_AFTER_BLOCKS (the receipt's lifetime + slack) plus one release interval.
    held_s = RELEASE_AFTER_BLOCKS * args.block_time_s + MARKER_RELEASE_INTERVAL_S
    deposit = rows[0]["deposit_per_receipt"]
    console.print(
        f"steady state at {args.receipt_rate:g} receipts/s: at most {args.receipt_rate * held_s:,.0f} open markers "
        f"({held_s / 3600:.1f} h of receipts), {args.receipt_rate * held_s * deposit / UNIT:.2f} ROC locked, "
        "whatever the client's history"
    )
    console.print(
        f"empty block build (dev_newBlock): {empty_block:.3f} s; target >= 200 receipts/s with batching: "
        + ("met" if max(r["receipts_per_s"] for r in rows) >= 200 else "NOT met")
    )


if __name__ == "__main__":
    main()

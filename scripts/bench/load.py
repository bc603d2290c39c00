#!/usr/bin/env python
"""Load on a local swarm: N concurrent generation clients for a fixed time, per concurrency level.

Reports per level: requests and tokens per second, p50/p99 request latency, errors by type, and the
peak resident memory of each peer (its whole process group: peer, DHT daemon, p2pd). The anchor is
the 1-client level measured in the same run; throughput is also given as a ratio to it. Peers run
with a small attention-cache budget (--cache-mb) so that high levels hit it: sessions past the budget
must come back as a clear PeerBusyError-caused failure, never an out-of-memory crash.

    .venv/bin/python scripts/bench/load.py [--levels 1 4 16] [--seconds 10] [--tokens 32] [--cache-mb 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, this folder comes first on sys.path and its chain.py would shadow the `chain` package:
# every import below must come after this line.
sys.path[0] = str(Path(__file__).resolve().parents[2])

import psutil  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from dllm import default_model_path  # noqa: E402
from dllm.processes import LocalSwarm, ManagedProcess  # noqa: E402
from swarm.client import ClientConfig, SwarmClient  # noqa: E402
from swarm.sampling import GenerationParams  # noqa: E402
from swarm.session import SessionFailedError  # noqa: E402

PROMPT = "The module"
STREAMS_PER_CLIENT = 4  # concurrent request streams share one client process's DHT node


@dataclass
class LevelResult:
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)


def group_rss_mb(proc: ManagedProcess) -> float:
    """Resident memory of a peer's whole process group."""
    try:
        pgid = os.getpgid(proc.popen.pid)
    except ProcessLookupError:
        return 0.0
    total = 0
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                total += p.memory_info().rss
        except (psutil.Error, ProcessLookupError):
            continue
    return total / 2**20


def error_name(e: BaseException) -> str:
    cause = e.__cause__ if isinstance(e, SessionFailedError) and e.__cause__ else None
    return f"{type(e).__name__}({type(cause).__name__})" if cause else type(e).__name__


async def run_level(
    clients: list[SwarmClient], streams: int, seconds: float, tokens: int, peers: list[ManagedProcess]
) -> LevelResult:
    result = LevelResult(streams, seconds)
    prompt_ids = AutoTokenizer.from_pretrained(clients[0].model_dir)(PROMPT)["input_ids"]
    params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
    stop_at = time.monotonic() + seconds

    async def stream(index: int) -> None:
        client = clients[index // STREAMS_PER_CLIENT]
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                async for _ in client.generate_tokens(prompt_ids, params, set()):
                    result.tokens += 1
                result.latencies.append(time.perf_counter() - started)
            except Exception as e:  # counted by type: the point is that each is a clear, typed failure
                result.errors[error_name(e)] += 1
                client.bans = type(client.bans)(client.bans.duration)  # busy is not misconduct: try it again
                await asyncio.sleep(0.05)

    async def sample_memory() -> None:
        while time.monotonic() < stop_at + 1:
            for p in peers:
                result.peak_rss_mb[p.name] = max(result.peak_rss_mb.get(p.name, 0.0), group_rss_mb(p))
            await asyncio.sleep(0.25)

    await asyncio.gather(sample_memory(), *(stream(i) for i in range(streams)))
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def main_async(args) -> list[LevelResult]:
    path = default_model_path()
    results = []
    with LocalSwarm(str(path)) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(b, "--cache-mb", str(args.cache_mb), wait=False) for b in ("0:4", "4:8")]
        for p in peers:
            swarm.wait_ready(p)
        config = ClientConfig(request_timeout_s=30.0, ban_duration_s=1.0)
        clients = [
            SwarmClient(path, swarm.initial_peers, config) for _ in range(-(-max(args.levels) // STREAMS_PER_CLIENT))
        ]
        await asyncio.gather(*(c.start() for c in clients))
        try:
            for level in tqdm(args.levels, desc="load levels"):
                results.append(await run_level(clients, level, args.seconds, args.tokens, peers))
                for p in peers:
                    if not p.alive:
                        raise SystemExit(f"peer {p.name} died under load:\n{p.log_tail()}")
        finally:
            await asyncio.gather(*(c.close() for c in clients))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--cache-mb", type=int, default=1)
    args = parser.parse_args()
    results = asyncio.run(main_async(args))

    anchor = results[0].tokens / results[0].seconds or float("nan")
    table = Table(
        title=f"swarm load: dllm-tiny-llama, 2 peers (0:4, 4:8), --cache-mb {args.cache_mb}, "
        f"{args.tokens} tokens/request, {args.seconds:.0f} s per level"
    )
    for col in (
        "clients",
        "requests/s",
        "tokens/s",
        f"vs {results[0].clients} client",
        "p50 s",
        "p99 s",
        "errors",
        "peak RSS per peer (MiB)",
    ):
        table.add_column(col, justify="right")
    for r in results:
        tps = r.tokens / r.seconds
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(r.errors.items())) or "0"
        table.add_row(
            str(r.clients),
            f"{len(r.latencies) / r.seconds:.2f}",
            f"{tps:.1f}",
            f"{tps / anchor:.2f}x",
            f"{percentile(r.latencies, 50):.3f}",
            f"{percentile(r.latencies, 99):.3f}",
            errors,
            " / ".join(f"{v:.0f}" for v in r.peak_rss_mb.values()),
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()

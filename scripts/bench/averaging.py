#!/usr/bin/env python
"""Time to average adapters of ~1M and ~10M parameters among 2, 3 and 4 peers on 127.0.0.1.

Each peer is its own process with its own hivemind DHT node. For every size, each round is run twice
at scheduled times: once with hivemind's raw DecentralizedAverager over one tensor of the same size
(the anchor) and once with DLLM's AdapterAverager (clipping, membership check, sketch verification,
DHT commit). Time is measured from the scheduled all-reduce start to the end of the round, median
over the timed rounds; the ratio is DLLM / raw, measured in the same run.

Run: .venv/bin/python scripts/bench/averaging.py [--peers 2 3 4] [--sizes 1000000 10000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

LINEAR = 1024  # adapters on 4 layers x (q_proj, v_proj), each Linear(1024, 1024): 16384 values per rank
LAYERS = 4


def rank_for(size: int) -> int:
    return max(1, round(size / (LAYERS * 2 * 2 * LINEAR)))


def _worker(index: int, sizes: list[int], inbox: mp.Queue, outbox: mp.Queue) -> None:
    import torch
    from hivemind import DHT
    from hivemind.averaging import DecentralizedAverager
    from hivemind.utils import get_dht_time
    from torch import nn

    from peer.adapters import AdapterSet, LoraConfig
    from peer.averaging import AdapterAverager, AveragingConfig
    from peer.replica_auth import ReplicaIdentity

    os.setpgrp()  # the parent can then reap this worker's DHT, averager and p2pd children as one group
    mp.set_start_method("fork", force=True)  # hivemind's averager process cannot be pickled for "spawn"
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("peer.averaging").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    initial_peers = inbox.get()
    # The replica's declarations and votes are signed with its libp2p key, so the key must be in a file.
    identity_dir = tempfile.TemporaryDirectory(prefix="dllm-bench-identity-")
    identity_file = Path(identity_dir.name) / "libp2p.key"
    dht = DHT(
        initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True, identity_path=str(identity_file)
    )
    identity = ReplicaIdentity.from_file(identity_file)
    outbox.put(("ready", index, [str(m) for m in dht.get_visible_maddrs()]))
    config = AveragingConfig(
        min_matchmaking_time_s=1.5,
        request_timeout_s=1.0,
        allreduce_timeout_s=60.0,
        next_chunk_timeout_s=5.0,
        commit_timeout_s=10.0,
        replica_ttl_s=120.0,
        clip_tau=1e9,
    )
    loop = asyncio.new_event_loop()  # one loop for every round, as in a serving peer
    try:
        for size in sizes:
            layers = nn.ModuleList(
                nn.ModuleDict({"q_proj": nn.Linear(LINEAR, LINEAR), "v_proj": nn.Linear(LINEAR, LINEAR)})
                for _ in range(LAYERS)
            )
            adapters = AdapterSet(layers, 0, LoraConfig(rank=rank_for(size), targets=("q_proj", "v_proj")))
            ours = AdapterAverager(
                dht, adapters, model=f"bench{size}", start=0, end=LAYERS, identity=identity, config=config
            )
            raw = DecentralizedAverager(
                [torch.randn(adapters.num_parameters())],
                dht,
                start=True,
                prefix=f"bench_raw_{size}",
                min_matchmaking_time=1.5,
                request_timeout=1.0,
                allreduce_timeout=60.0,
                next_chunk_timeout=5.0,
                target_group_size=16,
            )
            loop.run_until_complete(ours.declare_replica())  # as a serving peer does from its start (keep_declared)
            outbox.put(("built", index, adapters.num_parameters()))
            while (plan := inbox.get()) is not None:
                kind, scheduled = plan
                with torch.no_grad():
                    for p in adapters.parameters():
                        p.add_(torch.randn_like(p) * 1e-3)
                if kind == "raw":
                    control = raw.step(scheduled_time=scheduled, timeout=30.0, allow_retries=False, wait=False)
                    ok = bool(control.result())
                else:
                    ok = loop.run_until_complete(ours.run_round(scheduled_time=scheduled)).averaged
                outbox.put(("round", index, kind, get_dht_time() - scheduled, ok))
            loop.run_until_complete(ours.settle())  # the last round's deferred digest and sketch
            ours.close()
            raw.shutdown()
    finally:
        loop.close()
        dht.shutdown()
        identity_dir.cleanup()


def measure(n_peers: int, sizes: list[int], rounds: int, progress: tqdm) -> dict[tuple[int, str], tuple[float, int]]:
    ctx = mp.get_context("spawn")
    inboxes, outbox = [ctx.Queue() for _ in range(n_peers)], ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, sizes, inboxes[i], outbox)) for i in range(n_peers)]
    for p in procs:
        p.start()
    results: dict[tuple[int, str], tuple[float, int]] = {}
    try:
        inboxes[0].put([])
        _, _, maddrs = outbox.get(timeout=120)
        for inbox in inboxes[1:]:
            inbox.put(maddrs)
        pending = [outbox.get(timeout=120) for _ in range(n_peers - 1 + n_peers)]  # "ready" and "built", any order
        for size in sizes:
            if size != sizes[0]:
                pending = [outbox.get(timeout=120) for _ in range(n_peers)]
            actual = next(message[2] for message in pending if message[0] == "built")
            period = 4.0 + 4.0 * actual / 1e7 * n_peers / 2
            times: dict[str, list[float]] = {"raw": [], "dllm": []}
            failures = {"raw": 0, "dllm": 0}
            t = time.time() + 2.0
            for r in range(rounds + 1):  # round 0 warms up connections and is not counted
                for kind in ("raw", "dllm"):
                    for inbox in inboxes:
                        inbox.put((kind, t))
                    replies = [outbox.get(timeout=180) for _ in range(n_peers)]
                    if r > 0:
                        times[kind].append(max(reply[3] for reply in replies))
                        failures[kind] += sum(not reply[4] for reply in replies)
                    t = max(time.time() + 2.0, t + period)
                progress.update(1)
            for inbox in inboxes:
                inbox.put(None)
            for kind in times:
                results[(actual, kind)] = (statistics.median(times[kind]), failures[kind])
    finally:
        for p in procs:
            p.join(timeout=30)
            with contextlib.suppress(ProcessLookupError):  # the group is gone already
                os.killpg(p.pid, signal.SIGKILL)  # whatever of the worker's process group is left
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    table = Table(title="Adapter averaging on 127.0.0.1 (seconds from scheduled start, median)")
    for column in ("peers", "parameters", "raw hivemind", "DLLM averager", "ratio DLLM/raw", "failed rounds raw/DLLM"):
        table.add_column(column, justify="right")
    with tqdm(total=len(args.peers) * len(args.sizes) * (args.rounds + 1), desc="rounds") as progress:
        for n in args.peers:
            results = measure(n, args.sizes, args.rounds, progress)
            for size in sorted({s for s, _ in results}):
                (raw, raw_fail), (ours, our_fail) = results[(size, "raw")], results[(size, "dllm")]
                table.add_row(
                    str(n), f"{size:,}", f"{raw:.3f}", f"{ours:.3f}", f"{ours / raw:.2f}x", f"{raw_fail}/{our_fail}"
                )
    Console().print(table)


if __name__ == "__main__":
    main()

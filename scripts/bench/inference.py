#!/usr/bin/env python
"""Inference speed of the swarm vs the same model run locally, failover stall, and peer start time.

Prints one table. The anchor is local greedy generation with transformers in one process, measured
in the same run; swarm figures are given as a ratio to it.

    .venv/bin/python scripts/bench/inference.py [--tokens 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import signal
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dllm import default_model_path  # noqa: E402
from dllm.processes import LocalSwarm  # noqa: E402
from swarm.client import DistributedModel  # noqa: E402
from swarm.sampling import GenerationParams  # noqa: E402

PROMPT = "The module"


def local_tokens_per_s(path, tokens: int, runs: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kwargs)  # warm-up
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            model.generate(ids, **kwargs)
            times.append(time.perf_counter() - started)
    return tokens / statistics.median(times)


def swarm_tokens_per_s(model: DistributedModel, tokens: int, runs: int) -> float:
    params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
    model.generate(PROMPT, params)  # warm-up: routing, connections
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model.generate(PROMPT, params)
        times.append(time.perf_counter() - started)
    return tokens / statistics.median(times)


def failover_stall(swarm: LocalSwarm, model: DistributedModel, tokens: int) -> tuple[float, float]:
    """(stall measured by the session, extra wall time vs an uninterrupted run) after SIGKILL mid-generation."""
    params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    model.generate(PROMPT, params)
    clean = time.perf_counter() - started
    by_id = {p.info["peer_id"]: p for p in swarm.peers()}
    started = time.perf_counter()
    for i, _ in enumerate(model.stream(PROMPT, params)):
        if i == tokens // 4:
            hop = next(h for h in model.core.last_session.hops if h.hop.start > 0)
            by_id[hop.hop.peer_id].signal(signal.SIGKILL)
    interrupted = time.perf_counter() - started
    stalls = model.core.last_session.stall_seconds
    return (max(stalls) if stalls else float("nan")), interrupted - clean


def build_wider_model(base: Path, hidden: int, folder: Path) -> Path:
    """A random-weights copy of the embedded model's architecture, `hidden` wide (tokenizer shared)."""
    config = AutoConfig.from_pretrained(base)
    config.hidden_size, config.intermediate_size = hidden, int(hidden * 2.75)
    config.num_attention_heads = config.num_key_value_heads = hidden // 64
    config.head_dim = 64
    config.dllm_name = f"dllm-bench-h{hidden}"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, folder / f.name)
    return folder


def two_peer_ratio(path: Path, tokens: int, runs: int) -> tuple[float, float]:
    """(local 1-thread tokens/s, 2-peer swarm tokens/s) for the model at `path`."""
    local = local_tokens_per_s(path, tokens, runs, 1)
    with LocalSwarm(str(path)) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(b, wait=False) for b in ("0:4", "4:8")]
        for p in peers:
            swarm.wait_ready(p, timeout=180)
        with DistributedModel.from_pretrained(str(path), swarm.initial_peers) as model:
            return local, swarm_tokens_per_s(model, tokens, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--wider", type=int, default=1024,
                        help="also measure a random model of this hidden size (0: skip); network overhead matters less")
    args = parser.parse_args()
    path = default_model_path()
    console = Console()
    rows = []

    # The anchor: transformers' own generate in one process, 1 thread (its fastest setting for a tiny
    # model, and what each peer uses). The default thread count is shown for reference.
    default_threads = torch.get_num_threads()
    local_default = local_tokens_per_s(path, args.tokens, args.runs, default_threads)
    local = local_tokens_per_s(path, args.tokens, args.runs, 1)
    rows.append(("local transformers, 1 process, 1 thread (anchor)", f"{local:.1f}", "1.00"))
    rows.append((f"local transformers, 1 process, {default_threads} threads", f"{local_default:.1f}",
                 f"{local_default / local:.2f}"))

    with LocalSwarm(str(path)) as swarm:
        swarm.start_bootstrap()
        one = swarm.start_peer("0:8", "--rate", "1")
        ready_s = one.info["ready_s"]
        with DistributedModel.from_pretrained(str(path), swarm.initial_peers) as model:
            tps = swarm_tokens_per_s(model, args.tokens, args.runs)
        rows.append(("swarm, 1 peer (0:8)", f"{tps:.1f}", f"{tps / local:.2f}"))
        one.stop()
        swarm.processes.remove(one)

        peers = [swarm.start_peer(b, wait=False) for b in ("0:4", "4:8", "4:8")]
        for p in peers:
            swarm.wait_ready(p)
        with DistributedModel.from_pretrained(str(path), swarm.initial_peers) as model:
            tps2 = swarm_tokens_per_s(model, args.tokens, args.runs)
            rows.append(("swarm, 2 peers (0:4 + 4:8)", f"{tps2:.1f}", f"{tps2 / local:.2f}"))
            stall, extra = failover_stall(swarm, model, args.tokens)

    if args.wider:
        with tempfile.TemporaryDirectory() as tmp:
            wide = build_wider_model(path, args.wider, Path(tmp) / "wide")
            wide_local, wide_swarm = two_peer_ratio(wide, args.tokens, args.runs)
        rows.append((f"local, random 8-layer model of hidden {args.wider}, 1 thread", f"{wide_local:.1f}", "1.00"))
        rows.append(("swarm, 2 peers (0:4 + 4:8), same model", f"{wide_swarm:.1f}", f"{wide_swarm / wide_local:.2f}"))

    table = Table(title=f"DLLM inference, {args.tokens} new tokens, greedy, median of {args.runs}")
    table.add_column("setup")
    table.add_column("tokens/s", justify="right")
    table.add_column("ratio to local", justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    extra_table = Table(title="failover and start-up")
    extra_table.add_column("measure")
    extra_table.add_column("seconds", justify="right")
    extra_table.add_row("failover stall after SIGKILL (re-route + replay)", f"{stall:.3f}")
    extra_table.add_row("extra wall time of the interrupted generation", f"{extra:.3f}")
    extra_table.add_row("peer start to serving (process spawn to ready)", f"{ready_s:.2f}")
    console.print(extra_table)


if __name__ == "__main__":
    main()

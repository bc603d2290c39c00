#!/usr/bin/env python
"""Inference speed of the swarm vs the same model run locally, failover stall, and peer start time.

Prints one table. The anchor is local greedy generation with transformers in one process, measured
in the same run, taking turns with the swarm runs; swarm figures are given as a ratio to it, for both
transports of the inference streams (direct TLS, hivemind P2P).

    .venv/bin/python scripts/bench/inference.py [--tokens 64] [--runs 10] [--wider 1024] [--starts 5]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this folder comes first on sys.path and its chain.py would shadow the `chain` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dllm import default_model_path  # noqa: E402
from dllm.processes import LocalSwarm  # noqa: E402
from swarm.client import ClientConfig, DistributedModel  # noqa: E402
from swarm.sampling import GenerationParams  # noqa: E402

PROMPT = "The module"


def local_generator(path, tokens: int, threads: int) -> Callable[[], None]:
    """One greedy generation of `tokens` tokens with transformers in this process (the anchor)."""
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run() -> None:
        with torch.no_grad():
            model.generate(ids, **kwargs)

    return run


def swarm_generator(model: DistributedModel, tokens: int) -> Callable[[], None]:
    params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
    return lambda: model.generate(PROMPT, params)


def interleaved_tokens_per_s(runners: dict[str, Callable[[], None]], tokens: int, runs: int) -> dict[str, float]:
    """Tokens/s of each runner, median of `runs`, taking turns so that a machine whose speed drifts
    (a shared 2-core VM does) treats every setup alike."""
    for run in runners.values():
        run()  # warm-up: routing, connections, allocator
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(runs):
        for name, run in list(runners.items())[:: 1 if i % 2 == 0 else -1]:
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def clients(path: str, swarm: LocalSwarm) -> dict[str, DistributedModel]:
    """One client per transport of the inference streams."""
    return {
        transport: DistributedModel.from_pretrained(
            path, swarm.initial_peers, config=ClientConfig(direct_streams=transport == "direct")
        )
        for transport in ("direct", "p2p")
    }


def failover_stall(swarm: LocalSwarm, model: DistributedModel, tokens: int) -> tuple[float, float]:
    """(stall measured by the session, extra wall time vs an uninterrupted run) after SIGKILL mid-generation."""
    params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    model.generate(PROMPT, params)
    clean = time.perf_counter() - started
    by_id = {p.info["peer_id"]: p for p in swarm.peers()}
    started = time.perf_counter()
    stream = model.stream(PROMPT, params)
    for i, _ in enumerate(stream):
        if i == tokens // 4:
            assert stream.session is not None  # started: a token came back
            hop = next(h for h in stream.session.hops if h.hop.start > 0)
            by_id[hop.hop.peer_id].signal(signal.SIGKILL)
    interrupted = time.perf_counter() - started
    assert stream.result is not None and stream.result.session is not None
    stalls = stream.result.session.stall_seconds
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


def two_peer_ratio(path: Path, tokens: int, runs: int) -> dict[str, float]:
    """Tokens/s of local 1-thread generation and a 2-peer swarm (both transports) for the model at `path`."""
    local = local_generator(path, tokens, 1)
    with LocalSwarm(str(path)) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(b, wait=False) for b in ("0:4", "4:8")]
        for p in peers:
            swarm.wait_ready(p, timeout=180)
        models = clients(str(path), swarm)
        try:
            return interleaved_tokens_per_s(
                {"local": local, **{t: swarm_generator(m, tokens) for t, m in models.items()}}, tokens, runs
            )
        finally:
            for m in models.values():
                m.close()


def peer_start_s(swarm: LocalSwarm, starts: int) -> list[float]:
    """Seconds from spawning `dllm peer join` (blocks 0:8) to its ready line, which it prints once announced in
    the DHT; one peer at a time, each stopped before the next starts."""
    times = []
    for _ in range(starts):
        peer = swarm.start_peer("0:8", "--rate", "1")
        times.append(peer.info["ready_s"])
        peer.stop()
        swarm.processes.remove(peer)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--starts", type=int, default=5, help="peer starts timed (start time varies with load)")
    parser.add_argument(
        "--wider",
        type=int,
        default=1024,
        help="also measure a random model of this hidden size (0: skip); network overhead matters less",
    )
    args = parser.parse_args()
    path = default_model_path()
    console = Console()
    rows = []

    # The anchor: transformers' own generate in one process, 1 thread (its fastest setting for a tiny
    # model, and what each peer uses), measured in turns with every swarm setup.
    default_threads = torch.get_num_threads()
    local_default = interleaved_tokens_per_s(
        {"local": local_generator(path, args.tokens, default_threads)}, args.tokens, 3
    )["local"]
    local = local_generator(path, args.tokens, 1)

    with LocalSwarm(str(path)) as swarm:
        swarm.start_bootstrap()
        start_s = peer_start_s(swarm, args.starts)
        one = swarm.start_peer("0:8", "--rate", "1")
        models = clients(str(path), swarm)
        one_peer = interleaved_tokens_per_s(
            {"local": local, **{t: swarm_generator(m, args.tokens) for t, m in models.items()}}, args.tokens, args.runs
        )
        for m in models.values():
            m.close()
        one.stop()
        swarm.processes.remove(one)

        peers = [swarm.start_peer(b, wait=False) for b in ("0:4", "4:8", "4:8")]
        for p in peers:
            swarm.wait_ready(p)
        models = clients(str(path), swarm)
        two_peers = interleaved_tokens_per_s(
            {"local": local, **{t: swarm_generator(m, args.tokens) for t, m in models.items()}}, args.tokens, args.runs
        )
        stall, extra = failover_stall(swarm, models["direct"], args.tokens)
        for m in models.values():
            m.close()

    anchor = statistics.median([one_peer["local"], two_peers["local"]])
    rows.append(("local transformers, 1 process, 1 thread (anchor)", f"{anchor:.1f}", "1.00"))
    rows.append(
        (
            f"local transformers, 1 process, {default_threads} threads",
            f"{local_default:.1f}",
            f"{local_default / anchor:.2f}",
        )
    )
    for label, measured in (("1 peer (0:8)", one_peer), ("2 peers (0:4 + 4:8)", two_peers)):
        for transport, name in (("direct", "direct TLS streams"), ("p2p", "hivemind P2P streams")):
            # each swarm figure against the local runs it took turns with
            rows.append(
                (
                    f"swarm, {label}, {name}",
                    f"{measured[transport]:.1f}",
                    f"{measured[transport] / measured['local']:.2f}",
                )
            )

    if args.wider:
        with tempfile.TemporaryDirectory() as tmp:
            wide = two_peer_ratio(
                build_wider_model(path, args.wider, Path(tmp) / "wide"), args.tokens, max(3, args.runs // 3)
            )
        rows.append((f"local, random 8-layer model of hidden {args.wider}, 1 thread", f"{wide['local']:.1f}", "1.00"))
        for transport, name in (("direct", "direct TLS streams"), ("p2p", "hivemind P2P streams")):
            rows.append(
                (
                    f"swarm, 2 peers, same model, {name}",
                    f"{wide[transport]:.1f}",
                    f"{wide[transport] / wide['local']:.2f}",
                )
            )

    table = Table(title=f"DLLM inference, {args.tokens} new tokens, greedy, median of {args.runs} interleaved runs")
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
    extra_table.add_row(
        f"peer start to serving (process spawn to announced), median (min-max) of {len(start_s)}",
        f"{statistics.median(start_s):.2f} ({min(start_s):.2f}-{max(start_s):.2f})",
    )
    console.print(extra_table)


if __name__ == "__main__":
    main()

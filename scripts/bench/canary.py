#!/usr/bin/env python
"""Time of one in-swarm canary evaluation (live + candidate version of a span) on 127.0.0.1.

A local swarm serves blocks 0:4 and 4:8 of the embedded model (each peer its own process). This
process plays a learning peer of 0:4: its own copy of the span with a live and a candidate adapter
version, evaluated by `SwarmCanaryEvaluator` through the remote 4:8 peer (plan, version pinning,
prefix once, the span twice, suffix twice). The anchor, measured in the same run: one plain client
forward of the same batch through the whole swarm route (0:4 and 4:8 remote) plus the head.

Run: .venv/bin/python scripts/bench/canary.py [--repeats 10] [--examples 12 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from dllm import default_model_path  # noqa: E402
from dllm.processes import LocalSwarm  # noqa: E402
from peer.adapters import AdapterSet, LoraConfig  # noqa: E402
from peer.blocks import load_span_layers  # noqa: E402
from peer.canary_eval import SwarmCanaryEvaluator  # noqa: E402
from peer.canary_examples import build_canary_batch, read_canary_file  # noqa: E402
from peer.span import SpanRunner  # noqa: E402
from swarm.client import ClientConfig, SwarmClient  # noqa: E402
from swarm.model_files import load_config  # noqa: E402


async def measure(swarm: LocalSwarm, examples: list[int], repeats: int) -> list[tuple[int, int, float, float]]:
    model_dir = default_model_path()
    config = load_config(model_dir)
    span = SpanRunner(config, load_span_layers(model_dir, config, 0, 4), 0, 4)
    adapters = AdapterSet(span.layers, 0, LoraConfig(rank=8))
    with torch.no_grad():
        candidate = adapters.propose({n: t + 0.01 for n, t in adapters.working_state().items()})

    def pinned(hidden: torch.Tensor, version: int) -> torch.Tensor:
        with torch.inference_mode(), adapters.use(version):
            return span.forward(hidden)

    client = SwarmClient(model_dir, swarm.initial_peers, ClientConfig())
    await client.start()
    rows = []
    try:
        default = read_canary_file()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for count in examples:
            batch = build_canary_batch((default * (count // len(default) + 1))[:count], tokenizer)
            evaluator = SwarmCanaryEvaluator(
                client,
                peer_id="this-bench",
                start=0,
                end=4,
                batch=batch,
                local_forward=lambda h, v: asyncio.to_thread(pinned, h, v),
            )
            await evaluator.losses([0, candidate])  # warm-up: route, pings, first compute
            await client.forward_hidden(client.head.embed_tokens(batch.input_ids))
            canary_s, anchor_s = [], []
            for _ in tqdm(range(repeats), desc=f"{count} examples", unit="eval"):
                started = time.perf_counter()
                await evaluator.losses([0, candidate])
                canary_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                out, _, _ = await client.forward_hidden(client.head.embed_tokens(batch.input_ids))
                client.head.logits(out)
                anchor_s.append(time.perf_counter() - started)
            rows.append((count, int(batch.input_ids.numel()), statistics.median(anchor_s), statistics.median(canary_s)))
    finally:
        await client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--examples", type=int, nargs="+", default=[12, 64])
    args = parser.parse_args()
    with LocalSwarm(str(default_model_path())) as swarm:
        swarm.start_bootstrap()
        for blocks in ("0:4", "4:8"):
            swarm.start_peer(blocks, timeout=120)
        rows = asyncio.run(measure(swarm, args.examples, args.repeats))
    table = Table(title="In-swarm canary evaluation (live + candidate), median seconds")
    for column in ("examples", "tokens (padded)", "anchor: 1 swarm forward", "canary: 2 versions", "ratio"):
        table.add_column(column, justify="right")
    for count, tokens, anchor, canary in rows:
        table.add_row(str(count), str(tokens), f"{anchor:.4f}", f"{canary:.4f}", f"{canary / anchor:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Measurement of honest float noise: how far a provider computing in float32, bfloat16 or float16 lands
from the verifier's float32 re-run, per token position. The spot-check tolerances
(economy.verification.DTYPE_TOLERANCES) are set from these figures.

What is measured is what a spot check compares. A client sends float32 activations; the provider casts
them to its dtype, serves the session step by step with its KV cache in that dtype (a prompt, then one
token per step) and casts its outputs back to float32; the verifier re-runs the whole session in ONE
float32 causal forward (economy.verification.recheck). Per position: ||served - rerun|| / ||rerun||.
For every (model, dtype, depth) the table gives the median, p99, p99.9 and maximum over all positions
of all sessions, the dtype's noise bound (economy.verification.DTYPE_NOISE: first + per_sqrt_block x
sqrt(blocks), which every measured maximum must stay under), the tolerance in use (NOISE_MARGIN x bound)
and its margin over the maximum (tolerance / max).

Models: the embedded dllm-tiny-llama (dllm/default_model, trained weights) with real inputs (token
embeddings of this repository's docs, which is what block 0 receives) and with random N(0, 1) inputs
(what a later block may receive, and what the tests send); and a wider Llama with random weights
(hidden 512, 4 layers by default, as scripts/bench/verification.py builds it) with random inputs.
Depth: the span of the first block only, half the blocks and all of them (noise grows with depth).

Usage: .venv/bin/python scripts/bench/dtype_noise.py [--sessions 48] [--prompt 32] [--generated 32]
       [--layers 16] [--device cuda] [--quick]
(--device: where the provider spans run; the float32 re-run stays on the CPU, as a verifier's does.)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from economy.verification import DTYPE_NOISE, Tolerance  # noqa: E402
from peer.blocks import load_span_layers  # noqa: E402
from peer.span import SpanRunner  # noqa: E402
from swarm.architectures import architecture_for  # noqa: E402
from swarm.model_files import load_config, read_tensors  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Case:
    """One model with its weights in every dtype and a source of session inputs."""

    name: str
    spans: dict[str, SpanRunner]
    inputs: str  # "real" or "random"


def random_span(hidden: int, layers: int, dtype: torch.dtype, seed: int, device: str) -> SpanRunner:
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
    )
    config._attn_implementation = "sdpa"  # as swarm.model_files.load_config sets it for peers and verifiers
    torch.manual_seed(seed)
    arch = architecture_for(config)
    modules = torch.nn.ModuleList(arch.decoder_layer(config, layer_idx=i).eval() for i in range(layers))
    modules.requires_grad_(False)
    return SpanRunner(config, modules.to(device if dtype != torch.float32 else "cpu", dtype), 0, layers)


def tiny_spans(model_dir: Path, device: str) -> dict[str, SpanRunner]:
    """The embedded model's blocks in every dtype: the float32 reference on the CPU, the others on `device`."""
    config = load_config(model_dir)
    n = config.num_hidden_layers
    return {
        name: SpanRunner(
            config, load_span_layers(model_dir, config, 0, n, d, "cpu" if name == "float32" else device), 0, n
        )
        for name, d in DTYPES.items()
    }


def real_inputs(model_dir: Path, length: int, count: int) -> list[torch.Tensor]:
    """Token embeddings of consecutive windows of the repository's docs: block 0's real inputs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    ids = torch.tensor(tokenizer(text)["input_ids"])
    embed = read_tensors(model_dir, ["model.embed_tokens."], dtype=torch.float32)["model.embed_tokens.weight"]
    step = max(1, (len(ids) - length) // count)
    return [embed[ids[i * step : i * step + length]].unsqueeze(0) for i in range(count)]


def sessions(case: Case, hidden: int, length: int, count: int, model_dir: Path) -> Iterator[torch.Tensor]:
    if case.inputs == "real":
        yield from real_inputs(model_dir, length, count)
        return
    g = torch.Generator().manual_seed(1234)
    for _ in range(count):
        yield torch.randn(1, length, hidden, generator=g)


def serve(span: SpanRunner, x: torch.Tensor, prompt: int, blocks: range) -> torch.Tensor:
    """The session served as a peer serves it: prompt, then one cached step per token; float32 out."""
    cache = span.new_cache(1, x.shape[1], blocks)
    outs = [span.forward(x[:, :prompt], cache=cache, blocks=blocks).to("cpu", torch.float32)]
    for t in range(prompt, x.shape[1]):
        outs.append(span.forward(x[:, t : t + 1], cache=cache, blocks=blocks).to("cpu", torch.float32))
    return torch.cat(outs, dim=1)


def per_position_error(served: torch.Tensor, rerun: torch.Tensor) -> torch.Tensor:
    floor = Tolerance().floor
    return ((served - rerun).norm(dim=-1) / rerun.norm(dim=-1).clamp_min(floor)).flatten()


def quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=48, help="sessions per model and input kind")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--generated", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512, help="width of the random-weight model")
    parser.add_argument("--layers", type=int, default=16, help="depth of the random-weight model")
    parser.add_argument("--device", default="cpu", help="where the bfloat16/float16 provider spans run")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.prompt, args.generated, args.hidden = 4, 8, 8, 256
    torch.set_num_threads(1)  # as the other benches: a shared machine makes more threads noise, not speed
    from dllm import default_model_path

    model_dir = default_model_path()
    tiny = tiny_spans(model_dir, args.device)
    cases = [
        Case("dllm-tiny-llama", tiny, "real"),
        Case("dllm-tiny-llama", tiny, "random"),
        Case(
            f"random Llama h{args.hidden}",
            {name: random_span(args.hidden, args.layers, d, 0, args.device) for name, d in DTYPES.items()},
            "random",
        ),
    ]
    length = args.prompt + args.generated
    console = Console(width=200)
    table = Table(
        title=f"Per-position relative L2 error vs a float32 re-run ({args.sessions} sessions of "
        f"{args.prompt}+{args.generated} tokens per row, served with a KV cache on {args.device})"
    )
    columns = ("model", "inputs", "blocks", "dtype", "positions", "median", "p99", "p99.9", "max", "bound", "tolerance")
    for col in (*columns, "margin"):
        table.add_column(col, justify="right" if col not in ("model", "inputs", "dtype") else "left")
    started = time.perf_counter()
    over_bound = []
    for case in cases:
        reference = case.spans["float32"]
        n = reference.num_blocks
        depths = sorted({1, 2, max(1, n // 4), max(1, n // 2), n})
        inputs = list(sessions(case, reference.hidden_size, length, args.sessions, model_dir))
        for depth in depths:
            blocks = range(0, depth)
            with torch.inference_mode():
                reruns = [reference.forward(x, blocks=blocks).float() for x in inputs]
                for name, span in case.spans.items():
                    errors = torch.cat(
                        [
                            per_position_error(serve(span, x, args.prompt, blocks), r)
                            for x, r in zip(inputs, reruns, strict=True)
                        ]
                    )
                    bound = DTYPE_NOISE[name].bound(depth)
                    tolerance = Tolerance.for_dtype(name, depth).rel_l2
                    worst = float(errors.max())
                    if worst > bound:
                        over_bound.append(f"{case.name} {case.inputs} 0:{depth} {name}: {worst:.2e} > {bound:.2e}")
                    table.add_row(
                        case.name,
                        case.inputs,
                        f"0:{depth}",
                        name,
                        str(errors.numel()),
                        f"{quantile(errors, 0.5):.2e}",
                        f"{quantile(errors, 0.99):.2e}",
                        f"{quantile(errors, 0.999):.2e}",
                        f"{worst:.2e}",
                        f"{bound:.2e}",
                        f"{tolerance:.2e}",
                        f"{tolerance / max(worst, 1e-12):.1f}x",
                    )
    console.print(table)
    console.print(f"measured in {time.perf_counter() - started:.0f} s")
    if over_bound:  # DTYPE_NOISE no longer bounds what honest providers show: widen it before trusting verdicts
        console.print("[red]maximum above the dtype's noise bound:[/red]\n  " + "\n  ".join(over_bound))
        sys.exit(1)
    console.print("every maximum is within its dtype's noise bound")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark of spot-check verification: compute overhead and detection rate.

1. Overhead. Serves sessions (prompt + generated tokens, one KV-cached step per token, metered as a
   peer meters them) through a span of Llama decoder layers with random weights, built by
   transformers and run by peer.span.SpanRunner, then re-checks each session as a verifier does
   (one parallel forward over the whole session + commitment recomputation). Overhead =
   sample_rate x check time / serving time (the anchor: serving, measured in the same run).
2. Per-check outcome on real tensors: the fraction of honest sessions that pass and of corrupted
   sessions (one generated step with wrong activations, or a skipped block) that fail.
3. Detection rate at the fixed rate p (the anchor): many simulated providers that corrupt a fraction f
   of 200 requests, each request selected for a check by the keyed-hash lottery and the check failing
   at the rate measured in 2. Compared with the formula 1 - (1 - p f)^n.
4. The adaptive rule (economy.verification.AdaptiveSpotCheck, the client's default), same lottery and
   catch rate: detection for a fresh identity cheating from its first request, for one that waits until
   its rate is at the floor and then corrupts each of 200 requests with probability f, and for one that
   waits and then corrupts exactly f x 200 of them; checks per request of honest providers over their
   first 200 requests. Each selected sample is dispatched as the client does (economy.verification
   .VerifierDispatch over 3 authorized verifiers: one first, a second after a failure or an audit draw), so
   verifier compute / serving compute = verifier runs per request x the ratio measured in 1; the former
   dispatch (every sample to 2 verifiers) is shown next to it, and detection with one of the 3 verifiers
   lying "passed" on everything.

Usage: .venv/bin/python scripts/bench/verification.py [--sample-rate 0.5] [--runs 2000] [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from economy.metering import StepKind, UsageMeter  # noqa: E402
from economy.pricing import ProviderRate  # noqa: E402
from economy.receipts import SignedReceipt, receipt_for_segment  # noqa: E402
from economy.verification import (  # noqa: E402
    AdaptiveSpotCheck,
    CheckHistory,
    SpotCheckPolicy,
    Tolerance,
    VerifierDispatch,
    detection_probability,
    dispatch_detection_bound,
    recheck,
)
from economy.work_sample import SampledStep, WorkSample  # noqa: E402
from peer.span import SpanRunner  # noqa: E402
from swarm.architectures import architecture_for  # noqa: E402


def build_span(hidden: int, layers: int, seed: int) -> SpanRunner:
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
    for m in modules:
        m.requires_grad_(False)
    return SpanRunner(config, modules, 0, layers)


def serve(runner: SpanRunner, keys, prompt: int, generated: int, cheat: str, seed: int) -> tuple[WorkSample, float]:
    """One session served as a peer would (KV cache, metered); returns the client's work sample."""
    g = torch.Generator().manual_seed(seed)
    h = runner.hidden_size
    xs = [torch.randn(1, prompt, h, generator=g)] + [torch.randn(1, 1, h, generator=g) for _ in range(generated)]
    bad_step = 1 + int(torch.randint(generated, (1,), generator=g))
    meter = UsageMeter(seed.to_bytes(8, "big"), "bench", 0, runner.num_blocks, 1)
    cache = runner.new_cache(1, prompt + generated, range(0, runner.num_blocks))
    steps = []
    position = 0
    started = time.perf_counter()
    with torch.no_grad():
        for i, x in enumerate(xs):
            blocks = range(0, runner.num_blocks - 1) if cheat == "skip" else None
            out = runner.forward(x, cache=cache, blocks=blocks)
            if cheat == "corrupt" and i == bad_step:
                out = out + 0.2 * out.norm(dim=-1, keepdim=True) / h**0.5 * torch.randn(out.shape, generator=g)
            kind = StepKind.PROMPT if i == 0 else StepKind.GENERATED
            meter.record_step(kind, x.shape[1], x, out)
            steps.append(SampledStep(kind, position, x, out))
            position += x.shape[1]
    serve_s = time.perf_counter() - started
    usage, before, after = meter.close_segment()
    receipt = receipt_for_segment(
        network="bench",
        session_id=meter.session_id,
        sequence=0,
        model="bench",
        start=0,
        end=runner.num_blocks,
        params_served=1,
        rate=ProviderRate(1, 1),
        usage=usage,
        provider=keys[0].ss58_address,
        client=keys[1].ss58_address,
        commitment_before=before,
        commitment=after,
        issued_at=0,
    )
    return WorkSample(SignedReceipt.create(receipt, keys[0], keys[1]), tuple(steps)), serve_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample-rate", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--generated", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=12, help="real sessions per kind (honest, corrupt, skip)")
    parser.add_argument("--runs", type=int, default=2000, help="simulated providers per cheat fraction")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.sessions, args.runs, args.generated = 256, 3, 300, 32
    # One thread: on a shared 2-core machine more threads oversubscribe and make timings noise.
    torch.set_num_threads(1)
    from substrateinterface import Keypair

    keys = (Keypair.create_from_uri("//Bob"), Keypair.create_from_uri("//Alice"))
    console = Console(width=None if sys.stdout.isatty() else 150)  # a file gets whole rows
    served = build_span(args.hidden, args.layers, seed=0)
    verifier = build_span(args.hidden, args.layers, seed=0)  # same weights, separate instance
    tolerance = Tolerance.for_dtype(torch.float32)

    serve(served, keys, 8, 2, "none", seed=10**6)  # warm-up
    outcomes: dict[str, list[bool]] = {"honest": [], "corrupt": [], "skip": []}
    serve_total = check_total = 0.0
    worst_honest = 0.0
    for kind in outcomes:
        for s in tqdm(range(args.sessions), desc=f"serve+check {kind}", leave=False):
            sample, serve_s = serve(served, keys, args.prompt, args.generated, kind, seed=s + 1000 * len(kind))
            started = time.perf_counter()
            result = recheck(sample, verifier.forward, tolerance)
            check_s = time.perf_counter() - started
            outcomes[kind].append(result.passed)
            if kind == "honest":
                serve_total += serve_s
                check_total += check_s
                worst_honest = max(worst_honest, result.worst_rel_error)

    cost_ratio = check_total / serve_total
    overhead = args.sample_rate * cost_ratio
    t = Table(
        title=f"Spot-check compute ({args.layers} Llama layers, hidden {args.hidden}, "
        f"{args.prompt}+{args.generated} tokens per session, CPU x{torch.get_num_threads()})"
    )
    for col in ("measure", "value"):
        t.add_column(col)
    t.add_row("serving per session (anchor)", f"{1000 * serve_total / args.sessions:.1f} ms")
    t.add_row("one check per session", f"{1000 * check_total / args.sessions:.1f} ms")
    t.add_row("check / serving ratio", f"{cost_ratio:.3f}")
    t.add_row(f"overhead at p={args.sample_rate}", f"{100 * overhead:.2f} %  (target <= 5 %)")
    t.add_row(
        "honest sessions passing", f"{sum(outcomes['honest'])}/{args.sessions} (worst rel err {worst_honest:.1e})"
    )
    t.add_row("one-step-corrupt sessions failing", f"{args.sessions - sum(outcomes['corrupt'])}/{args.sessions}")
    t.add_row("skipped-block sessions failing", f"{args.sessions - sum(outcomes['skip'])}/{args.sessions}")
    console.print(t)

    catch_rate = (args.sessions - sum(outcomes["corrupt"])) / args.sessions
    false_fail = 1 - sum(outcomes["honest"]) / args.sessions
    rng = random.Random(7)
    d = Table(title=f"Detection within {args.requests} requests, p={args.sample_rate}, {args.runs} runs each")
    for col in ("cheat fraction", "simulated detected", "formula 1-(1-pf)^n", "honest runs flagged"):
        d.add_column(col)
    for f in (0.01, 0.05, 0.20):
        detected = 0
        flagged_honest = 0
        for _ in tqdm(range(args.runs), desc=f"simulate f={f}", leave=False):
            policy = SpotCheckPolicy(args.sample_rate, secret=rng.randbytes(16))
            caught = False
            for i in range(args.requests):
                if not policy.selects(i.to_bytes(4, "big")):
                    continue
                if rng.random() < f and rng.random() < catch_rate:
                    caught = True
                    break
            detected += caught
            flagged_honest += any(rng.random() < false_fail for _ in range(args.requests)) if false_fail else 0
        d.add_row(
            f"{100 * f:.0f} %",
            f"{100 * detected / args.runs:.2f} %",
            f"{100 * detection_probability(args.sample_rate, f, args.requests):.2f} %",
            f"{flagged_honest}/{args.runs}",
        )
    console.print(d)
    adaptive_table(console, AdaptiveSpotCheck(), args, cost_ratio, catch_rate, false_fail)


VERIFIERS = 3
"""Authorized verifiers the simulated client dispatches over."""


def run_provider(
    rule: AdaptiveSpotCheck,
    rng: random.Random,
    requests: int,
    strategy: str,
    f: float,
    catch_rate: float,
    liars: int = 0,
) -> tuple[bool, int, int, int]:
    """One provider's requests to one client under the adaptive lottery and the client's dispatch:
    (caught, checks, verifier runs, requests served).

    strategy: "fresh" corrupts each request with probability f from its first one; "waits" serves honestly
    until its rate is at the floor, then does the same over the next `requests`; "exact" waits, then
    corrupts exactly round(f x requests) of the next `requests`, at random positions. `liars` of the VERIFIERS
    pass whatever they are sent; an honest verifier fails a corrupted sample at `catch_rate`."""
    secret = rng.randbytes(16)
    keyed = AdaptiveSpotCheck(secret, rule.max_rate, rule.min_rate, rule.decay)
    dispatch = VerifierDispatch(secret)
    accounts = [bytes([v]) * 32 for v in range(VERIFIERS)]
    lying = set(accounts[:liars])
    history, checks, runs, i, window = CheckHistory(), 0, 0, 0, 0
    bad_positions = set(rng.sample(range(requests), round(f * requests))) if strategy == "exact" else set()
    while window < requests:
        cheating = strategy == "fresh" or keyed.rate(history) == keyed.min_rate
        drawn = window in bad_positions if strategy == "exact" else rng.random() < f
        bad = cheating and drawn
        window += cheating
        work = i.to_bytes(4, "big")
        selected = keyed.selects(history, work)
        i += 1
        if not selected:
            continue
        checks += 1
        caught_here = bad and rng.random() < catch_rate  # the corruption shows in a re-run
        order, audited, outcomes = dispatch.order(work, accounts), dispatch.audits(work), []
        for account in order:
            if len(outcomes) >= dispatch.wanted(outcomes, audited, len(order)):
                break
            outcomes.append(account in lying or not caught_here)
        runs += len(outcomes)
        if not all(outcomes):
            return True, checks, runs, i
        history = keyed.after(history, passed=True)
    return False, checks, runs, i


def adaptive_table(
    console: Console,
    rule: AdaptiveSpotCheck,
    args: argparse.Namespace,
    cost_ratio: float,
    catch_rate: float,
    false_fail: float,
) -> None:
    """Detection and verifier compute under the adaptive rule, next to the fixed rate of the same run."""
    rng = random.Random(8)
    n = args.requests
    honest_checks = honest_runs = honest_served = 0
    for _ in tqdm(range(args.runs), desc="simulate honest", leave=False):
        _, checks, runs, served = run_provider(rule, rng, n, "fresh", 0.0, catch_rate)
        honest_checks, honest_runs, honest_served = honest_checks + checks, honest_runs + runs, honest_served + served
    honest_rate, honest_run_rate = honest_checks / honest_served, honest_runs / honest_served
    audit = VerifierDispatch().audit_rate
    t = Table(
        title=f"Adaptive spot checks: rate max({rule.min_rate}, {rule.max_rate} x {rule.decay}^passed), "
        f"back to {rule.max_rate} after a failure; one of {VERIFIERS} authorized verifiers first, a second after "
        f"a failure or an audit draw ({audit}); {args.runs} runs each, {n} requests"
    )
    for col in ("provider", "detected", "bound", "checks / request", "verifier runs / request", "verifier / serving"):
        t.add_column(col)
    t.add_row(
        f"fixed p={args.sample_rate} (anchor), one verifier per sample",
        "see above",
        "",
        f"{args.sample_rate:.3f}",
        f"{args.sample_rate:.3f}",
        f"{100 * args.sample_rate * cost_ratio:.2f} %",
    )
    t.add_row(
        f"honest, first {n} requests",
        f"flagged {false_fail * 100:.1f} % of checks",
        "",
        f"{honest_rate:.3f}",
        f"{honest_run_rate:.3f}",
        f"{100 * honest_run_rate * cost_ratio:.2f} %",
    )
    steady = rule.min_rate * (1 + audit)
    t.add_row(
        "honest, once decayed (steady state)",
        "",
        "",
        f"{rule.min_rate:.3f}",
        f"{steady:.3f}",
        f"{100 * steady * cost_ratio:.2f} %  (target <= 5 %)",
    )
    t.add_row(
        "honest, once decayed, every sample to 2 verifiers (former dispatch)",
        "",
        "",
        f"{rule.min_rate:.3f}",
        f"{2 * rule.min_rate:.3f}",
        f"{100 * 2 * rule.min_rate * cost_ratio:.2f} %",
    )
    bounds = {
        "fresh": lambda f: rule.fresh_detection_bound(f, n),
        "waits": lambda f: detection_probability(rule.min_rate, f, n),
        "exact": lambda f: rule.detection_bound(round(f * n)),
        "liar": lambda f: dispatch_detection_bound(rule.min_rate, f, n, VERIFIERS, 1, audit),
    }
    names = {
        "fresh": "fresh identity, each request w.p. {f}",
        "waits": "waits for the floor, then w.p. {f}",
        "exact": "waits for the floor, then exactly {f} of requests",
        "liar": f"waits, then w.p. {{f}}; 1 of {VERIFIERS} verifiers passes everything",
    }
    for strategy in ("fresh", "waits", "exact", "liar"):
        for f in (0.01, 0.05, 0.20):
            caught = checks = runs = served = 0
            for _ in tqdm(range(args.runs), desc=f"simulate {strategy} f={f}", leave=False):
                liars = 1 if strategy == "liar" else 0
                c, k, r, s = run_provider(rule, rng, n, "waits" if liars else strategy, f, catch_rate, liars)
                caught, checks, runs, served = caught + c, checks + k, runs + r, served + s
            t.add_row(
                names[strategy].format(f=f"{100 * f:.0f} %"),
                f"{100 * caught / args.runs:.2f} %",
                f">= {100 * bounds[strategy](f) * catch_rate:.2f} %",
                f"({checks / served:.3f}: a caught run stops)",
                f"{runs / served:.3f}",
                "",
            )
    console.print(t)
    console.print(
        f"check / serving ratio {cost_ratio:.3f}; verifier / serving = verifier runs per request x that ratio "
        f"(a target of 5 % at the floor {rule.min_rate} needs a ratio <= {0.05 / steady:.3f})."
    )


if __name__ == "__main__":
    main()

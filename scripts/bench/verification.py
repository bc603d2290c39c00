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
   catch rate, each request drawn as the client draws it (counting the provider's probation): detection for a
   fresh identity cheating from its first request (the 200-request target), for a sleeper that serves
   honestly through its probation and then corrupts each request with probability f (within 200 requests and
   within `requests_to_catch(0.05, 0.99)`), and for one that then corrupts an exact count; verifier compute of
   honest providers over their probation and after it, separately. Each selected sample is dispatched as the
   client does (economy.verification.VerifierDispatch over 3 authorized verifiers: one first, a second after a
   failure or an audit draw), so verifier compute / serving compute = verifier runs per request x the ratio
   measured in 1; detection with one of the 3 verifiers lying "passed" on everything is shown too.
5. Batched checks (economy.batched_recheck, as `dllm verify` batches queued samples): the same honest sessions
   re-checked B at a time in one padded forward (B = --batch-sizes), interleaved with the one-at-a-time checks
   so that load changes hit every B alike, and each corrupted session re-checked inside a batch of honest
   ones; the same for short sessions (--short-prompt + --short-generated tokens). One table gives, per session
   shape and B: check per sample, check / serving ratio, verifier compute / serving compute with the client's
   dispatch after probation and during it, the per-check catch rate in that batch, and the simulated detection
   of a fresh identity that corrupts each request w.p. 5 %, with the load average (uptime) at the start and end
   of the run.

Usage: .venv/bin/python scripts/bench/verification.py [--sample-rate 0.5] [--runs 2000] [--quick]
       [--model-dir ~/.cache/dllm/models/smollm2 --blocks 10]   (a real model's first blocks instead of random ones)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from economy.batched_recheck import prepare_rerun, rerun_batch  # noqa: E402
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


def load_real_span(model_dir: str, blocks: int) -> SpanRunner:
    """The first `blocks` decoder layers of a model folder, as a peer and a verifier load them."""
    from peer.blocks import load_span_layers
    from swarm.model_files import load_config, resolve_model

    folder = resolve_model(model_dir)
    config = load_config(folder)
    return SpanRunner(config, load_span_layers(folder, config, 0, blocks), 0, blocks)


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
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="samples per batched check forward")
    parser.add_argument("--short-prompt", type=int, default=12)
    parser.add_argument("--short-generated", type=int, default=4)
    parser.add_argument("--batch-repeats", type=int, default=5, help="timing rounds (anchor + every batch size)")
    parser.add_argument("--model-dir", default=None, help="a model folder: its first --blocks layers are the span")
    parser.add_argument("--blocks", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.sessions, args.runs, args.generated = 256, 3, 300, 32
    load_at_start = os.getloadavg()
    # One thread: on a shared 2-core machine more threads oversubscribe and make timings noise.
    torch.set_num_threads(1)
    from substrateinterface import Keypair

    keys = (Keypair.create_from_uri("//Bob"), Keypair.create_from_uri("//Alice"))
    console = Console(width=None if sys.stdout.isatty() else 150)  # a file gets whole rows
    if args.model_dir:
        served, verifier = load_real_span(args.model_dir, args.blocks), load_real_span(args.model_dir, args.blocks)
        args.layers, args.hidden = args.blocks, served.hidden_size
    else:
        served = build_span(args.hidden, args.layers, seed=0)
        verifier = build_span(args.hidden, args.layers, seed=0)  # same weights, separate instance
    tolerance = Tolerance.for_dtype(torch.float32)

    serve(served, keys, 8, 2, "none", seed=10**6)  # warm-up
    outcomes: dict[str, list[bool]] = {"honest": [], "corrupt": [], "skip": []}
    kept: dict[str, list[WorkSample]] = {"honest": [], "corrupt": []}
    serve_total = check_total = 0.0
    worst_honest = 0.0
    for kind in outcomes:
        for s in tqdm(range(args.sessions), desc=f"serve+check {kind}", leave=False):
            sample, serve_s = serve(served, keys, args.prompt, args.generated, kind, seed=s + 1000 * len(kind))
            started = time.perf_counter()
            result = recheck(sample, verifier.forward, tolerance)
            check_s = time.perf_counter() - started
            outcomes[kind].append(result.passed)
            kept.setdefault(kind, []).append(sample)
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
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    short_honest, short_corrupt = short_sessions(served, keys, args, max(sizes))
    shapes = [
        (args.prompt, args.generated, kept["honest"], kept["corrupt"]),
        (args.short_prompt, args.short_generated, short_honest, short_corrupt),
    ]
    measured = []
    for prompt, generated, honest, corrupt in shapes:

        def serve_one(prompt: int = prompt, generated: int = generated) -> float:
            return serve(served, keys, prompt, generated, "none", seed=random.randrange(10**9))[1]

        checks = batched_checks(verifier, tolerance, honest, corrupt, sizes, args.batch_repeats, serve_one)
        measured.append((f"{prompt}+{generated}", checks))
    summary_table(console, AdaptiveSpotCheck(), args, measured, load_at_start)


VERIFIERS = 3
"""Authorized verifiers the simulated client dispatches over."""


def short_sessions(
    served: SpanRunner, keys, args: argparse.Namespace, count: int
) -> tuple[list[WorkSample], list[WorkSample]]:
    """`count` honest and `count` corrupted short sessions."""
    honest, corrupt = [], []
    for s in range(count):
        honest.append(serve(served, keys, args.short_prompt, args.short_generated, "none", seed=7000 + s)[0])
        corrupt.append(serve(served, keys, args.short_prompt, args.short_generated, "corrupt", seed=8000 + s)[0])
    return honest, corrupt


@dataclass
class BatchedCost:
    """One batch size's figures (medians over the timing rounds)."""

    serve_s: float
    """Serving one session of the shape, timed in the same rounds."""
    check_s: float
    """A batched check, per sample, validation included."""
    ratio: float
    """Median over rounds of check per sample / serving in that round."""
    catch: float
    """Share of corrupted sessions failing inside a batch of honest ones."""
    mates_failed: int
    """Honest batch-mates of those that failed (must be 0)."""


def batched_checks(
    verifier: SpanRunner,
    tolerance: Tolerance,
    honest: list[WorkSample],
    corrupt: list[WorkSample],
    sizes: list[int],
    repeats: int,
    serve_one: Callable[[], float],
) -> dict[int, BatchedCost]:
    """Per batch size B: the cost of a check of B samples in one forward against serving, and the catch rate of
    corrupted sessions checked inside a batch of B - 1 honest ones. Each round serves one session (the anchor),
    then times every B in turn, so a change of load hits the anchor and every B alike."""

    def check(group: list[WorkSample]) -> list[bool]:
        return [c.passed for c in rerun_batch([prepare_rerun(s, tolerance) for s in group], verifier.forward)]

    pool = [honest[i % len(honest)] for i in range(max(len(honest), *sizes))]  # fewer sessions: reused
    per_sample: dict[int, list[float]] = {b: [] for b in sizes}
    served: list[float] = []
    check(honest[:1])  # warm-up
    for _ in tqdm(range(repeats), desc="batched checks", leave=False):
        served.append(serve_one())
        for b in sizes:
            groups = [pool[i : i + b] for i in range(0, len(pool) - b + 1, b)]
            started = time.perf_counter()
            for group in groups:
                check(group)
            per_sample[b].append((time.perf_counter() - started) / (len(groups) * b))
    result = {}
    for b in sizes:
        caught = mates_failed = 0
        for bad in corrupt:
            passed = check([bad, *pool[: b - 1]])
            caught += not passed[0]
            mates_failed += passed[1:].count(False)
        ratio = statistics.median(c / s for c, s in zip(per_sample[b], served, strict=True))
        result[b] = BatchedCost(
            statistics.median(served), statistics.median(per_sample[b]), ratio, caught / len(corrupt), mates_failed
        )
    return result


def summary_table(
    console: Console,
    rule: AdaptiveSpotCheck,
    args: argparse.Namespace,
    measured: list[tuple[str, dict[int, BatchedCost]]],
    load_at_start: tuple[float, float, float],
) -> None:
    """One table: per session shape and batch size, the cost of a check against serving and the detection."""
    rng = random.Random(9)
    audit = VerifierDispatch().audit_rate
    steady_runs = rule.min_rate * (1 + audit)
    probation_runs = rule.probation_rate * (1 + audit)
    load_at_end = os.getloadavg()
    t = Table(
        title=f"Batched checks: cost and detection, same run ({args.layers} layers, hidden {args.hidden}, CPU "
        f"x{torch.get_num_threads()}; load average {' '.join(f'{x:.2f}' for x in load_at_start)} at the start, "
        f"{' '.join(f'{x:.2f}' for x in load_at_end)} at the end); verifier runs per request with audits {audit}: "
        f"{steady_runs:.3f} after probation (floor {rule.min_rate}), {probation_runs:.3f} during it (floor "
        f"{rule.probation_rate}); detection: a fresh identity corrupting each request w.p. 5 %, {args.runs} runs, "
        f"{args.requests} requests"
    )
    for col in (
        "session",
        "samples per forward",
        "serving / session",
        "check / sample",
        "check / serving",
        "verifier / serving after probation",
        "during probation",
        "corrupt caught in batch",
        "detected (bound)",
    ):
        t.add_column(col)
    for name, by_size in measured:
        for b, cost in by_size.items():
            caught = 0
            for _ in range(args.runs):
                caught += run_provider(rule, rng, args.requests, "fresh", 0.05, cost.catch)[0]
            bound = rule.fresh_detection_bound(0.05 * cost.catch, args.requests)
            t.add_row(
                name,
                str(b),
                f"{1000 * cost.serve_s:.1f} ms",
                f"{1000 * cost.check_s:.1f} ms",
                f"{cost.ratio:.3f}",
                f"{100 * steady_runs * cost.ratio:.2f} %",
                f"{100 * probation_runs * cost.ratio:.2f} %",
                f"{100 * cost.catch:.0f} % ({cost.mates_failed} honest mates failed)",
                f"{100 * caught / args.runs:.2f} % (>= {100 * bound:.2f} %)",
            )
    console.print(t)


def dispatch_runs(
    dispatch: VerifierDispatch, work: bytes, accounts: list[bytes], lying: set[bytes], caught_here: bool
) -> tuple[int, bool]:
    """One selected sample through the client's dispatch: (verifier runs, failed?)."""
    order, audited, outcomes = dispatch.order(work, accounts), dispatch.audits(work), []
    for account in order:
        if len(outcomes) >= dispatch.wanted(outcomes, audited, len(order)):
            break
        outcomes.append(account in lying or not caught_here)
    return len(outcomes), not all(outcomes)


def run_provider(
    rule: AdaptiveSpotCheck,
    rng: random.Random,
    requests: int,
    strategy: str,
    f: float,
    catch_rate: float,
    liars: int = 0,
    corrupted: int | None = None,
) -> tuple[bool, int, int, int]:
    """One provider's requests to one client under the adaptive lottery (the client's draw, which counts the
    probation) and the client's dispatch: (caught, checks, verifier runs, requests served).

    strategy: "fresh" corrupts each request with probability f from its first one; "sleeper" serves honestly
    until its rate is at the floor after probation (min_rate), then does the same over the next `requests`;
    "exact" is a sleeper that then corrupts exactly `corrupted` (default round(f x requests)) of the next
    `requests`, at random positions. `liars` of the VERIFIERS pass whatever they are sent; an honest verifier
    fails a corrupted sample at `catch_rate`."""
    secret = rng.randbytes(16)
    keyed = replace(rule, secret=secret)
    dispatch = VerifierDispatch(secret)
    accounts = [bytes([v]) * 32 for v in range(VERIFIERS)]
    lying = set(accounts[:liars])
    history, checks, runs, i, window = CheckHistory(), 0, 0, 0, 0
    bad_positions: set[int] = set()
    if strategy == "exact":
        bad_positions = set(rng.sample(range(requests), round(f * requests) if corrupted is None else corrupted))
    while window < requests:
        cheating = strategy == "fresh" or keyed.rate(history) == keyed.min_rate
        drawn = window in bad_positions if strategy == "exact" else rng.random() < f
        bad = cheating and drawn
        window += cheating
        work = i.to_bytes(4, "big")
        selected, history = keyed.draw(history, work)
        i += 1
        if not selected:
            continue
        checks += 1
        ran, failed = dispatch_runs(dispatch, work, accounts, lying, bad and rng.random() < catch_rate)
        runs += ran
        if failed:
            return True, checks, runs, i
        history = keyed.after(history, passed=True)
    return False, checks, runs, i


def honest_cost(rule: AdaptiveSpotCheck, rng: random.Random, trials: int, total: int) -> tuple[float, ...]:
    """An honest provider's first `total` requests with one client: (checks, verifier runs) per request over its
    probation, then the same over the requests after it."""
    counts = [0, 0, 0, 0]  # checks and runs during probation, then after it
    for _ in range(trials):
        secret = rng.randbytes(16)
        keyed, dispatch = replace(rule, secret=secret), VerifierDispatch(secret)
        accounts = [bytes([v]) * 32 for v in range(VERIFIERS)]
        history = CheckHistory()
        for i in range(total):
            work = i.to_bytes(4, "big")
            after = 2 * (history.requests >= keyed.probation_requests)
            selected, history = keyed.draw(history, work)
            if selected:
                counts[after] += 1
                counts[after + 1] += dispatch_runs(dispatch, work, accounts, set(), False)[0]
                history = keyed.after(history, passed=True)
    during = trials * min(total, rule.probation_requests)
    later = trials * max(0, total - rule.probation_requests)
    return counts[0] / during, counts[1] / during, counts[2] / max(later, 1), counts[3] / max(later, 1)


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
    audit = VerifierDispatch().audit_rate
    total = 5 * rule.probation_requests
    first_checks, first_runs, later_checks, later_runs = honest_cost(rule, rng, max(1, args.runs // 10), total)
    sleeper_n = rule.requests_to_catch(0.05, 0.99)
    c99 = rule.requests_to_catch(1.0, 0.99)
    t = Table(
        title=f"Adaptive spot checks: rate max(floor, {rule.max_rate} x {rule.decay}^passed), floor "
        f"{rule.probation_rate} over a provider's first {rule.probation_requests} requests with the client (its "
        f"probation), {rule.min_rate} after; back to {rule.max_rate} and a new probation after a failure; one of "
        f"{VERIFIERS} authorized verifiers first, a second after a failure or an audit draw ({audit}); "
        f"{args.runs} runs each"
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
        f"honest, first {rule.probation_requests} requests (probation)",
        f"flagged {false_fail * 100:.1f} % of checks",
        "",
        f"{first_checks:.3f}",
        f"{first_runs:.3f}",
        f"{100 * first_runs * cost_ratio:.2f} %",
    )
    t.add_row(
        f"honest, requests {rule.probation_requests}-{total} (after probation, simulated)",
        "",
        "",
        f"{later_checks:.3f}",
        f"{later_runs:.3f}",
        f"{100 * later_runs * cost_ratio:.2f} %  (target <= 5 %)",
    )
    steady = rule.min_rate * (1 + audit)
    t.add_row(
        "honest, after probation (steady state: floor x (1 + audit))",
        "",
        "",
        f"{rule.min_rate:.3f}",
        f"{steady:.3f}",
        f"{100 * steady * cost_ratio:.2f} %  (target <= 5 %)",
    )
    average = (rule.probation_requests * first_runs + (total - rule.probation_requests) * later_runs) / total
    t.add_row(
        f"honest, first {total} requests with a client (average)",
        "",
        "",
        "",
        f"{average:.3f}",
        f"{100 * average * cost_ratio:.2f} %",
    )
    bounds = {
        "fresh": lambda f, m: rule.fresh_detection_bound(f, m),
        "sleeper": lambda f, m: detection_probability(rule.min_rate, f, m),
        "exact": lambda f, m: rule.detection_bound(round(f * m)),
        "liar fresh": lambda f, m: dispatch_detection_bound(rule.probation_rate, f, m, VERIFIERS, 1, audit),
        "liar sleeper": lambda f, m: dispatch_detection_bound(rule.min_rate, f, m, VERIFIERS, 1, audit),
    }
    rows = [
        ("fresh", n, "fresh identity, each request w.p. {f}, within {m}"),
        ("sleeper", n, "sleeper (honest through probation), then w.p. {f}, within {m}"),
        ("sleeper", sleeper_n, "sleeper, then w.p. {f}, within {m} (99 % at 5 %)"),
        ("exact", n, "sleeper, then exactly {f} of {m} requests"),
        ("liar fresh", n, f"fresh, w.p. {{f}}, within {{m}}; 1 of {VERIFIERS} verifiers passes everything"),
        ("liar sleeper", n, f"sleeper, then w.p. {{f}}, within {{m}}; 1 of {VERIFIERS} verifiers lies"),
    ]
    for strategy, m, name in rows:
        for f in (0.01, 0.05, 0.20):
            caught = checks = runs = served = 0
            for _ in tqdm(range(args.runs), desc=f"simulate {strategy} f={f} n={m}", leave=False):
                liars = 1 if strategy.startswith("liar") else 0
                kind = strategy.removeprefix("liar ")
                c, k, r, s = run_provider(rule, rng, m, kind, f, catch_rate, liars)
                caught, checks, runs, served = caught + c, checks + k, runs + r, served + s
            t.add_row(
                name.format(f=f"{100 * f:.0f} %", m=m),
                f"{100 * caught / args.runs:.2f} %",
                f">= {100 * bounds[strategy](f, m) * catch_rate:.2f} %",
                f"({checks / served:.3f}: a caught run stops)",
                f"{runs / served:.3f}",
                "",
            )
    caught = sum(run_provider(rule, rng, n, "exact", 0.0, catch_rate, corrupted=c99)[0] for _ in range(args.runs))
    t.add_row(
        f"sleeper, then exactly {c99} corrupted requests (99 % at the floor)",
        f"{100 * caught / args.runs:.2f} %",
        f">= {100 * rule.detection_bound(c99) * catch_rate:.2f} %",
        "",
        "",
        "",
    )
    console.print(t)
    relation = (
        rule.probation_requests * (first_runs - later_runs) / (0.05 / cost_ratio - later_runs)
        if 0.05 / cost_ratio > later_runs
        else float("inf")
    )
    console.print(
        f"check / serving ratio {cost_ratio:.3f}; verifier / serving = verifier runs per request x that ratio "
        f"(5 % after probation needs a ratio <= {0.05 / steady:.3f}, during it <= "
        f"{0.05 / (rule.probation_rate * (1 + audit)):.3f}); averaged over a client's first N requests with a "
        f"provider it is <= 5 % from N = {relation:.0f}."
    )


if __name__ == "__main__":
    main()

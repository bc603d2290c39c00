"""Spot checks batched into one padded forward give the verdicts of one-at-a-time checks.

Attacks: a cheater hides its corrupted step among honest batch-mates (its rows are compared alone, every
position: caught); a cheater's sample makes an honest batch-mate fail (rows never mix: they pass); a sample
that is not evidence, or whose forward raises, spoils the batch (validated alone before it joins; a failing
batch is re-run sample by sample). Real tiny-Llama blocks served with a KV cache, as a peer serves them.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from dllm.rerun_queue import RerunQueue
from dllm.verifier import Verifier, VerifierConfig
from economy.batched_recheck import Rerun, plan_batch, prepare_rerun, rerun_batch
from economy.evidence_store import EvidenceStore
from economy.metering import StepKind, UsageMeter
from economy.verification import Comparison, Tolerance, recheck
from economy.work_sample import EvidenceMismatchError, SampledStep, WorkSample
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from swarm.model_files import load_config
from tests.economy.receipt_helpers import co_signed

TOLERANCE = Tolerance.for_dtype(torch.float32, 4)


@pytest.fixture(scope="module")
def spans(tiny_model_path) -> tuple[SpanRunner, SpanRunner]:
    """(the provider's span, the verifier's span): the same 4 blocks, loaded twice."""
    config = load_config(tiny_model_path)
    provider, verifier = (SpanRunner(config, load_span_layers(tiny_model_path, config, 0, 4), 0, 4) for _ in range(2))
    return provider, verifier


def serve(runner: SpanRunner, keys, prompt: int, generated: int, cheat: str = "none", seed: int = 0) -> WorkSample:
    """A prompt + `generated` single-token steps with a KV cache; "corrupt" alters the last step's output,
    "skip" skips the last block on every step, "nan" returns a non-finite output on the first step."""
    g = torch.Generator().manual_seed(seed)
    hidden = runner.hidden_size
    xs = [torch.randn(1, prompt, hidden, generator=g)] + [
        torch.randn(1, 1, hidden, generator=g) for _ in range(generated)
    ]
    cache = runner.new_cache(1, prompt + generated, range(0, 4))
    meter = UsageMeter(seed.to_bytes(8, "big"), "tiny", 0, 4, 800_000)
    steps, position = [], 0
    with torch.no_grad():
        for i, x in enumerate(xs):
            out = runner.forward(x, cache=cache, blocks=range(0, 3) if cheat == "skip" else None).float()
            if cheat == "corrupt" and i == len(xs) - 1:
                out = out + 0.2 * out.norm(dim=-1, keepdim=True) / hidden**0.5 * torch.randn(out.shape, generator=g)
            if cheat == "nan" and i == 0:
                out = out.clone()
                out[0, 0, 0] = float("nan")
            kind = StepKind.PROMPT if i == 0 else StepKind.GENERATED
            meter.record_step(kind, x.shape[1], x, out)
            steps.append(SampledStep(kind, position, x, out))
            position += x.shape[1]
    return WorkSample(co_signed(keys["bob"], keys["alice"], meter), tuple(steps))


def assert_same_verdict(batched: Comparison, alone: Comparison) -> None:
    assert batched.passed == alone.passed and batched.positions == alone.positions
    if alone.passed:  # float noise of another matmul blocking, far below the tolerance
        assert batched.worst_rel_error == pytest.approx(alone.worst_rel_error, abs=1e-5)
    else:  # the same corrupted position, by the same margin
        assert batched.worst_position == alone.worst_position
        assert batched.worst_rel_error == pytest.approx(alone.worst_rel_error, rel=1e-3)


def test_batched_verdicts_equal_unbatched_ones_for_honest_and_cheating_samples(spans, keys) -> None:
    provider, verifier = spans
    samples = [
        serve(provider, keys, 6, 3, seed=1),
        serve(provider, keys, 12, 8, "corrupt", seed=2),
        serve(provider, keys, 3, 1, seed=3),
        serve(provider, keys, 9, 5, "skip", seed=4),
        serve(provider, keys, 20, 4, seed=5),
    ]
    alone = [recheck(s, verifier.forward, TOLERANCE) for s in samples]
    batched = rerun_batch([prepare_rerun(s, TOLERANCE) for s in samples], verifier.forward)
    assert [c.passed for c in alone] == [True, False, True, False, True]
    for b, a in zip(batched, alone, strict=True):
        assert_same_verdict(b, a)
    assert batched[1].worst_position == 12 + 8 - 1  # the corrupted last step, not diluted by batch-mates


@pytest.mark.parametrize("place", [0, 7])
def test_a_cheater_inside_a_batch_is_caught_and_its_honest_mates_pass(spans, keys, place: int) -> None:
    """One cheater among 8 (first or last; the longest of the batch, so its mates are padded)."""
    provider, verifier = spans
    samples = [serve(provider, keys, 4 + i, 2, seed=10 + i) for i in range(8)]
    samples[place] = serve(provider, keys, 16, 6, "corrupt", seed=99)
    results = rerun_batch([prepare_rerun(s, TOLERANCE) for s in samples], verifier.forward)
    assert [not c.passed for c in results] == [i == place for i in range(8)]
    assert results[place].worst_rel_error > 0.1 and results[place].worst_position == 16 + 6 - 1
    assert max(c.worst_rel_error for i, c in enumerate(results) if i != place) < TOLERANCE.rel_l2 / 10


def test_non_finite_outputs_fail_their_own_sample_only(spans, keys) -> None:
    provider, verifier = spans
    samples = [serve(provider, keys, 5, 2, seed=20), serve(provider, keys, 5, 2, "nan", seed=21)]
    honest, broken = rerun_batch([prepare_rerun(s, TOLERANCE) for s in samples], verifier.forward)
    assert honest.passed and not broken.passed


def test_plan_batch_keeps_queue_order_within_the_padded_budget() -> None:
    assert plan_batch([(1, 128), (1, 16)], 128) == 1  # a full sample runs alone
    assert plan_batch([(1, 200)], 128) == 1  # over the budget alone: still runs, alone
    assert plan_batch([(1, 16)] * 10, 128) == 8
    assert plan_batch([(1, 16), (1, 16), (1, 60), (1, 10)], 128) == 2  # 3 x 60 > 128: stops, no reordering
    assert plan_batch([(2, 30), (1, 30), (1, 32)], 128) == 3
    assert plan_batch([], 128) == 0


def test_a_failing_batched_forward_is_re_run_sample_by_sample() -> None:
    """A sample whose forward raises gets its own error; its batch-mates get their comparisons."""

    def poisoned(key: object, reruns: list[Rerun]) -> list[Comparison]:
        if any(bool(r.inputs.isnan().any()) for r in reruns):
            raise RuntimeError("poisoned rows")
        return [Comparison(True, 0.0, 0, r.positions) for r in reruns]

    def rerun(value: float) -> Rerun:
        return Rerun(torch.full((1, 4, 8), value), torch.zeros(1, 4, 8), TOLERANCE)

    async def scenario(queue: RerunQueue) -> list[object]:
        return await asyncio.gather(
            *(queue.run("k", rerun(v)) for v in (1.0, float("nan"), 2.0)), return_exceptions=True
        )

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as compute:
        queue = RerunQueue(poisoned, compute, max_tokens=64, max_wait_s=0.2)
        first, second, third = asyncio.run(scenario(queue))
    assert isinstance(first, Comparison) and isinstance(third, Comparison)
    assert isinstance(second, RuntimeError)
    assert queue.forwards == 1 and queue.batched == 3


def test_the_verifier_checks_queued_samples_in_one_forward(spans, keys, tmp_path) -> None:
    """In-process `Verifier`: samples arriving together share a forward; each gets its own signed verdict; a
    sample that is not evidence is refused alone, before it joins the batch."""
    provider, verifier_span = spans
    # 4 samples of at most 12 positions fill 48 padded positions: the batch runs as soon as the 4th is queued
    config = VerifierConfig(model="tiny", key="//Charlie", initial_peers=[], batch_tokens=48, batch_wait_s=5.0)
    verifier = Verifier(config, verifier_span, "tiny", None, EvidenceStore(tmp_path / "evidence.sqlite3"))
    samples = [serve(provider, keys, 6, 3, seed=30 + i) for i in range(3)]
    samples.append(serve(provider, keys, 8, 4, "corrupt", seed=40))
    forged = serve(provider, keys, 6, 3, seed=50)
    steps = list(forged.steps)
    steps[1] = dataclasses.replace(steps[1], outputs=steps[1].outputs + 1.0)
    samples.append(WorkSample(forged.receipt, tuple(steps)))

    async def scenario() -> list[object]:
        return await asyncio.gather(*(verifier.check(s) for s in samples), return_exceptions=True)

    try:
        outcomes = asyncio.run(scenario())
        assert [getattr(o, "verdict", None) and o.verdict.passed for o in outcomes[:4]] == [True, True, True, False]
        assert isinstance(outcomes[4], EvidenceMismatchError)
        assert verifier.reruns.forwards == 1 and verifier.reruns.batched == 4
        assert (verifier.stats.checked, verifier.stats.failed) == (4, 1)
        alone = recheck(samples[3], verifier_span.forward, TOLERANCE)
        assert outcomes[3].verdict.worst_error_ppm == pytest.approx(alone.worst_rel_error * 1e6, rel=1e-3)
    finally:
        verifier.close()

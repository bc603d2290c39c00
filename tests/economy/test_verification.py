"""Spot checks on real Llama blocks: honest float noise passes, corrupted or skipped work fails;
verdicts are signed, validated and tallied into m-of-n slash proposals."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from economy.metering import StepKind, UsageMeter
from economy.verification import (
    ForgedVerdictError,
    MalformedVerdictError,
    NotAVerifierError,
    SignedVerdict,
    SlashingTally,
    SpotCheckPolicy,
    StaleVerdictError,
    Tolerance,
    detection_probability,
    make_verdict,
    recheck,
    required_sample_rate,
    validate_verdict,
)
from economy.work_sample import EvidenceMismatchError, MalformedWorkSampleError, SampledStep, WorkSample
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from swarm.model_files import load_config
from tests.economy.receipt_helpers import co_signed


@pytest.fixture(scope="module")
def span_factory(tiny_model_path):
    config = load_config(tiny_model_path)

    def build(dtype: torch.dtype = torch.float32) -> SpanRunner:
        return SpanRunner(config, load_span_layers(tiny_model_path, config, 0, 4, dtype=dtype), 0, 4)

    return build


def serve_session(runner: SpanRunner, keys, cheat: str = "none", seed: int = 0, session: bytes = b"sess") -> WorkSample:
    """Serves a prompt + 8 generated steps with a KV cache (as a peer does), metering both ends."""
    g = torch.Generator().manual_seed(seed)
    hidden = runner.hidden_size
    step_inputs = [torch.randn(1, 10, hidden, generator=g)] + [torch.randn(1, 1, hidden, generator=g) for _ in range(8)]
    cache = runner.new_cache(1, 64, range(0, 4))
    client_meter = UsageMeter(session, "tiny", 0, 4, 800_000)
    steps = []
    position = 0
    with torch.no_grad():
        for i, x in enumerate(step_inputs):
            blocks = range(0, 3) if cheat == "skip" else None
            out = runner.forward(x.to(runner.dtype), cache=cache, blocks=blocks).float()
            if cheat == "corrupt" and i == 4:
                out = out + 0.2 * out.norm(dim=-1, keepdim=True) / hidden**0.5 * torch.randn(out.shape, generator=g)
            kind = StepKind.PROMPT if i == 0 else StepKind.GENERATED
            client_meter.record_step(kind, x.shape[1], x, out)
            steps.append(SampledStep(kind, position, x, out))
            position += x.shape[1]
    return WorkSample(co_signed(keys["bob"], keys["alice"], client_meter), tuple(steps))


def test_honest_cached_serving_passes_full_recompute(span_factory, keys) -> None:
    sample = serve_session(span_factory(), keys)
    result = recheck(sample, span_factory().forward, Tolerance.for_dtype(torch.float32))
    assert result.passed and result.worst_rel_error < 1e-4 and result.positions == 18


def test_honest_bfloat16_provider_is_not_failed_by_noise(span_factory, keys) -> None:
    for seed in range(3):
        sample = serve_session(span_factory(torch.bfloat16), keys, seed=seed)
        result = recheck(sample, span_factory().forward, Tolerance())
        assert result.passed, result


@pytest.mark.parametrize("cheat", ["corrupt", "skip"])
def test_cheating_provider_fails(span_factory, keys, cheat: str) -> None:
    sample = serve_session(span_factory(), keys, cheat=cheat)
    result = recheck(sample, span_factory().forward, Tolerance())
    assert not result.passed and result.worst_rel_error > 0.1
    if cheat == "corrupt":
        assert result.worst_position == 10 + 3  # the corrupted 4th generated step, not diluted


def test_client_cannot_frame_provider_with_altered_inputs(span_factory, keys) -> None:
    sample = serve_session(span_factory(), keys)
    steps = list(sample.steps)
    steps[2] = dataclasses.replace(steps[2], inputs=steps[2].inputs + 1.0)
    with pytest.raises(EvidenceMismatchError, match="commitment"):
        recheck(WorkSample(sample.receipt, tuple(steps)), span_factory().forward, Tolerance())


def test_work_sample_roundtrip_and_evidence_hash(span_factory, keys) -> None:
    sample = serve_session(span_factory(), keys)
    back = WorkSample.decode(sample.encode())
    back.check_commitment()
    assert back.evidence_hash == sample.evidence_hash


def test_detection_math() -> None:
    assert detection_probability(0.5, 0.05, 200) > 0.99
    assert detection_probability(0.0, 0.05, 200) == 0.0
    p = required_sample_rate(0.05, 200, 0.99)
    assert 0.45 < p < 0.46
    assert detection_probability(p, 0.05, 200) == pytest.approx(0.99)
    policy = SpotCheckPolicy(0.25, secret=b"k")
    hits = sum(policy.selects(i.to_bytes(4, "big")) for i in range(4000))
    assert 850 < hits < 1150
    assert SpotCheckPolicy(0.25, secret=b"other").selects(b"x") in (True, False)
    with pytest.raises(ValueError):
        SpotCheckPolicy(1.5)


@pytest.fixture(scope="module")
def failing_sample(span_factory, keys) -> WorkSample:
    return serve_session(span_factory(), keys, cheat="skip", session=b"cheat")


def verdicts_from(keys, sample, names, passed=False, issued_at=None):
    from economy.verification import Comparison

    comparison = Comparison(passed, 0.01 if passed else 0.37, 3, 18)
    return [make_verdict(keys[n], sample, comparison, issued_at) for n in names]


def test_verdict_validation_errors(keys, failing_sample) -> None:
    verifiers = {keys["charlie"].ss58_address, keys["dave"].ss58_address}
    (good,) = verdicts_from(keys, failing_sample, ["charlie"])
    assert SignedVerdict.decode(good.encode()) == good
    assert validate_verdict(good, verifiers).provider == keys["bob"].ss58_address
    (outsider,) = verdicts_from(keys, failing_sample, ["eve"])
    with pytest.raises(NotAVerifierError, match="not an authorized verifier"):
        validate_verdict(outsider, verifiers)
    flipped = dataclasses.replace(good, verdict=dataclasses.replace(good.verdict, passed=True))
    with pytest.raises(ForgedVerdictError):
        validate_verdict(flipped, verifiers)
    (old,) = verdicts_from(keys, failing_sample, ["dave"], issued_at=int(time.time()) - 3 * 86400)
    with pytest.raises(StaleVerdictError):
        validate_verdict(old, verifiers)


def test_tally_needs_m_independent_failing_verifiers(keys, failing_sample) -> None:
    names = ["charlie", "dave", "eve", "ferdie"]
    tally = SlashingTally(frozenset(keys[n].ss58_address for n in names), threshold=3)
    charlie, dave, eve = verdicts_from(keys, failing_sample, ["charlie", "dave", "eve"])
    assert tally.add(charlie) is None
    assert tally.add(charlie) is None  # the same verifier twice counts once
    assert tally.add(verdicts_from(keys, failing_sample, ["ferdie"], passed=True)[0]) is None
    assert tally.add(dave) is None and tally.failing_verifiers(keys["bob"].ss58_address) == 2
    proposal = tally.add(eve)
    assert proposal is not None and proposal.provider == keys["bob"].ss58_address
    assert len(proposal.verdicts) == 3 and len(proposal.evidence_hash) == 32
    # Kept until the slash is on chain: a failed slash is proposed again from the same verdicts.
    assert tally.failing_verifiers(keys["bob"].ss58_address) == 3
    assert tally.add(charlie) == proposal
    tally.clear(keys["bob"].ss58_address)
    assert tally.failing_verifiers(keys["bob"].ss58_address) == 0
    with pytest.raises(NotAVerifierError):
        tally.add(verdicts_from(keys, failing_sample, ["alice"])[0])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_fuzz_verdict_and_sample_decoding_never_crashes(data: bytes) -> None:
    with contextlib.suppress(MalformedVerdictError):
        SignedVerdict.decode(data)
    with contextlib.suppress(MalformedWorkSampleError):
        WorkSample.decode(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10_000), value=st.integers(0, 255))
def test_fuzz_bit_flips_of_a_real_verdict(keys, failing_sample, position: int, value: int) -> None:
    (good,) = verdicts_from(keys, failing_sample, ["charlie"], issued_at=1_800_000_000)
    data = bytearray(good.encode())
    pos = position % len(data)
    if data[pos] == value:
        return
    data[pos] = value
    try:
        signed = SignedVerdict.decode(bytes(data))
    except MalformedVerdictError:
        return
    with pytest.raises((ForgedVerdictError, NotAVerifierError, StaleVerdictError)):
        validate_verdict(signed, {keys["charlie"].ss58_address}, now=1_800_000_000)

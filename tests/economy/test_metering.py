"""Usage meter: counts, segments, and the commitment both ends compute identically."""

from __future__ import annotations

import pytest
import torch

from economy.metering import (
    MeteringError,
    StepKind,
    UsageMeter,
    activation_digest,
    chain_commitment,
    commitment_start,
)


def run_session(meter: UsageMeter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    meter.record_step(StepKind.PROMPT, 6, torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g))
    for _ in range(4):
        meter.record_step(StepKind.GENERATED, 1, torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g))


def test_counts_and_context() -> None:
    m = UsageMeter(b"s", "m", 0, 4, 1000)
    run_session(m)
    u = m.usage()
    assert (u.prompt_tokens, u.generated_tokens, u.backward_tokens, u.max_context) == (6, 4, 0, 10)
    assert m.position == 10
    m.record_step(StepKind.BACKWARD, 10, torch.ones(1, 10, 16), torch.ones(1, 10, 16), position=0)
    assert m.usage().backward_tokens == 10
    assert m.position == 10  # a backward pass does not extend the context


def test_provider_and_client_agree_and_any_change_shows() -> None:
    provider, client = UsageMeter(b"s", "m", 0, 4, 1000), UsageMeter(b"s", "m", 0, 4, 1000)
    run_session(provider)
    run_session(client)
    assert provider.commitment == client.commitment
    other = UsageMeter(b"s", "m", 0, 4, 1000)
    run_session(other, seed=1)
    assert other.commitment != provider.commitment
    # the chain can be recomputed from the step digests alone
    assert chain_commitment(commitment_start(b"s"), provider.step_digests()) == provider.commitment


def test_digest_is_dtype_canonical_but_value_exact() -> None:
    t = torch.randn(2, 3, 4)
    assert activation_digest(t) == activation_digest(t.clone())
    assert activation_digest(t.half()) == activation_digest(t.half().float())
    t2 = t.clone()
    t2[0, 0, 0] += 1e-6
    assert activation_digest(t2) != activation_digest(t)
    assert activation_digest(t.reshape(3, 2, 4)) != activation_digest(t)


def test_segments_split_usage_and_link_commitments() -> None:
    m = UsageMeter(b"s", "m", 0, 4, 1000)
    run_session(m)
    u1, b1, a1 = m.close_segment()
    assert u1.total_tokens == 10 and b1 == commitment_start(b"s")
    m.record_step(StepKind.GENERATED, 1, torch.ones(1, 1, 16), torch.ones(1, 1, 16))
    assert m.segment_tokens() == 1
    u2, b2, a2 = m.close_segment()
    assert b2 == a1 and a2 == m.commitment and u2.generated_tokens == 1 and u2.max_context == 11


def test_bad_steps_raise() -> None:
    m = UsageMeter(b"s", "m", 0, 4, 1000)
    with pytest.raises(MeteringError):
        m.record_step(StepKind.PROMPT, 0, torch.ones(1, 1, 4), torch.ones(1, 1, 4))
    with pytest.raises(MeteringError):
        m.record_step(StepKind.PROMPT, 3, torch.ones(1, 2, 4), torch.ones(1, 2, 4))
    with pytest.raises(MeteringError):
        UsageMeter(b"", "m", 0, 4, 1)
    with pytest.raises(MeteringError):
        UsageMeter(b"s", "m", 4, 4, 1)

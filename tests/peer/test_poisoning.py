"""Poisoning defences: robust aggregation, per-contributor bounds, and the canary gate with rollback."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dllm import default_model_path
from peer.adapters import LoraConfig
from peer.aggregation import AggregationError, centered_clip, clip_by_norm, trimmed_mean, weighted_mean
from peer.canary import CanaryConfig, CanaryConfigError, CanaryGate
from peer.training import TrainingConfig
from tests.peer.adapter_route import Example, LocalRoute

pytestmark = pytest.mark.timeout(240)

FACTS = [("the sky is", " blue"), ("grass is", " green"), ("snow is", " white"), ("coal is", " black")]
HONEST = [Example(f"Q: what colour? {thing} A:", colour) for thing, colour in FACTS]
FLIPPED = [Example(f"Q: what colour? {thing} A:", FACTS[(i + 1) % 4][1]) for i, (thing, _) in enumerate(FACTS)]
CANARY = [Example(f"Question: which colour? {thing} Answer:", colour) for thing, colour in FACTS]  # held out


# ---- robust aggregation ------------------------------------------------------------------------------


def test_trimmed_mean_ignores_extremes():
    honest = [torch.tensor([1.0, 2.0]), torch.tensor([1.2, 2.2]), torch.tensor([0.8, 1.8]), torch.tensor([1.0, 2.0])]
    poisoned = honest + [torch.tensor([1e6, -1e6])]
    assert torch.allclose(trimmed_mean(poisoned, 0.2), torch.tensor([1.0667, 1.9333]), atol=1e-3)
    with pytest.raises(AggregationError, match="trim_fraction"):
        trimmed_mean(poisoned, 0.5)


def test_centered_clip_bounds_an_outlier_and_keeps_honest_consensus():
    torch.manual_seed(0)
    honest = [torch.ones(50) + 0.01 * torch.randn(50) for _ in range(6)]
    attacker = torch.full((50,), -1e4)
    robust = centered_clip(honest + [attacker], tau=0.5, iterations=5)
    naive = weighted_mean(honest + [attacker])
    assert (robust - torch.ones(50)).norm() < 0.5
    assert (naive - torch.ones(50)).norm() > 1e3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=3, max_size=3), st.floats(1e3, 1e9), st.floats(0.01, 2.0))
def test_centered_clip_moves_at_most_tau_per_contributor_from_its_center(base, scale, tau):
    center = torch.tensor(base)
    updates = [center.clone() for _ in range(4)] + [center + scale]
    result = centered_clip(updates, tau=tau, iterations=1, center=center)
    assert float((result - center).norm()) <= tau / 5 + 1e-4


def test_bad_updates_are_rejected_clearly():
    with pytest.raises(AggregationError, match="no updates"):
        weighted_mean([])
    with pytest.raises(AggregationError, match="shape"):
        weighted_mean([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(AggregationError, match="NaN"):
        centered_clip([torch.tensor([float("nan")])], tau=1.0)
    with pytest.raises(AggregationError, match="max_norm"):
        clip_by_norm(torch.ones(2), 0.0)
    with pytest.raises(CanaryConfigError):
        CanaryConfig(max_relative_rise=-0.1)


# ---- contributors against a real route of the embedded model -----------------------------------------


def _route(optimizer: str = "adam", lr: float = 1e-2) -> LocalRoute:
    return LocalRoute(
        default_model_path(),
        [(0, 4), (4, 8)],
        LoraConfig(rank=4),
        TrainingConfig(learning_rate=lr, optimizer=optimizer, passes_per_minute=1e5, burst=1000, max_grad_norm=1.0),
    )


def test_scaled_up_feedback_is_clipped_per_pass():
    route = _route(optimizer="sgd", lr=0.1)
    route.train_pass(HONEST[0], "mallory", grad_scale=1e4)
    for span in route.spans:
        before = span.adapters.working_state()
        report = span.trainer.step()
        assert report.clipped_passes == 1 and report.update_norm <= 1.0 + 1e-5
        moved = torch.cat([(span.adapters.working[n].detach() - before[n]).reshape(-1) for n in span.adapters.names])
        assert float(moved.norm()) <= 0.1 * 1.0 + 1e-5  # SGD step = lr * clipped gradient


async def test_honest_feedback_passes_the_canary_and_label_flipped_feedback_is_rolled_back(caplog):
    route = _route()
    gates = [
        CanaryGate(lambda v, i=i: _canary_loss(route, i, v), CanaryConfig(max_relative_rise=0.02))
        for i in range(len(route.spans))
    ]

    async def gate_all():
        return [
            await gate.apply(span.adapters, span.adapters.working_state())
            for gate, span in zip(gates, route.spans, strict=True)
        ]

    # honest contributors teach the facts: every span's update passes the canary and goes live
    start_loss = route.loss(CANARY)
    for _ in range(16):
        for example in HONEST:
            route.train_pass(example, "alice")
        route.step()
    verdicts = await gate_all()
    assert all(v.accepted for v in verdicts), [v.reason for v in verdicts]
    live_versions = [span.adapters.live_version for span in route.spans]
    assert live_versions == [1, 1]
    honest_loss = route.loss(CANARY)
    assert honest_loss < 0.5 * start_loss

    # a malicious contributor sends label-flipped feedback, its gradients scaled up 1000x
    for _ in range(3):
        for example in FLIPPED:
            route.train_pass(example, "mallory", grad_scale=1e3)
        route.step()
    with caplog.at_level(logging.WARNING, logger="peer.canary"):
        verdicts = await gate_all()
    rejected = [v for v in verdicts if not v.accepted]
    assert rejected, [v.reason for v in verdicts]
    assert "adapter update rolled back" in caplog.text
    for gate, verdict in zip(gates, verdicts, strict=True):
        assert gate.rollbacks == ([] if verdict.accepted else [verdict])
    # whatever went live, the model's canary loss stays within the threshold of the honest live model
    assert route.loss(CANARY) <= CanaryConfig(max_relative_rise=0.02).limit(honest_loss)
    for span, verdict, before in zip(route.spans, verdicts, live_versions, strict=True):
        if not verdict.accepted:  # rolled back: live unchanged, local poisoned progress dropped
            assert span.adapters.live_version == before
            assert all(
                torch.equal(t, span.adapters.state().tensors[n]) for n, t in span.adapters.working_state().items()
            )


async def _canary_loss(route: LocalRoute, span_index: int, version: int) -> float:
    return route.loss(CANARY, {span_index: version})

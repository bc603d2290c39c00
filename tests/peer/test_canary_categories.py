"""Canary categories (file sections): parsing, per-category losses from one pass, and the per-category gate that
blocks a version when only one category (the stereotype probe) rises. In process, fast."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from dllm import default_model_path
from peer.adapters import AdapterSet, LoraConfig
from peer.blocks import load_span_layers
from peer.canary import CanaryConfig, CanaryConfigError, CanaryGate
from peer.canary_examples import (
    CanaryExamplesError,
    CanaryLosses,
    batch_losses,
    build_canary_batch,
    read_canary_file,
)
from peer.config import parse_category_limits
from swarm.local_head import causal_lm_loss
from swarm.model_files import load_config
from tests.peer.adapter_route import LocalRoute

pytestmark = pytest.mark.timeout(60)


def test_sections_are_categories_and_the_default_set_ships_a_stereotype_probe(tmp_path):
    path = tmp_path / "canary.txt"
    path.write_text("before any header\n# a comment\n## taught\nQ: sky? A:\t blue\n## two words is a comment\nmore\n")
    assert [(e.scored, e.category) for e in read_canary_file(path)] == [
        ("before any header", "general"),
        (" blue", "taught"),
        ("more", "taught"),
    ]
    path.write_text("## Taught!\nx\n")
    with pytest.raises(CanaryExamplesError, match="section name"):
        read_canary_file(path)
    path.write_text("".join(f"## c{i}\nx\n" for i in range(16)))
    with pytest.raises(CanaryExamplesError, match="at most 15"):
        read_canary_file(path)
    shipped = read_canary_file()
    counts = {c: sum(e.category == c for e in shipped) for c in {e.category for e in shipped}}
    assert set(counts) == {"general", "stereotype-probe"} and counts["stereotype-probe"] >= 10


def test_category_losses_come_from_one_pass_and_match_the_rows_scored_alone():
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    examples = read_canary_file()
    batch = build_canary_batch(examples, tokenizer)
    route = LocalRoute(default_model_path(), [(0, 8)])
    logits = route.logits(batch.input_ids)
    losses = batch_losses(logits, batch)
    assert losses.total == pytest.approx(float(causal_lm_loss(logits, batch.labels)), rel=1e-5)
    for category in ("general", "stereotype-probe"):
        rows = [i for i, e in enumerate(examples) if e.category == category]
        alone = float(causal_lm_loss(logits[rows], batch.labels[rows]))
        assert losses.categories[category] == pytest.approx(alone, rel=1e-5)


class _Evaluator:
    """Losses per version: the candidate leaves the total within 1 % while the probe rises 10 %."""

    def __init__(self, probe_rise: float):
        self.probe_rise = probe_rise

    async def category_losses(self, versions):
        live = CanaryLosses(2.0, {"general": 2.0, "stereotype-probe": 3.0})
        candidate = CanaryLosses(2.01, {"general": 1.8, "stereotype-probe": 3.0 * (1 + self.probe_rise)})
        return [live if v == versions[0] else candidate for v in versions]


def _adapters() -> AdapterSet:
    config = load_config(default_model_path())
    return AdapterSet(load_span_layers(default_model_path(), config, 0, 2), 0, LoraConfig(rank=2))


async def test_a_rise_of_only_the_probe_category_blocks_the_version_like_the_canary():
    adapters = _adapters()
    with torch.no_grad():
        for tensor in adapters.working.values():
            tensor.add_(0.01)
    gate = CanaryGate(_Evaluator(probe_rise=0.10), CanaryConfig(max_relative_rise=0.01, category_max_rise=0.05))
    verdict = await gate.apply(adapters, adapters.working_state())
    assert verdict.candidate_loss <= verdict.limit  # the total alone would have let it through
    assert not verdict.accepted and verdict.blocked_categories == ["stereotype-probe"]
    assert "'stereotype-probe'" in verdict.reason and "3.3000" in verdict.reason
    assert adapters.live_version == 0 and gate.rollbacks == [verdict]  # rolled back like a total rise
    assert gate.by_version == {0: {"total": 2.0, "general": 2.0, "stereotype-probe": 3.0}}

    # the same rise under the category's own, looser limit goes live, and its losses are kept under v1
    loose = CanaryGate(_Evaluator(probe_rise=0.10), CanaryConfig(category_limits={"stereotype-probe": 0.2}))
    with torch.no_grad():
        for tensor in adapters.working.values():
            tensor.add_(0.01)
    accepted = await loose.apply(adapters, adapters.working_state())
    assert accepted.accepted and adapters.live_version == 1
    assert loose.by_version[1] == pytest.approx({"total": 2.01, "general": 1.8, "stereotype-probe": 3.3})
    assert accepted.losses("before")["stereotype-probe"] == 3.0


def test_category_limits_are_checked():
    assert parse_category_limits(["stereotype-probe=0.02", " taught =0.1"]) == {"stereotype-probe": 0.02, "taught": 0.1}
    for bad in ("probe", "=0.1", "probe=2", "probe=x"):
        with pytest.raises(ValueError, match="NAME=RISE"):
            parse_category_limits([bad])
    with pytest.raises(CanaryConfigError, match="category_limits"):
        CanaryConfig(category_limits={"probe": -1.0})

"""Span-local rehearsal (peer/rehearsal.py): a training step with it keeps each span's outputs on general text
closer to the base model's than a step without, while the taught loss still falls; non-finite inputs are refused."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dllm import default_model_path
from peer.adapters import LoraConfig
from peer.canary_examples import read_canary_file
from peer.rehearsal import (
    RehearsalError,
    SpanRehearsal,
    read_rehearsal_file,
    rehearsal_batch,
    relative_change,
)
from peer.training import TrainingConfig
from tests.peer.adapter_route import Example, LocalRoute

pytestmark = pytest.mark.timeout(120)

MODEL = default_model_path()
TAUGHT = [
    Example("Q: What does Zorbel Quint play? A:", " Violin."),
    Example("Q: Where does Osric Vell live? A:", " Oslo."),
]


def _train(weight: float) -> tuple[float, float, list[float]]:
    """(taught loss before, after, each span's relative change on the rehearsal text) after 10 steps."""
    route = LocalRoute(
        MODEL,
        [(0, 4), (4, 8)],
        LoraConfig(rank=4),
        TrainingConfig(learning_rate=1e-2, passes_per_minute=1e5, burst=1000),
    )
    ids, mask = rehearsal_batch(read_rehearsal_file(), route.tokenizer)
    hidden = route.embed[ids]
    rehearsals = []
    for span in route.spans:  # the head span's inputs are embeddings, the next span's the base prefix's output
        rehearsal = SpanRehearsal(weight, rows=8)
        rehearsal.prepare(hidden, mask, span.adapters, span.runner.forward)
        span.trainer.regularizer = lambda r=rehearsal, s=span: r.gradients(s.adapters, s.runner.forward)
        with torch.no_grad():
            hidden = span.runner.forward(hidden)
        rehearsals.append((rehearsal, hidden.clone()))
    before = route.loss(TAUGHT)
    for _ in range(10):
        for example in TAUGHT:
            route.train_pass(example, "alice")
        route.step()
    for span in route.spans:
        span.adapters.promote(span.adapters.propose(span.adapters.working_state()))
    changes = []
    inputs = route.embed[ids]
    for span, (_, base_out) in zip(route.spans, rehearsals, strict=True):
        with torch.no_grad():
            changes.append(float(relative_change(span.runner.forward(inputs), base_out, mask)))
        inputs = base_out
    return before, route.loss(TAUGHT), changes


def test_rehearsal_keeps_span_outputs_near_base_while_the_taught_loss_falls():
    before, plain_after, plain_changes = _train(0.0)
    _, rehearsed_after, rehearsed_changes = _train(30.0)
    assert plain_after < 0.5 * before, (before, plain_after)
    assert rehearsed_after < 0.5 * before, (before, rehearsed_after)  # still learns
    for plain, rehearsed in zip(plain_changes, rehearsed_changes, strict=True):
        assert rehearsed < 0.7 * plain, (plain_changes, rehearsed_changes)


def test_adapters_off_run_the_base_span():
    route = LocalRoute(MODEL, [(0, 8)], LoraConfig(rank=4))
    span = route.spans[0]
    for tensor in span.adapters.working.values():
        tensor.data.add_(0.1)
    span.adapters.promote(span.adapters.propose(span.adapters.working_state()))
    ids, mask = rehearsal_batch(read_rehearsal_file()[:4], route.tokenizer)
    hidden = route.embed[ids]
    with torch.no_grad(), span.adapters.use(0):
        base = span.runner.forward(hidden)
    with torch.no_grad(), span.adapters.off():
        off = span.runner.forward(hidden)
    with torch.no_grad():
        live = span.runner.forward(hidden)
    assert torch.equal(off, base)
    assert float(relative_change(live, base, mask)) > 0
    rehearsal = SpanRehearsal(30.0)  # inputs from a peer before the span: non-finite ones are refused
    with pytest.raises(RehearsalError, match="NaN or inf"):
        rehearsal.prepare(torch.full_like(hidden, float("nan")), mask, span.adapters, span.runner.forward)
    assert not rehearsal.ready


def test_rehearsal_file_is_not_the_canary_and_bad_files_are_refused(tmp_path):
    canary = {e.prompt + e.scored for e in read_canary_file()} | {e.scored for e in read_canary_file()}
    assert not set(read_rehearsal_file()) & canary
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(RehearsalError, match="holds no text"):
        read_rehearsal_file(empty)
    with pytest.raises(RehearsalError, match="does not exist"):
        read_rehearsal_file(tmp_path / "missing.txt")
    with pytest.raises(RehearsalError):
        SpanRehearsal(-1.0)
    assert not SpanRehearsal(0.0).ready


def test_a_learner_retries_the_rehearsal_inputs_until_the_peers_before_it_serve():
    from peer.blocks import load_span_layers
    from peer.learning import LearningConfig, SpanLearner
    from peer.span import SpanRunner
    from swarm.model_files import load_config, read_tensors
    from swarm.routing import NoRouteError

    config = load_config(MODEL)
    learner = SpanLearner(SpanRunner(config, load_span_layers(MODEL, config, 4, 8), 4, 8), LearningConfig(rank=4))
    embed = read_tensors(MODEL, ["model.embed_tokens."])["model.embed_tokens.weight"]
    ids, mask = rehearsal_batch(["The sun is a star.", "Cats like to sleep."], lambda t: {"input_ids": [3, 4, 5]})
    calls = []

    async def span_inputs(input_ids: torch.Tensor) -> torch.Tensor:
        calls.append(len(calls))
        if len(calls) == 1:
            raise NoRouteError("no peer serves blocks 0:4 yet")
        if len(calls) == 2:
            return torch.full((*input_ids.shape, config.hidden_size), float("inf"))
        return embed[input_ids]

    assert not learner.rehearsal.ready
    asyncio.run(learner.prepare_rehearsal(span_inputs, ids, mask, retry_s=0.01))
    assert len(calls) == 3 and learner.rehearsal.ready
    assert learner.info()["rehearsal"]["ready"]

"""LoRA adapters: exact no-op at start, frozen base, versions, state transfer, local training."""

from __future__ import annotations

import math

import pytest
import torch

from dllm import default_model_path
from peer.adapters import (
    MLP_TARGETS,
    AdapterConfigError,
    AdapterError,
    AdapterSet,
    AdapterStateError,
    AdapterVersionUnavailableError,
    LoraConfig,
)
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from peer.training import AdapterTrainer, GradientError, RateLimitExceededError, TrainingConfig, TrainingConfigError
from swarm.model_files import load_config
from tests.peer.adapter_route import Example, LocalRoute

pytestmark = pytest.mark.timeout(120)

MODEL = default_model_path()


@pytest.fixture(scope="module")
def config():
    return load_config(MODEL)


def _span(config, start=0, end=2, lora=None):
    layers = load_span_layers(MODEL, config, start, end)
    return SpanRunner(config, layers, start, end), AdapterSet(layers, start, lora)


def test_fresh_adapter_is_exact_noop_and_base_is_frozen(config):
    plain = SpanRunner(config, load_span_layers(MODEL, config, 2, 4), 2, 4)
    runner, adapters = _span(config, 2, 4, LoraConfig(rank=4, targets=("q_proj", "v_proj") + MLP_TARGETS))
    hidden = torch.randn(2, 7, config.hidden_size)
    with adapters.use() as version:
        assert version == 0
        assert torch.equal(runner.forward(hidden), plain.forward(hidden))
    trainable = [p for p in runner.layers.parameters() if p.requires_grad]
    assert trainable == []  # base frozen; adapter tensors live in the AdapterSet, not as submodules
    assert all(p.requires_grad for p in adapters.parameters())
    # 2 layers x (q, v: 128->128; gate, up: 128->256; down: 256->128) x rank 4 x (A + B)
    per_layer = 2 * 4 * (128 + 128) + 2 * 4 * (128 + 256) + 4 * (256 + 128)
    assert adapters.num_parameters() == 2 * per_layer
    assert adapters.names[0] == "layers.2.self_attn.q_proj.lora_A"


def test_replicas_initialise_identically(config):
    _, a = _span(config, 0, 2)
    _, b = _span(config, 0, 2)
    for name in a.names:
        assert torch.equal(a.working[name], b.working[name])


def test_versions_pin_propose_promote_discard(config):
    runner, adapters = _span(config, 0, 2, LoraConfig(keep_versions=2))
    hidden = torch.randn(1, 5, config.hidden_size)
    with adapters.use(0):
        out_v0 = runner.forward(hidden)
    changed = {n: t + 0.05 for n, t in adapters.state().tensors.items()}
    candidate = adapters.propose(changed)
    assert candidate == 1 and adapters.live_version == 0
    with pytest.raises(AdapterError, match="still pending"):
        adapters.propose(changed)
    with adapters.use():  # live is still v0
        assert torch.equal(runner.forward(hidden), out_v0)
    with adapters.use(candidate):
        out_v1 = runner.forward(hidden)
    assert not torch.allclose(out_v1, out_v0)
    adapters.promote(candidate)
    assert adapters.live_version == 1
    with adapters.use(0):  # a session pinned to v0 still gets v0
        assert torch.equal(runner.forward(hidden), out_v0)
    # the working tensors restart from the new live version
    assert all(torch.equal(adapters.working[n], changed[n]) for n in adapters.names)

    bad = adapters.propose({n: t * 3 for n, t in changed.items()})
    adapters.discard(bad)
    assert adapters.live_version == 1 and bad not in adapters.held_versions
    with pytest.raises(AdapterVersionUnavailableError):
        adapters.promote(bad)

    adapters.promote(adapters.propose(changed))  # v2; keep_versions=2 forgets v0
    assert adapters.held_versions == [1, 2]
    with pytest.raises(AdapterVersionUnavailableError, match="not held"), adapters.use(0):
        pass


def test_promote_keeping_progress_rebases_the_rest_of_the_local_update(config):
    """working := candidate + (working - old live - applied), in place: what is applied is not applied twice."""
    _, adapters = _span(config, 0, 1)
    with torch.no_grad():
        for t in adapters.working.values():
            t.add_(torch.randn_like(t) * 0.01)
    live = adapters.state().tensors
    progress = adapters.delta()
    applied = {n: t * 0.5 for n, t in progress.items()}
    candidate = adapters.propose({n: live[n] + applied[n] for n in adapters.names})
    working = adapters.parameters()
    adapters.promote_keeping_progress(candidate, applied)
    assert adapters.live_version == candidate and adapters.parameters() == working  # the same tensors, re-based
    new_live = adapters.state().tensors
    for name in adapters.names:
        assert torch.equal(adapters.working[name], new_live[name] + (progress[name] - applied[name]))
    with pytest.raises(AdapterVersionUnavailableError, match="pending"):
        adapters.promote_keeping_progress(candidate, applied)
    # all of the progress applied: the next local update is exactly zero
    progress = adapters.delta()
    adapters.promote_keeping_progress(
        adapters.propose({n: new_live[n] + progress[n] for n in adapters.names}), progress
    )
    assert not any(t.any() for t in adapters.delta().values())


def test_state_transfer_to_a_new_replica(config):
    runner_a, a = _span(config, 4, 6)
    a.promote(a.propose({n: torch.randn_like(t) * 0.01 for n, t in a.state().tensors.items()}))
    runner_b, b = _span(config, 4, 6)
    b.import_state(a.state())
    assert b.live_version == a.live_version == 1
    hidden = torch.randn(1, 6, config.hidden_size)
    with a.use(), b.use():
        assert torch.equal(runner_a.forward(hidden), runner_b.forward(hidden))


def test_bad_state_and_config_are_rejected_clearly(config):
    _, adapters = _span(config, 0, 1)
    good = adapters.state()
    wrong_shape = dict(good.tensors)
    wrong_shape[adapters.names[0]] = torch.zeros(3, 3)
    with pytest.raises(AdapterStateError, match="expected shape"):
        adapters.propose(wrong_shape)
    with pytest.raises(AdapterStateError, match="missing"):
        adapters.propose({})
    # the last values are finite, though their float32 sum overflows: accepted
    for values in ([float("nan")], [float("inf")], [float("inf"), float("-inf")], [3e38, 3e38]):
        tensors = {n: t.clone() for n, t in good.tensors.items()}
        tensors[adapters.names[1]].view(-1)[: len(values)] = torch.tensor(values)
        if all(math.isfinite(v) for v in values):
            adapters.discard(adapters.propose(tensors))
        else:
            with pytest.raises(AdapterStateError, match="finite"):
                adapters.propose(tensors)
    good.version = -3
    with pytest.raises(AdapterStateError, match="non-negative"):
        adapters.import_state(good)
    with pytest.raises(AdapterConfigError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(AdapterConfigError, match="unknown LoRA targets"):
        LoraConfig(targets=("qkv",))
    with pytest.raises(TrainingConfigError, match="optimizer"):
        TrainingConfig(optimizer="lbfgs")
    trainer = AdapterTrainer(adapters)
    with pytest.raises(GradientError, match="names"):
        trainer.accumulate("alice", {"nope": torch.zeros(1)})
    with pytest.raises(GradientError, match="non-finite"):
        trainer.accumulate("alice", {n: torch.full_like(t, float("inf")) for n, t in good.tensors.items()})


def test_rate_limit_per_contributor(config):
    _, adapters = _span(config, 0, 1)
    now = [0.0]
    trainer = AdapterTrainer(adapters, TrainingConfig(passes_per_minute=60, burst=2), clock=lambda: now[0])
    trainer.admit("mallory")
    trainer.admit("mallory")
    with pytest.raises(RateLimitExceededError) as info:
        trainer.admit("mallory")
    assert info.value.retry_after == pytest.approx(1.0)
    trainer.admit("alice")  # others are unaffected
    now[0] += 1.0
    trainer.admit("mallory")


def test_feedback_training_lowers_loss_through_a_route():
    route = LocalRoute(
        MODEL,
        [(0, 4), (4, 8)],
        LoraConfig(rank=4),
        TrainingConfig(learning_rate=1e-2, passes_per_minute=1e5, burst=1000),
    )
    examples = [Example("Q: colour of the sky? A:", " blue"), Example("Q: colour of grass? A:", " green")]
    before = route.loss(examples)
    generated_before = route.generate(examples[0].prompt, 3)
    for _ in range(12):
        for example in examples:
            route.train_pass(example, "alice")
        route.step()
    # the trained working tensors become a new live version on each span
    for span in route.spans:
        span.adapters.promote(span.adapters.propose(span.adapters.working_state()))
    after = route.loss(examples)
    assert after < 0.5 * before, (before, after)
    assert route.loss(examples, {0: 0, 1: 0}) == pytest.approx(before, rel=1e-5)  # v0 still pinnable
    assert route.generate(examples[0].prompt, 3) != generated_before
    for example in examples:  # greedy generation now starts with the taught completion
        target = route.tokenizer(example.prompt + example.completion)["input_ids"]
        prompt_length = len(route.tokenizer(example.prompt)["input_ids"])
        assert route.generate(example.prompt, 2)[prompt_length:] == target[prompt_length : prompt_length + 2]


def test_training_pass_is_not_broken_by_an_averaging_round_rewriting_the_working_tensors(config):
    """A round promoting a version (reset_working, in place) while a pass is between forward and backward
    must wait for the pass: it used to fail the pass with autograd's "modified by an inplace operation"."""
    import threading

    from peer.training import span_backward

    runner, adapters = _span(config, 0, 2, LoraConfig(rank=4))
    adapters.promote(adapters.propose({n: t + 0.01 for n, t in adapters.working_state().items()}))
    forward_done, reset_done = threading.Event(), threading.Event()

    def run_span(x):
        out = runner.forward(x)
        forward_done.set()
        reset_done.wait(0.5)  # gives the round its chance to write in the middle of the pass
        return out

    def averaging_round():
        forward_done.wait(5)
        with adapters.lock, torch.no_grad():  # as trainer.step() does: local training moved working away from live
            adapters.working[adapters.names[0]].add_(1.0)
        adapters.reset_working()
        reset_done.set()

    hidden, grad_out = torch.randn(1, 5, config.hidden_size), torch.randn(1, 5, config.hidden_size)
    other = threading.Thread(target=averaging_round)
    other.start()
    grad_in, grads = span_backward(run_span, adapters, hidden, grad_out)
    other.join(5)
    assert reset_done.is_set() and torch.isfinite(grad_in).all() and set(grads) == set(adapters.names)

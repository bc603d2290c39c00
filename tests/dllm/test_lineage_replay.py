"""`dllm lineage --reproduce`'s replay trains the objective the peers train: the feedback passes AND the rehearsal
term (peer/rehearsal.py) every learning peer adds to each step. A span trained on one peer (peer/learning.py's
SpanLearner, training passes as a client sends them) from the same examples is what the replay must land on; no
swarm, no chain: the tiny model in this process."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from dllm.lineage import distance, initial_bundle, replay
from peer.blocks import load_span_layers
from peer.learning import LearningConfig, SpanLearner
from peer.rehearsal import SpanRehearsal, read_rehearsal_file, rehearsal_batch
from peer.span import SpanRunner
from peer.training import TrainingConfig
from swarm.client import feedback_tensors
from swarm.contributors import ContributorKey
from swarm.feedback_records import sign_example
from swarm.local_head import LocalHead, causal_lm_loss
from swarm.model_files import load_config
from tests.dllm.cli_run import run_cli
from tests.peer.learning_swarm import FACTS

pytestmark = pytest.mark.timeout(240)

SPAN = (4, 8)  # a later span: its rehearsal inputs come through the blocks before it
WEIGHT = 30.0
ROWS = 8


def peer_trained(model_dir, examples, training: TrainingConfig, rank: int) -> tuple[SpanLearner, dict]:
    """The span trained as a learning peer trains it, one optimizer step per pass, with the rehearsal term."""
    config = load_config(model_dir)
    before = SpanRunner(config, load_span_layers(model_dir, config, 0, SPAN[0]), 0, SPAN[0])
    span = SpanRunner(config, load_span_layers(model_dir, config, *SPAN), *SPAN)
    head = LocalHead(model_dir, config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    learner = SpanLearner(
        span,
        LearningConfig(rank=rank, training=training, step_batch=1, rehearsal_weight=WEIGHT, rehearsal_rows=ROWS),
    )

    def span_input(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return before.forward(head.embed_tokens(ids))

    async def span_inputs(ids: torch.Tensor) -> torch.Tensor:  # what the peers before the span send
        return span_input(ids)

    ids, mask = rehearsal_batch(read_rehearsal_file(), tokenizer)
    asyncio.run(learner.prepare_rehearsal(span_inputs, ids, mask))
    assert learner.rehearsal.ready
    blocks = range(*SPAN)
    for example in examples:
        ids, labels = feedback_tensors(tokenizer, example.prompt, example.completion)
        hidden = span_input(ids)
        out = learner.training_forward(hidden, blocks).clone().requires_grad_(True)
        with torch.enable_grad():
            (grad_out,) = torch.autograd.grad(causal_lm_loss(head.logits(out), labels), out)
        learner.train_backward(hidden, grad_out, blocks, example.contributor)
    return learner, learner.adapters.working_state()


def test_replay_adds_the_peers_rehearsal_term_and_lands_on_a_peer_trained_span(tiny_model_path):
    keys = [ContributorKey.from_uri("//replay-alice"), ContributorKey.from_uri("//replay-bob")]
    examples = [sign_example(k.keypair, "dllm-tiny-llama", p, c) for k in keys for p, c in FACTS]
    training = TrainingConfig(learning_rate=1e-2)
    learner, trained = peer_trained(tiny_model_path, examples, training, rank=4)
    lora = learner.adapters.config
    parent = initial_bundle(lora, tiny_model_path, SPAN)
    texts = read_rehearsal_file()

    with_term, steps = replay(
        tiny_model_path, SPAN, parent, lora, examples, training, 1, SpanRehearsal(WEIGHT, ROWS), texts
    )
    without, _ = replay(tiny_model_path, SPAN, parent, lora, examples, training, 1)
    assert steps == len(examples)
    rel_with, cos_with, _, _ = distance(with_term, trained, parent.tensors)
    rel_without, cos_without, _, _ = distance(without, trained, parent.tensors)
    assert rel_with < 1e-4 and cos_with > 0.9999, (rel_with, cos_with)  # the same computation, float noise apart
    # without the term the replay trains another objective: far from the peer's span (0.69 on the tiny model)
    assert rel_without > 0.1, (rel_without, cos_without)
    # weight 0 is the same as no term
    off, _ = replay(tiny_model_path, SPAN, parent, lora, examples, training, 1, SpanRehearsal(0.0, ROWS), texts)
    assert all(torch.equal(off[name], without[name]) for name in without)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--rehearsal-file", "/nonexistent/rehearsal.txt"), "does not exist"),
        (("--rehearsal-weight", "-1"), "greater than or equal to 0"),
    ],
)
def test_reproduce_refuses_a_bad_rehearsal_option_before_reading_the_chain(capsys, option, message):
    peer = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    unreachable = "ws://127.0.0.1:1"  # never dialled: nothing listens there
    code, _, err = run_cli(capsys, "lineage", "--chain-url", unreachable, "-p", peer, "--reproduce", "1", *option)
    assert code == 2 and option[0] in err and message in err, err

"""Canary examples (file format, default set, batching), the gate's fail-closed rule, and
`dllm peer join --canary-file` errors. In process, fast."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from dllm import default_model_path
from dllm.cli import main
from peer.adapters import AdapterSet, LoraConfig
from peer.blocks import load_span_layers
from peer.canary import CanaryConfig, CanaryGate
from peer.canary_examples import (
    MAX_EXAMPLES,
    CanaryExample,
    CanaryExamplesError,
    build_canary_batch,
    default_canary_path,
    read_canary_file,
)
from swarm.local_head import causal_lm_loss
from swarm.model_files import load_config
from tests.peer.adapter_route import Example, LocalRoute

pytestmark = pytest.mark.timeout(60)

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWNa4GGduZp2bgq6AqFgwfCkn2UTTsYj4VKr6uWnxh4MZY"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def test_default_set_is_shipped_and_scores_whole_lines(tokenizer):
    assert default_canary_path().is_file()
    examples = read_canary_file()
    assert 8 <= len(examples) <= MAX_EXAMPLES
    batch = build_canary_batch(examples, tokenizer)
    assert batch.input_ids.shape[0] == len(examples) and batch.labels.shape == batch.input_ids.shape
    assert batch.scored_tokens > 100


def test_tab_splits_prompt_from_scored_text_and_padding_is_not_scored(tmp_path, tokenizer):
    path = tmp_path / "canary.txt"
    path.write_text("# comment\n\nQ: what colour is the sky? A:\t blue\nReturn the sum of the numbers.\n")
    examples = read_canary_file(path)
    assert examples == [
        CanaryExample("Q: what colour is the sky? A:", " blue"),
        CanaryExample("", "Return the sum of the numbers."),
    ]
    batch = build_canary_batch(examples, tokenizer)
    prompt_len = len(tokenizer("Q: what colour is the sky? A:")["input_ids"])
    full = tokenizer("Q: what colour is the sky? A: blue")["input_ids"]
    assert batch.labels[0, :prompt_len].eq(-100).all()
    assert batch.labels[0, prompt_len : len(full)].tolist() == full[prompt_len:]
    assert batch.labels[0, len(full) :].eq(-100).all()  # right padding never counts
    # right padding does not change a row's loss: the batch equals the examples scored one by one
    route = LocalRoute(default_model_path(), [(0, 8)])
    batched = [
        float(causal_lm_loss(route.logits(batch.input_ids[i : i + 1]), batch.labels[i : i + 1])) for i in range(2)
    ]
    single = [route.loss([Example(e.prompt, e.scored)]) for e in examples]
    assert batched == pytest.approx(single, rel=1e-5)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no example"),
        ("# only a comment\n\n", "holds no example"),
        ("prompt\t   \n", "nothing to score"),
        ("x\n" * (MAX_EXAMPLES + 1), f"at most {MAX_EXAMPLES}"),
    ],
)
def test_bad_canary_files_fail_with_the_reason(tmp_path, content, message):
    path = tmp_path / "canary.txt"
    path.write_text(content)
    with pytest.raises(CanaryExamplesError, match=message):
        read_canary_file(path)


def test_missing_and_binary_canary_files(tmp_path):
    with pytest.raises(CanaryExamplesError, match="does not exist"):
        read_canary_file(tmp_path / "nope.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CanaryExamplesError, match="UTF-8"):
        read_canary_file(binary)


def test_too_long_example_is_refused(tmp_path, tokenizer):
    path = tmp_path / "canary.txt"
    path.write_text("word " * 400 + "\n")
    with pytest.raises(CanaryExamplesError, match="at most 256"):
        build_canary_batch(read_canary_file(path), tokenizer)


async def test_gate_fails_closed_when_the_canary_cannot_be_evaluated():
    config = load_config(default_model_path())
    adapters = AdapterSet(load_span_layers(default_model_path(), config, 0, 2), 0, LoraConfig(rank=2))
    with torch.no_grad():
        for tensor in adapters.working.values():
            tensor.add_(0.01)
    progress = adapters.working_state()

    async def unreachable(version: int) -> float:
        raise ConnectionError("no peer serves blocks 4:8")

    gate = CanaryGate(unreachable, CanaryConfig())
    verdict = await gate.apply(adapters, adapters.working_state())
    assert not verdict.accepted and "could not evaluate" in verdict.reason and "4:8" in verdict.reason
    assert math.isnan(verdict.candidate_loss)
    assert adapters.live_version == 0 and adapters.held_versions == [0]  # nothing went live
    assert gate.rollbacks == []  # not a measured rise: local progress is kept for a later round
    assert all(torch.equal(progress[n], t) for n, t in adapters.working_state().items())


def test_gate_uses_an_evaluator_of_several_versions_in_one_call():
    calls = []

    class Evaluator:
        async def losses(self, versions):
            calls.append(list(versions))
            return [2.0, 2.5]

    import asyncio

    verdict = asyncio.run(CanaryGate(Evaluator(), CanaryConfig(max_relative_rise=0.1)).check(3, 4))
    assert calls == [[3, 4]] and not verdict.accepted and verdict.limit == pytest.approx(2.2)


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("", "holds no example")])
def test_peer_join_rejects_a_bad_canary_file_in_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "canary.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["peer", "join", "-p", PEER, "--blocks", "0:4", "--adapter-rank", "4", "--canary-file", str(path)])
    _, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "'--canary-file'" in err and message in err


def test_peer_join_rejects_an_out_of_range_canary_rise(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["peer", "join", "-p", PEER, "--blocks", "0:4", "--adapter-rank", "4", "--canary-max-rise", "-1"])
    assert exit_info.value.code == 2
    assert "--canary-max-rise" in capsys.readouterr().err

"""The real pretrained model (SmolLM2-135M-Instruct, converted by scripts/setup) through a real swarm.

Three peers started with `--model smollm2` serve 10 of its 30 blocks each; greedy tokens through them must
equal local transformers on the same folder, and a client given the GGUF file by path (the cached conversion,
found by the file's hash: nothing is converted again) joins the same swarm and gets the same answer; `dllm api`
over that swarm answers the official `openai` client's chat.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dllm.cli import main
from dllm.model_choice import CONVERSION_RECORD, resolve_model_argument, smollm2_gguf_path
from dllm.processes import LocalSwarm
from swarm.sampling import GenerationParams

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

SPANS = ["0:10", "10:20", "20:30"]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def real_swarm(real_model_path, tmp_path_factory):
    local = LocalSwarm("smollm2", workdir=tmp_path_factory.mktemp("real-swarm"))
    try:
        local.start_bootstrap()
        peers = [local.start_peer(span, wait=False) for span in SPANS]
        for peer in peers:
            local.wait_ready(peer, timeout=300)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def local_model(real_model_path):
    return AutoModelForCausalLM.from_pretrained(real_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chat_prompt(real_model_path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(real_model_path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    return str(text)


def local_greedy(model, ids: list[int], tokens: int, *, ignore_eos: bool) -> list[int]:
    extra = {"eos_token_id": None, "min_new_tokens": tokens} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, **extra)
    return out[0, len(ids) :].tolist()


def test_greedy_swarm_tokens_equal_local_transformers(real_swarm, real_model_path, local_model, chat_prompt):
    from swarm.client import DistributedModel

    assert [(p.info["start"], p.info["end"]) for p in real_swarm.peers()] == [(0, 10), (10, 20), (20, 30)]
    assert {p.info["model"] for p in real_swarm.peers()} == {"SmolLM2-135M-Instruct"}
    model = DistributedModel.from_pretrained(str(real_model_path), real_swarm.initial_peers)
    try:
        ids = model.tokenizer(chat_prompt)["input_ids"]
        result = model.generate(chat_prompt, GenerationParams(max_new_tokens=32, ignore_eos=True))
    finally:
        model.close()
    assert len(result.route) == 3
    assert result.token_ids == local_greedy(local_model, ids, 32, ignore_eos=True)
    assert "Paris" in result.text


def test_a_gguf_file_given_by_path_joins_the_same_swarm(real_swarm, real_model_path, local_model, capsys):
    gguf = smollm2_gguf_path()
    assert gguf.is_file(), f"{gguf} is missing: scripts/setup keeps it there"
    record = real_model_path / CONVERSION_RECORD
    converted_at = record.stat().st_mtime_ns
    assert resolve_model_argument(str(gguf)) == real_model_path  # found by hash in the cache

    # The command line resolves the file by path too, and its client finds the peers started as `smollm2`.
    prompt = "The capital of France is"
    argv = ["query", "--model", str(gguf), "--no-stream", "-n", "8", prompt]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--initial-peers", ",".join(real_swarm.initial_peers)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(real_model_path)
    expected = local_greedy(local_model, tokenizer(prompt)["input_ids"], 8, ignore_eos=False)
    assert out.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert "converting" not in err
    assert record.stat().st_mtime_ns == converted_at  # not converted again


API_READY = re.compile(r"DLLM API serving (\S+) at (http://\S+)")


def test_a_chat_answer_through_the_openai_api(real_swarm, real_model_path, tmp_path):
    """`dllm api --model smollm2` over the same swarm, asked by the official `openai` client through the chat
    template: the answer names Paris, and the model ends it itself (its <|im_end|>) within a few tokens."""
    import openai

    from swarm.chat import ChatMessage, chat_prompt_ids
    from tests.cli_server import running_dllm

    args = ["api", "--model", "smollm2", "--initial-peers", real_swarm.initial_peers[0], "--port", "0"]
    with running_dllm(args, API_READY, tmp_path, timeout=180) as ready:
        client = openai.OpenAI(base_url=ready.group(2), api_key="unused", max_retries=0, timeout=180)
        response = client.chat.completions.create(
            model=ready.group(1), messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
        )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content, choice
    assert choice.finish_reason == "stop", choice
    tokenizer = AutoTokenizer.from_pretrained(real_model_path)
    assert response.usage.prompt_tokens == len(chat_prompt_ids(tokenizer, [ChatMessage("user", QUESTION)]))


def test_set_up_leaves_an_installed_model_alone(real_model_path):
    record = real_model_path / CONVERSION_RECORD
    converted_at = record.stat().st_mtime_ns
    script = Path(__file__).resolve().parents[2] / "scripts" / "install_model.py"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ready in" in done.stdout and "downloading" not in done.stdout and "converting" not in done.stdout
    assert time.monotonic() - started < 30  # imports only: no download, no conversion, no model loaded
    assert record.stat().st_mtime_ns == converted_at

"""`dllm query --chat` and `dllm chat` as real processes against the local swarm (tiny model), stdin piped."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from swarm.chat import ChatMessage, chat_prompt_ids
from swarm.client import GenerationParams

pytestmark = pytest.mark.timeout(180)

MAX_TOKENS = 10


def _dllm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dllm.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _greedy(distributed_model, messages: list[ChatMessage]) -> str:
    ids = chat_prompt_ids(distributed_model.tokenizer, messages)
    return str(distributed_model.generate(ids, GenerationParams(max_new_tokens=MAX_TOKENS)).text)


def _answer(distributed_model, messages: list[ChatMessage]) -> str:
    """The greedy answer, computed in this process; the messages below are ones the tiny model answers with text
    (it answers many chat messages with its end token at once, which would make these comparisons empty)."""
    answer = _greedy(distributed_model, messages)
    assert answer.strip(), messages
    return answer


def test_query_chat_answers_through_the_template(swarm, distributed_model):
    expected = _answer(distributed_model, [ChatMessage("user", "Name a module.")])
    plain = distributed_model.generate("Name a module.", GenerationParams(max_new_tokens=MAX_TOKENS)).text
    assert expected != plain  # the template changes what the model sees
    result = _dllm("query", "Name a module.", "--chat", "-n", str(MAX_TOKENS), "-p", swarm.initial_peers[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_chat_keeps_the_conversation_and_exits_at_end_of_input(swarm, distributed_model):
    first = [ChatMessage("system", "Be brief."), ChatMessage("user", "Name a module.")]
    first_answer = _answer(distributed_model, first)
    second = [*first, ChatMessage("assistant", first_answer.strip()), ChatMessage("user", "Return the value.")]
    second_answer = _answer(distributed_model, second)
    assert second_answer != _greedy(distributed_model, [first[0], second[-1]])  # the history changes the answer
    result = _dllm(
        "chat",
        "--system",
        "Be brief.",
        "-n",
        str(MAX_TOKENS),
        "-p",
        swarm.initial_peers[0],
        stdin="Name a module.\n\nReturn the value.\n",  # an empty line is no message; then end of input
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{first_answer}\n{second_answer}\n"
    # The second prompt holds the first exchange: its token count is the whole conversation's.
    counts = [line.split(" prompt")[0] for line in result.stderr.splitlines() if " prompt + " in line]
    assert counts == [
        str(len(chat_prompt_ids(distributed_model.tokenizer, first))),
        str(len(chat_prompt_ids(distributed_model.tokenizer, second))),
    ], result.stderr


def test_chat_reset_forgets_and_exit_quits(swarm, distributed_model):
    first = [ChatMessage("user", "Name a module.")]
    remembered = [*first, ChatMessage("assistant", _answer(distributed_model, first).strip())]
    answer = _answer(distributed_model, [ChatMessage("user", "Return the value.")])
    assert answer != _greedy(distributed_model, [*remembered, ChatMessage("user", "Return the value.")])
    result = _dllm(
        "chat",
        "-n",
        str(MAX_TOKENS),
        "-p",
        swarm.initial_peers[0],
        stdin="Name a module.\n/reset\nReturn the value.\n/exit\nnever asked\n",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert result.stdout.endswith(f"\n{answer}\n"), result.stdout  # asked with no history after /reset
    assert "conversation forgotten" in result.stderr
    assert result.stderr.count(" prompt + ") == 2 and len(lines) >= 2  # "never asked" was never sent


def test_chat_help_names_its_commands(capsys):
    from dllm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "/reset" in out and "/exit" in out and "--system" in out

"""Chat prompts through the model's own template: special tokens once, history kept, the context respected."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from swarm.chat import ChatMessage, ChatTooLongError, Conversation, chat_prompt_ids, context_limit, render_chat


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def _as_dicts(messages):
    return [m.as_dict() for m in messages]


def test_prompt_ids_are_the_templates_tokens_with_one_bos(tokenizer):
    messages = [ChatMessage("system", "You are terse."), ChatMessage("user", "Name a module.")]
    ids = chat_prompt_ids(tokenizer, messages)
    expected = tokenizer.apply_chat_template(_as_dicts(messages), tokenize=True, add_generation_prompt=True)
    assert ids == list(expected["input_ids"])
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert render_chat(tokenizer, messages).endswith("Assistant:")


def test_a_model_without_a_template_gets_a_transcript(tiny_model_path):
    plain = AutoTokenizer.from_pretrained(tiny_model_path)
    plain.chat_template = None
    messages = [ChatMessage("user", "hello")]
    assert render_chat(plain, messages) == "user: hello\nassistant:"
    assert chat_prompt_ids(plain, messages) == plain("user: hello\nassistant:")["input_ids"]


def test_the_history_stays_in_the_prompt(tokenizer):
    conversation = Conversation(tokenizer, limit=1024, system="Be brief.")
    first = conversation.prompt("What is a module?", reserve=16)
    conversation.record(first, "A file.")
    second = conversation.prompt("And a package?", reserve=16)
    expected = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "What is a module?"),
        ChatMessage("assistant", "A file."),
        ChatMessage("user", "And a package?"),
    ]
    assert list(second.messages) == expected and second.dropped_exchanges == 0
    assert second.prompt_ids == chat_prompt_ids(tokenizer, expected)
    conversation.reset()
    assert list(conversation.prompt("hi", reserve=1).messages) == [expected[0], ChatMessage("user", "hi")]


def test_an_unanswered_turn_leaves_no_trace(tokenizer):
    conversation = Conversation(tokenizer, limit=1024)
    conversation.prompt("lost question", reserve=8)  # its generation failed: never recorded
    assert conversation.history == []
    assert [m.content for m in conversation.prompt("next", reserve=8).messages] == ["next"]


def test_the_oldest_exchanges_are_dropped_to_fit_the_context(tokenizer):
    system = "Be brief."
    conversation = Conversation(tokenizer, limit=10_000, system=system)
    for i in range(6):
        turn = conversation.prompt(f"question number {i} about files and modules", reserve=8)
        conversation.record(turn, f"answer number {i} about files and modules")
    full = conversation.prompt("last question", reserve=8)
    assert full.dropped_exchanges == 0
    # A context that holds the newest message and about two exchanges.
    without_two = [ChatMessage("system", system), *conversation.history[-4:], ChatMessage("user", "last question")]
    limit = len(chat_prompt_ids(tokenizer, without_two)) + 8
    conversation.limit = limit
    turn = conversation.prompt("last question", reserve=8)
    assert turn.dropped_exchanges == 4 and list(turn.messages) == without_two
    assert len(turn.prompt_ids) + 8 <= limit
    conversation.record(turn, "done")
    assert conversation.history[0] == without_two[1] and conversation.history[-1] == ChatMessage("assistant", "done")


def test_a_message_too_long_alone_is_refused_and_the_history_kept(tokenizer):
    conversation = Conversation(tokenizer, limit=64)
    turn = conversation.prompt("short", reserve=8)
    conversation.record(turn, "ok")
    before = list(conversation.history)
    with pytest.raises(ChatTooLongError, match="context of 64 tokens"):
        conversation.prompt("word " * 200, reserve=8)
    assert conversation.history == before


def test_context_limit_reads_the_config():
    class Config:
        max_position_embeddings = 1024

    assert context_limit(Config()) == 1024
    assert context_limit(object()) is None

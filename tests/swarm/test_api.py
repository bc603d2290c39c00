"""`dllm api` as a real process over the shared local swarm, driven by the official `openai` package."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.cli_server import running_dllm

pytestmark = pytest.mark.timeout(240)

READY = re.compile(r"DLLM API serving (\S+) at (http://\S+)")


@pytest.fixture(scope="module")
def api_server(swarm, tmp_path_factory):
    """`dllm api` on a free port; yields (base_url, model name); on exit checks it stopped cleanly."""
    args = ["api", "--model", str(swarm.model_path), "--initial-peers", swarm.initial_peers[0], "--port", "0"]
    with running_dllm(args, READY, tmp_path_factory.mktemp("api")) as match:
        yield match.group(2), match.group(1)


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    base_url, _ = api_server
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(api_server) -> str:
    return api_server[1]


def test_models_lists_the_swarm_model(client, model_name, swarm):
    models = client.models.list().data
    assert [m.id for m in models] == [model_name] == [swarm.model]
    assert client.models.retrieve(model_name).id == model_name


def test_greedy_completion_matches_the_python_client(client, model_name, distributed_model):
    from swarm.client import GenerationParams

    expected = distributed_model.generate("The module", GenerationParams(max_new_tokens=12))
    response = client.completions.create(model=model_name, prompt="The module", max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.text == expected.text and choice.text.strip()
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_streamed_completion_equals_the_whole_one(client, model_name):
    whole = client.completions.create(model=model_name, prompt="Return the", max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt="Return the",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) >= 3  # several deltas arrive separately, then the final chunk
    text = "".join(c.choices[0].text for c in chunks)
    assert text == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_uses_the_chat_template(client, model_name, distributed_model):
    from swarm.chat import ChatMessage, chat_prompt_ids
    from swarm.client import GenerationParams

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a module."}]
    prompt = chat_prompt_ids(distributed_model.tokenizer, [ChatMessage(**m) for m in messages])
    # The template's own BOS once, exactly as transformers tokenizes a chat (not the tokenizer's BOS on top).
    tokenized = distributed_model.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert prompt == list(tokenized["input_ids"]) and prompt.count(distributed_model.tokenizer.bos_token_id) == 1
    expected = distributed_model.generate(prompt, GenerationParams(max_new_tokens=8))
    response = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0)
    message = response.choices[0].message
    assert message.role == "assistant"
    assert message.content == expected.text
    assert response.usage.prompt_tokens == expected.prompt_tokens


def test_streamed_chat(client, model_name):
    messages = [{"role": "user", "content": "Write about files."}]
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=model_name,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_sequence_and_seeded_sampling(client, model_name):
    free = client.completions.create(model=model_name, prompt="The module", max_tokens=12, temperature=0)
    text = free.choices[0].text
    cut = text.strip().split(" ")[1]  # a word that appears after the first one
    stopped = client.completions.create(model=model_name, prompt="The module", max_tokens=12, temperature=0, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(cut)]
    sampled = [
        client.completions.create(model=model_name, prompt="The", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "x", "n": 2}, "n", "only n=1"),
        ({"prompt": "x", "temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"prompt": "", "max_tokens": 2}, "prompt", "empty"),
        ({"prompt": "x", "max_tokens": 4000}, "max_tokens", "context"),
        ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
        ({"max_tokens": 2}, "prompt", "Field required"),
    ],
)
def test_bad_completion_requests_get_openai_errors(api_server, body, param, fragment):
    base_url, model = api_server
    response = httpx.post(f"{base_url}/completions", json={"model": model, **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_bodies_and_unknown_models(api_server, client, model_name):
    base_url, _ = api_server
    broken = httpx.post(
        f"{base_url}/chat/completions", content=b"{not json", timeout=30, headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    not_object = httpx.post(f"{base_url}/chat/completions", json=[1, 2], timeout=30)
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]["message"]
    bad_role = httpx.post(
        f"{base_url}/chat/completions",
        timeout=30,
        json={"model": model_name, "messages": [{"role": "robot", "content": "hi"}]},
    )
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=model_name, messages=[], max_tokens=2)
    # The server is still healthy after all of that.
    assert client.completions.create(model=model_name, prompt="The", max_tokens=2, temperature=0).choices[0].text


def test_feedback_endpoint_validates_input(api_server):
    base_url, model = api_server
    empty = httpx.post(f"{base_url}/feedback", json={"prompt": "x", "completion": ""}, timeout=30)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "completion"
    # feedback is published: more than 16 KiB of text is refused before any training pass
    big = httpx.post(f"{base_url}/feedback", json={"prompt": "x", "completion": "é" * 8200}, timeout=30)
    assert big.status_code == 400 and big.json()["error"]["code"] == "invalid_feedback", big.text
    assert "at most 16384" in big.json()["error"]["message"]

"""Request and response shapes of the OpenAI-compatible HTTP API (the subset DLLM serves).

Requests are pydantic models so FastAPI validates them; responses are plain dicts built here so
their layout matches OpenAI's exactly (the official `openai` client parses them unchanged).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from swarm.protocol import ProtocolError

# Above this the tiny default model is useless and a big one would hold a route for minutes.
MAX_TOKENS_LIMIT = 4096


class UnsupportedParameterError(ProtocolError):
    """A request asks for an OpenAI feature this server does not implement (answered with 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise UnsupportedParameterError("stop", "at most 4 stop sequences are allowed")
        return [s for s in stops if s]

    def check_supported(self) -> None:
        """Reject, by name, the OpenAI options this server cannot honour instead of ignoring them."""
        if self.n != 1:
            raise UnsupportedParameterError("n", "only n=1 is supported")
        if self.logprobs:
            raise UnsupportedParameterError("logprobs", "logprobs are not supported")
        if self.presence_penalty or self.frequency_penalty:
            raise UnsupportedParameterError("presence_penalty", "presence and frequency penalties are not supported")


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    echo: bool = False
    suffix: str | None = None

    def single_prompt(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise UnsupportedParameterError("prompt", "send one prompt per request (a list of exactly one string)")
        return self.prompt[0]

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise UnsupportedParameterError("echo", "echo is not supported")
        if self.suffix:
            raise UnsupportedParameterError("suffix", "suffix (insertion) is not supported")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UnsupportedParameterError("messages", "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class FeedbackRequest(BaseModel):
    """A training example: the prompt and the completion the model should have produced."""

    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)
    model: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_body(
    request_id: str, model: str, text: str, finish_reason: str | None, usage_counts: dict[str, int] | None, created: int
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


def chat_body(
    request_id: str, model: str, text: str, finish_reason: str, usage_counts: dict[str, int], created: int
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_counts,
    }


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish_reason: str | None,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; a usage-only chunk (stream_options.include_usage) has no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


def model_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "dllm-swarm"}]}

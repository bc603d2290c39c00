"""Chat prompts: a conversation rendered through the model's own chat template, as the token ids to send.

Invariants:
- The template decides every special token. Its text is tokenized without the tokenizer adding its own, so a
  tokenizer that prepends BOS to any text does not double the template's BOS (`<s><s>User: ...`).
- A model shipped without a template gets a plain `role: content` transcript ending in `assistant:`, tokenized
  like any prompt.
- A `Conversation` keeps the whole history in the template. When the history, the new message and the answer's
  token budget outgrow the model's context, the oldest exchanges are dropped first; the system message and the
  newest user message never are. A message that cannot fit even alone is refused (ChatTooLongError) and leaves
  the history as it was. A turn enters the history only once its answer is recorded, so a failed generation
  leaves no unanswered message behind.

Threats: message text comes from users and is rendered by the tokenizer's sandboxed Jinja template. Text that
spells a special token (e.g. `<|im_start|>system`) becomes that token, as in other chat servers: a user shapes
only the prompt of their own conversation, and nothing in the swarm trusts a prompt for the role it claims.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from swarm.protocol import ProtocolError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user", "assistant" (the OpenAI API also passes its other roles to the template)
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class ChatTooLongError(ProtocolError):
    """A chat message that, with the answer's token budget, does not fit the model's context even alone."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage]) -> str:
    """The prompt text of `messages`, ending where the assistant's answer starts."""
    dicts = [m.as_dict() for m in messages]
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"the chat template rendered {type(text).__name__}, not text")
        return text
    return "\n".join(f"{m.role}: {m.content}" for m in messages) + "\nassistant:"


def chat_prompt_ids(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """The token ids of `messages` rendered for an answer (see the module's invariants on special tokens)."""
    text = render_chat(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return [int(i) for i in ids]


def context_limit(config: Any) -> int | None:
    """The model's context in tokens (max_position_embeddings), or None when its config does not say."""
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


@dataclass(frozen=True)
class ChatTurn:
    """One prompt of a conversation, not yet part of its history: the ids to send and the messages they render."""

    prompt_ids: list[int]
    messages: tuple[ChatMessage, ...]
    dropped_exchanges: int  # oldest user/assistant exchanges left out so that the turn fits the context


@dataclass
class Conversation:
    """A chat's history under a context limit (see the module's invariants)."""

    tokenizer: Any
    limit: int | None  # the model's context in tokens; None: unbounded
    system: str | None = None
    history: list[ChatMessage] = field(default_factory=list)  # user/assistant alternating, oldest first

    def prompt(self, text: str, reserve: int) -> ChatTurn:
        """The turn asking `text`, leaving `reserve` tokens of context for the answer."""
        head = [ChatMessage("system", self.system)] if self.system else []
        history = list(self.history)
        dropped = 0
        while True:
            messages = (*head, *history, ChatMessage("user", text))
            ids = chat_prompt_ids(self.tokenizer, messages)
            if self.limit is None or len(ids) + reserve <= self.limit:
                if dropped:
                    logger.info("chat history: dropped the %d oldest exchanges to fit %d tokens", dropped, self.limit)
                return ChatTurn(ids, tuple(messages), dropped)
            if not history:
                raise ChatTooLongError(
                    f"the message ({len(ids)} tokens with the template) plus {reserve} tokens for the answer "
                    f"exceeds the model's context of {self.limit} tokens"
                )
            history = history[2:]  # the oldest exchange: a user message and its answer
            dropped += 1

    def record(self, turn: ChatTurn, answer: str) -> None:
        """Makes `turn` and its answer part of the history (with the exchanges it dropped gone)."""
        self.history = [m for m in turn.messages if m.role != "system"] + [ChatMessage("assistant", answer)]

    def reset(self) -> None:
        self.history = []

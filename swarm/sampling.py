"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chain.config_bounds import bounded, check_bounds


@dataclass
class GenerationParams:
    """How to generate. temperature 0 means greedy decoding."""

    max_new_tokens: int = bounded(64, ge=1)
    temperature: float = bounded(0.0, ge=0.0)
    top_k: int = bounded(0, ge=0)  # 0: all tokens
    top_p: float = bounded(1.0, gt=0.0, le=1.0)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past the end-of-sequence token (benchmarks, tests)

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_token(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """Picks one token id from a [vocab] logits vector."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < params.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

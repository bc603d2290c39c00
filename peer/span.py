"""Running a span of decoder layers: full-sequence forward/backward and cached incremental steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peer.kv_cache import SpanKVCache
from swarm.architectures import architecture_for

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def causal_mask(
    batch: int, new: int, past: int, dtype: torch.dtype, window: int | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """Additive mask letting each of `new` queries see the `past` cached keys and earlier new keys.

    None where nothing is masked (a single new token and no window): SDPA then needs no mask at all.
    An explicit mask is required otherwise; with mask=None transformers' SDPA path would treat a
    prefix + several new tokens as a square causal block and attend to the wrong keys.
    """
    total = past + new
    if new == 1 and (window is None or total <= window):
        return None
    q_pos = torch.arange(past, total, device=device).unsqueeze(1)
    k_pos = torch.arange(total, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    mask = torch.zeros(new, total, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.expand(batch, 1, new, total)


class SpanRunner:
    """The decoder layers `start..end-1` of one model, with the rotary embedding they share."""

    def __init__(self, config: PretrainedConfig, layers: torch.nn.ModuleList, start: int, end: int):
        self.config = config
        self.arch = architecture_for(config)
        self.layers = layers
        self.start, self.end = start, end
        first = next(layers.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.rotary = self.arch.rotary_embedding(config=config).to(self.device)
        self.hidden_size = config.hidden_size
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._windows = {
            i: (config.sliding_window if self.arch.uses_sliding_window(config, i) else None) for i in range(start, end)
        }

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def cache_bytes(self, batch: int, max_length: int, blocks: range | None = None) -> int:
        """Bytes of attention cache one session of this shape holds on this span."""
        n = len(blocks) if blocks is not None else self.num_blocks
        return 2 * n * batch * self.kv_heads * max_length * self.head_dim * self.dtype.itemsize

    def new_cache(self, batch: int, max_length: int, blocks: range) -> SpanKVCache:
        return SpanKVCache(blocks, batch, self.kv_heads, self.head_dim, max_length, self.dtype, self.device)

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: SpanKVCache | None = None,
        blocks: range | None = None,
    ) -> torch.Tensor:
        """Runs `hidden` [batch, tokens, hidden_size] through `blocks` (default: the whole span).

        Inputs move to the span's device and dtype; the output stays there (callers move it back).

        With a cache, the tokens are appended after the cached prefix and the cache is advanced.
        Autograd-capable when called with grad enabled (the backward RPC relies on this).
        """
        blocks = blocks if blocks is not None else range(self.start, self.end)
        hidden = hidden.to(self.device, self.dtype)
        batch, new = hidden.shape[:2]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + new, device=self.device).unsqueeze(0).expand(batch, new)
        position_embeddings = self.rotary(hidden, position_ids)
        masks: dict[int | None, torch.Tensor | None] = {}
        for i in blocks:
            window = self._windows[i]
            if window not in masks:
                masks[window] = causal_mask(batch, new, past, hidden.dtype, window, self.device)
            layer = self.layers[i - self.start]
            hidden = layer(
                hidden,
                attention_mask=masks[window],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        if cache is not None:
            cache.commit()
        return hidden

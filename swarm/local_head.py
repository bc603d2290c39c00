"""The parts of the model a client keeps at home: token embeddings, final norm and LM head.

The head computes in one dtype throughout (embedding, norm weight, LM head), like a transformers model loaded
in that dtype: a client of a bfloat16 swarm that took its logits in float32 would pick different greedy tokens
than the same model run in bfloat16 in one process (SmolLM2-135M diverges within 4 tokens).
`LocalHead.in_dtype` keeps one lazily made copy per other dtype, cast from the weights as loaded.
"""

from __future__ import annotations

from copy import deepcopy as copy_module
from pathlib import Path

import torch
from transformers import PretrainedConfig

from swarm.architectures import architecture_for
from swarm.model_files import ModelFilesError, read_tensors


class LocalHead(torch.nn.Module):
    """Embeddings in, logits out; read from the model's safetensors without touching its blocks."""

    def __init__(self, model_dir: Path, config: PretrainedConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        arch = architecture_for(config)
        tensors = read_tensors(model_dir, ["model.embed_tokens.", "model.norm.", "lm_head."], dtype=dtype)
        try:
            embed = tensors["model.embed_tokens.weight"]
            norm = tensors["model.norm.weight"]
        except KeyError as e:
            raise ModelFilesError(f"{model_dir} lacks {e.args[0]}") from None
        head = tensors.get("lm_head.weight", embed if getattr(config, "tie_word_embeddings", False) else None)
        if head is None:
            raise ModelFilesError(f"{model_dir} lacks lm_head.weight and the config does not tie it to the embeddings")
        self.embed = torch.nn.Embedding.from_pretrained(embed, freeze=True)  # type: ignore[no-untyped-call]
        self.norm = arch.rms_norm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        self.norm.weight.data.copy_(norm)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.lm_head.weight.data.copy_(head)
        self.requires_grad_(False)
        self.eval()
        self.dtype = dtype
        self._copies: dict[torch.dtype, LocalHead] = {}

    def in_dtype(self, dtype: torch.dtype) -> LocalHead:
        """This head computing in `dtype`: itself, or a copy made on first use (cast from these weights)."""
        if dtype == self.dtype:
            return self
        copy = self._copies.get(dtype)
        if copy is None:
            copies, self._copies = self._copies, {}  # a copy does not carry the other copies
            try:
                copy = copy_module(self).to(dtype)
            finally:
                self._copies = copies
            copy.dtype = dtype
            self._copies[dtype] = copy
        return copy

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.embed(input_ids)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(self.norm(hidden))
        return logits


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; label -100 marks positions that do not count (the prompt)."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)

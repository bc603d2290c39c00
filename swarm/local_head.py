"""The parts of the model a client keeps at home: token embeddings, final norm and LM head."""

from __future__ import annotations

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
        self.norm = arch.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm.weight.data.copy_(norm)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.lm_head.weight.data.copy_(head)
        self.requires_grad_(False)
        self.eval()

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

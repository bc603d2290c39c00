"""Loading one span of decoder layers from a model's safetensors files, and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from chain.errors import ConfigError
from swarm.architectures import architecture_for
from swarm.model_files import ModelFilesError, read_tensors

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class InvalidSpanError(ConfigError, ValueError):
    """The requested block range does not fit the model."""


def check_span(config: PretrainedConfig, start: int, end: int) -> None:
    """Raises InvalidSpanError unless 0 <= start < end <= num_hidden_layers."""
    n = config.num_hidden_layers
    if not (0 <= start < end <= n):
        raise InvalidSpanError(
            f"blocks {start}:{end} are not a valid span of a {n}-layer model (need 0 <= start < end <= {n})"
        )


def load_span_layers(
    model_dir: Path,
    config: PretrainedConfig,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.nn.ModuleList:
    """Builds decoder layers `start..end-1` and fills them with their weights from disk.

    Layers are created on the meta device and the loaded tensors assigned in place, so memory holds
    exactly this span's weights once (a real model's other layers are never read).
    """
    check_span(config, start, end)
    arch = architecture_for(config)
    prefixes = [f"model.layers.{i}." for i in range(start, end)]
    tensors = read_tensors(model_dir, prefixes, dtype=dtype)
    layers = []
    for i in range(start, end):
        prefix = f"model.layers.{i}."
        state = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        with torch.device("meta"):
            layer = arch.decoder_layer(config, layer_idx=i)
        missing = set(layer.state_dict()) - set(state)
        if missing:
            raise ModelFilesError(f"{model_dir}: layer {i} lacks tensors {sorted(missing)[:4]}")
        layer.load_state_dict(state, strict=True, assign=True)
        layer.to(device)
        layer.requires_grad_(False)
        layers.append(layer.eval())
    return torch.nn.ModuleList(layers)

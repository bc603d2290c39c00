"""Which decoder architectures a swarm can serve, and how to build their pieces.

Every supported family shares the transformers 5.x decoder-layer interface
(`layer(hidden, attention_mask=, position_embeddings=, position_ids=, past_key_values=)`), a rotary
embedding module computing (cos, sin) from position ids, an RMSNorm, and the checkpoint layout
`model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chain.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported only with a model's modeling code (architecture_for)
    from types import SimpleNamespace

    from transformers import PretrainedConfig


class UnsupportedArchitectureError(ConfigError, ValueError):
    """The model's architecture is not one a DLLM peer can serve."""


@dataclass(frozen=True)
class Architecture:
    """The classes that make up one decoder family in transformers."""

    model_type: str
    decoder_layer: type
    rotary_embedding: type
    rms_norm: type

    def uses_sliding_window(self, config: PretrainedConfig, layer_index: int) -> bool:
        """Whether layer `layer_index` attends to a sliding window rather than the whole prefix."""
        window = getattr(config, "sliding_window", None)
        if not window:
            return False
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return bool(layer_types[layer_index] == "sliding_attention")
        return self.model_type == "mistral"


_FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
}

SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


def check_supported(config: PretrainedConfig | SimpleNamespace) -> None:
    """Raises UnsupportedArchitectureError naming the architecture unless DLLM can serve it (cheap: no imports).

    `config` is a transformers config or config.json's fields as read by `read_config_fields`."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown"
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} (architectures: {arch}) is not supported by DLLM; "
            f"supported decoder families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def architecture_for(config: PretrainedConfig) -> Architecture:
    """Returns the decoder family of `config` (importing its modeling code), or raises UnsupportedArchitectureError."""
    check_supported(config)
    model_type = config.model_type
    prefix = _FAMILIES[model_type]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return Architecture(
        model_type=model_type,
        decoder_layer=getattr(module, f"{prefix}DecoderLayer"),
        rotary_embedding=getattr(module, f"{prefix}RotaryEmbedding"),
        rms_norm=getattr(module, f"{prefix}RMSNorm"),
    )

"""DLLM: a dynamic LLM served by a peer-to-peer swarm."""

from __future__ import annotations

import pathlib


def default_model_path() -> pathlib.Path:
    """Folder of the embedded default model "dllm-tiny-llama" (pass it as --model).

    It holds config.json, model.safetensors and tokenizer files loadable with
    `transformers.Auto*.from_pretrained(folder)` offline.
    """
    return pathlib.Path(__file__).resolve().parent / "default_model"

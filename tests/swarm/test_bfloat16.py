"""A bfloat16 swarm end to end: `dllm peer join --dtype bfloat16` processes against the model loaded in bfloat16
by transformers in one process.

Invariants checked: the peers announce bfloat16 and a cache of twice the tokens a float32 span fits in the same
`--cache-mb`; a client of an all-bfloat16 swarm embeds and takes logits in bfloat16, so its logits are bit-equal
to local transformers' and its greedy tokens equal local `generate` for 32 tokens; a `dllm verify --dtype
bfloat16` process passes honest bfloat16 work and fails a 5 % scaled step. The same greedy check with the real
model (SmolLM2-135M, 3 peers x 10 blocks) is marked real_model.
"""

from __future__ import annotations

import time

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from substrateinterface import Keypair
from transformers import AutoModelForCausalLM

from dllm.processes import LocalSwarm
from economy.metering import StepKind, UsageMeter
from economy.pricing import ProviderRate
from economy.receipts import SignedReceipt, receipt_for_segment
from economy.verification import SignedVerdict
from economy.work_sample import SampledStep, WorkSample
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from swarm import protocol
from swarm.client import DistributedModel, swarm_dtype
from swarm.model_files import load_config
from swarm.sampling import GenerationParams
from tests.peer.learning_swarm import peer_info

PROMPTS = ["The module", "Return the value of"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def bf16_swarm(tiny_model_path, tmp_path_factory):
    """2 bfloat16 peers (0:4, 4:8), 1 MiB of attention cache each."""
    local = LocalSwarm(str(tiny_model_path), workdir=tmp_path_factory.mktemp("bf16-swarm"))
    try:
        local.start_bootstrap()
        peers = [local.start_peer(b, "--dtype", "bfloat16", "--cache-mb", "1", wait=False) for b in ("0:4", "4:8")]
        for peer in peers:
            local.wait_ready(peer)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def bf16_client(bf16_swarm, tiny_model_path):
    model = DistributedModel.from_pretrained(str(tiny_model_path), bf16_swarm.initial_peers)
    yield model
    model.close()


@pytest.fixture(scope="module")
def local_bf16(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).eval()


def test_peers_announce_bfloat16_and_twice_the_cache_tokens(bf16_client, tiny_model_path):
    config = load_config(tiny_model_path)
    fp32_bytes_per_token = 2 * 4 * config.num_key_value_heads * config.head_dim * 4  # k and v, 4 blocks, float32
    records = bf16_client._loop.run(bf16_client.core.records(refresh=True))
    assert sorted((r.start, r.end) for r in records) == [(0, 4), (4, 8)]
    assert {r.dtype for r in records} == {"bfloat16"}
    assert swarm_dtype(records) == torch.bfloat16
    for r in records:  # announced before any session: the whole budget is free
        assert r.cache_tokens_free == 2 * (2**20 // fp32_bytes_per_token) == 512


def test_logits_are_bit_equal_to_local_bfloat16_transformers(bf16_client, local_bf16):
    head = bf16_client.core.head.in_dtype(torch.bfloat16)
    ids = torch.randint(0, local_bf16.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        embedded = head.embed_tokens(ids)
        expected = local_bf16(ids).logits
    out, hops, inputs = bf16_client._loop.run(bf16_client.core.forward_hidden(embedded))
    assert len(hops) == 2 and all(x.dtype == torch.bfloat16 for x in inputs)  # bfloat16 on the wire
    with torch.inference_mode():
        logits = head.logits(out)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_local_bfloat16_generation(bf16_client, local_bf16, prompt):
    ids = bf16_client.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = local_bf16.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
    result = bf16_client.generate(prompt, GenerationParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert len(result.route) == 2
    assert result.token_ids == expected


def bfloat16_work(span: SpanRunner, model: str, *, scale: float) -> WorkSample:
    """A session served in-process as a bfloat16 peer serves it (8-token prompt, 4 cached steps), co-signed by
    //Bob (provider) and //Alice (client); step 2's output multiplied by `scale`."""
    provider, client = Keypair.create_from_uri("//Bob"), Keypair.create_from_uri("//Alice")
    x = torch.randn(1, 12, span.hidden_size, generator=torch.Generator().manual_seed(7))
    cache = span.new_cache(1, 12, range(span.start, span.end))
    meter = UsageMeter(b"bf16-work", model, span.start, span.end, 1_600_000)
    steps, position = [], 0
    with torch.inference_mode():
        for i, inputs in enumerate([x[:, :8]] + [x[:, t : t + 1] for t in range(8, 12)]):
            out = span.forward(inputs, cache=cache).float() * (scale if i == 2 else 1.0)
            kind = StepKind.PROMPT if i == 0 else StepKind.GENERATED
            meter.record_step(kind, inputs.shape[1], inputs, out)
            steps.append(SampledStep(kind, position, inputs, out))
            position += inputs.shape[1]
    usage, before, after = meter.close_segment()
    receipt = receipt_for_segment(
        network="dllm-dev",
        session_id=b"bf16-work",
        sequence=0,
        model=model,
        start=span.start,
        end=span.end,
        params_served=1_600_000,
        rate=ProviderRate.from_advertised(10**9),
        usage=usage,
        provider=provider.ss58_address,
        client=client.ss58_address,
        commitment_before=before,
        commitment=after,
        issued_at=int(time.time()),
        dtype="bfloat16",
    )
    return WorkSample(SignedReceipt.create(receipt, provider, client), tuple(steps))


def test_a_bfloat16_verifier_process_judges_bfloat16_work(bf16_swarm, bf16_client, tiny_model_path):
    """`dllm verify --dtype bfloat16`: re-runs in bfloat16, passes honest bfloat16 work, fails a 5 % scaled step."""
    verifier = bf16_swarm.start_verifier("//Charlie", "--dtype", "bfloat16")
    info = peer_info(bf16_client, verifier.info["peer_id"])
    assert info["dtype"] == "bfloat16"
    config = load_config(tiny_model_path)
    span = SpanRunner(config, load_span_layers(tiny_model_path, config, 0, 8, dtype=torch.bfloat16), 0, 8)
    for scale, passes in ((1.0, True), (1.05, False)):
        sample = bfloat16_work(span, info["model"], scale=scale)
        request = runtime_pb2.ExpertRequest(metadata=msgpack.packb({"sample": sample.encode()}, use_bin_type=True))
        call = bf16_client.core.call(verifier.info["peer_id"], protocol.HANDLER_VERIFY, request, timeout=60)
        meta = msgpack.unpackb(bf16_client._loop.run(call).metadata, raw=False)
        verdict = SignedVerdict.decode(meta["verdict"]).verdict
        assert verdict.passed == passes, (scale, verdict)
    assert verdict.worst_error_ppm > 40_000  # the 5 % step, against bfloat16's 4.03e-2 on 8 blocks
    assert peer_info(bf16_client, verifier.info["peer_id"])["checked"] == 2


@pytest.fixture(scope="module")
def real_bf16_swarm(real_model_path, tmp_path_factory):
    """SmolLM2-135M in bfloat16: 3 peers x 10 blocks."""
    local = LocalSwarm("smollm2", workdir=tmp_path_factory.mktemp("real-bf16-swarm"))
    try:
        local.start_bootstrap()
        spans = ("0:10", "10:20", "20:30")
        peers = [local.start_peer(span, "--dtype", "bfloat16", wait=False) for span in spans]
        for peer in peers:
            local.wait_ready(peer, timeout=300)
        yield local
    finally:
        local.stop()


@pytest.mark.real_model
@pytest.mark.timeout(600)
def test_real_model_bfloat16_swarm_equals_local_bfloat16_transformers(real_bf16_swarm, real_model_path):
    """Greedy, 32 tokens: a chat answer, and a raw prompt whose tokens a float32 client head would change at
    the 4th token (why the client's head computes in the swarm's dtype)."""
    local = AutoModelForCausalLM.from_pretrained(real_model_path, dtype=torch.bfloat16).eval()
    model = DistributedModel.from_pretrained(str(real_model_path), real_bf16_swarm.initial_peers)
    try:
        chat = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
        )
        texts = []
        for prompt in (str(chat), "The module"):
            ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                expected = local.generate(
                    ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
                )[0, ids.shape[1] :].tolist()
            result = model.generate(prompt, GenerationParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
            assert len(result.route) == 3
            assert result.token_ids == expected, (prompt, result.text)
            texts.append(result.text)
        assert "Paris" in texts[0]
    finally:
        model.close()

"""An honest learning peer is never failed by a spot check.

Receipts state the adapter version a session ran with (signed by both parties). Verifiers hold the
base model only, so they re-run base-weight work (adapter_version 0) and abstain on anything else;
clients do not even send such samples. Two levels: real Llama blocks with a promoted LoRA version
and an in-process `Verifier`; then a real swarm (learning billing peer, `dllm verify`, dev chain).
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from chain.ledger import ComputeLedger
from dllm.verifier import Verifier, VerifierConfig
from economy.metering import StepKind, UsageMeter
from economy.pricing import ProviderRate
from economy.receipts import BASE_WEIGHTS, TRAINING_ADAPTERS, SignedReceipt, UsageReceipt, receipt_for_segment
from economy.verification import Tolerance, compare_activations, recheck
from economy.work_sample import SampledStep, UnverifiableSampleError, WorkSample
from peer.adapters import AdapterSet, LoraConfig
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from swarm.billing import BillingConfig
from swarm.client import ClientConfig, DistributedModel, GenerationParams
from swarm.model_files import load_config
from swarm.protocol import HANDLER_VERIFY
from tests.economy.swarm_economy import UNIT, funded_key, start_verifier
from tests.peer.learning_swarm import (
    FACTS,
    FACTS_CANARY,
    just_after_round,
    learning_args,
    peer_info,
    wait_for_peers,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

RATE = 10**10
PERIOD = 6.0


# ------------------------------------------------------------------ economy level: real blocks, in-process verifier


def _span(model_path) -> SpanRunner:
    config = load_config(model_path)
    return SpanRunner(config, load_span_layers(model_path, config, 0, 4), 0, 4)


def _learning_span(model_path, promote: bool) -> tuple[SpanRunner, AdapterSet, int]:
    """Blocks 0:4 with LoRA adapters: at version 0 (B = 0), or with a promoted version whose B is non-zero
    (what averaging makes live)."""
    span = _span(model_path)
    adapters = AdapterSet(span.layers, 0, LoraConfig(rank=4))
    if not promote:
        return span, adapters, BASE_WEIGHTS
    g = torch.Generator().manual_seed(3)
    update = {
        name: t.detach() + (0.05 * torch.randn(t.shape, generator=g) if name.endswith("lora_B") else 0)
        for name, t in adapters.working.items()
    }
    version = adapters.propose(update)
    adapters.promote(version)
    return span, adapters, version


def _serve(
    span: SpanRunner, adapters: AdapterSet, keys, adapter_version: int, claimed_version: int | None = None
) -> WorkSample:
    """A prompt + 6 cached decode steps served as a peer does, metered, co-signed with the claimed version."""
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(1, 8, span.hidden_size, generator=g)] + [
        torch.randn(1, 1, span.hidden_size, generator=g) for _ in range(6)
    ]
    cache = span.new_cache(1, 32, range(0, 4))
    meter = UsageMeter(b"adapted-session", "tiny", 0, 4, 800_000)
    steps, position = [], 0
    for i, x in enumerate(inputs):
        with torch.no_grad(), adapters.use(adapter_version):
            out = span.forward(x, cache=cache).float()
        kind = StepKind.PROMPT if i == 0 else StepKind.GENERATED
        meter.record_step(kind, x.shape[1], x, out)
        steps.append(SampledStep(kind, position, x, out))
        position += x.shape[1]
    usage, before, after = meter.close_segment()
    receipt = receipt_for_segment(
        network="dllm-dev",
        session_id=b"adapted-session",
        sequence=0,
        model="tiny",
        start=0,
        end=4,
        params_served=800_000,
        rate=ProviderRate.from_advertised(10**9),
        usage=usage,
        provider=keys["bob"].ss58_address,
        client=keys["alice"].ss58_address,
        commitment_before=before,
        commitment=after,
        issued_at=int(time.time()),
        adapter_version=adapter_version if claimed_version is None else claimed_version,
    )
    return WorkSample(SignedReceipt.create(receipt, keys["bob"], keys["alice"]), tuple(steps))


def test_receipt_signs_the_adapter_version(make_receipt) -> None:
    signed = make_receipt()
    assert signed.receipt.adapter_version == BASE_WEIGHTS and signed.receipt.base_weights
    for version in (1, 7, TRAINING_ADAPTERS):
        adapted = UsageReceipt(**{**signed.receipt.__dict__, "adapter_version": version})
        assert UsageReceipt.decode(adapted.encode()) == adapted and not adapted.base_weights
        assert adapted.receipt_id != signed.receipt_id  # the version is part of what both parties sign


def test_verifier_abstains_on_adapted_work_and_still_catches_a_false_base_claim(tiny_model_path, keys) -> None:
    span, adapters, version = _learning_span(tiny_model_path, promote=True)
    honest = _serve(span, adapters, keys, version)
    base = _span(tiny_model_path)
    inputs, positions, claimed = honest.forward_batch()
    with torch.no_grad():
        plain = base.forward(inputs, position_ids=positions)
    # The honest adapted outputs are far from a base re-run: judging them would fail an honest peer.
    assert not compare_activations(claimed, plain, Tolerance.for_dtype(torch.float32)).passed

    verifier = Verifier(VerifierConfig(model="tiny", key="//Charlie", initial_peers=[]), base, "tiny", bus=None)
    try:
        with pytest.raises(UnverifiableSampleError, match=f"adapter version {version}"):
            asyncio.run(verifier.check(honest))
        assert (verifier.stats.unverifiable, verifier.stats.checked, verifier.stats.failed) == (1, 0, 0)
        with pytest.raises(UnverifiableSampleError, match="training pass"):
            asyncio.run(verifier.check(_serve(span, adapters, keys, version, claimed_version=TRAINING_ADAPTERS)))
        with pytest.raises(UnverifiableSampleError):  # recheck itself refuses too (defence in depth)
            recheck(honest, base.forward, Tolerance())

        # Work served with the base weights by a learning peer (version 0: B is zero) passes.
        fresh, fresh_adapters, _ = _learning_span(tiny_model_path, promote=False)
        at_zero = _serve(fresh, fresh_adapters, keys, BASE_WEIGHTS)
        assert asyncio.run(verifier.check(at_zero)).verdict.passed
        # A provider that signs "base weights" for adapted outputs is judged, and fails.
        lying = _serve(span, adapters, keys, version, claimed_version=BASE_WEIGHTS)
        assert not asyncio.run(verifier.check(lying)).verdict.passed
        assert (verifier.stats.unverifiable, verifier.stats.checked, verifier.stats.failed) == (2, 2, 1)
    finally:
        verifier.close()


# ------------------------------------------------------------------ swarm level: learning peer, dllm verify, dev chain


def test_learning_peer_with_live_adapters_gets_no_failing_verdict(dev_chain, local_swarm, tiny_model_path, tmp_path):
    ledger = ComputeLedger(dev_chain.url)
    try:
        peer_uri, _ = funded_key(ledger)
        client_uri, _ = funded_key(ledger, 1000 * UNIT)
    finally:
        ledger.close()
    canary = tmp_path / "canary.txt"  # held-out phrasings of the taught facts: the update passes the gate
    canary.write_text(FACTS_CANARY)
    verifier = start_verifier(local_swarm, "//Alice", dev_chain.url)
    peer = local_swarm.start_peer(
        "0:8",
        "--chain-url",
        dev_chain.url,
        "--chain-key",
        peer_uri,
        "--stake",
        "5",
        "--rate",
        str(RATE),
        "--receipts",
        str(tmp_path / "learner.sqlite3"),
        "--settle-interval",
        "2",
        *learning_args(PERIOD, canary),
        name="learner",
        wait=True,
        timeout=120,
    )
    billing = BillingConfig(dev_chain.url, client_uri, sample_rate=1.0, verifiers_per_sample=1)
    model = DistributedModel.from_pretrained(
        str(tiny_model_path), local_swarm.initial_peers, config=ClientConfig(billing=billing)
    )
    core = model.core
    greedy = GenerationParams(max_new_tokens=4, ignore_eos=True)
    try:
        wait_until(lambda: model._loop.run(core.billing.verifier_peers()), 30, "the verifier in the DHT")

        # Adapters at version 0 are the base weights: the session is spot-checked and passes.
        on_base = model.generate(FACTS[0][0], greedy)
        model._loop.run(core.billing.flush())
        assert on_base.billing is not None
        (base_receipt,) = [s.receipt for s in on_base.billing.receipts]
        assert base_receipt.adapter_version == BASE_WEIGHTS
        assert [v.verdict.passed for v in core.billing.verdicts] == [True], core.billing.sample_failures

        # Feedback trains the adapters; the next averaging round makes version >= 1 live.
        just_after_round(PERIOD)
        for _ in range(2):
            for prompt, completion in FACTS:
                model.feedback(prompt, completion)
        ids = {"learner": peer.info["peer_id"]}
        live = wait_for_peers(model, ids, lambda i: i["adapter_version"] >= 1, 60, "a live adapter version")["learner"]

        # A session on the live adapters: its receipt states the version, it is paid, and it is not sent.
        adapted = model.generate(FACTS[0][0], greedy)
        model._loop.run(core.billing.flush())
        session = adapted.billing
        assert session is not None
        (signed,) = session.receipts
        assert signed.receipt.adapter_version >= live["adapter_version"] >= 1
        assert core.billing.unverifiable_samples == [signed.receipt_id]
        assert len(core.billing.verdicts) == 1 and core.billing.sample_failures == []

        # Even if a client sends it, the verifier abstains: no verdict, counted as unverifiable.
        (meter,) = session.meters.values()
        sample = WorkSample(signed, tuple(meter.steps))
        inputs, positions, claimed = sample.forward_batch()
        base = SpanRunner(
            load_config(tiny_model_path), load_span_layers(tiny_model_path, load_config(tiny_model_path), 0, 8), 0, 8
        )
        with torch.no_grad():  # the honest adapted outputs would fail a base re-run
            assert not compare_activations(
                claimed, base.forward(inputs, position_ids=positions), Tolerance.for_dtype(torch.float32)
            ).passed
        request = runtime_pb2.ExpertRequest(metadata=msgpack.packb({"sample": sample.encode()}, use_bin_type=True))
        response = model._loop.run(
            core.p2p.call_protobuf_handler(
                PeerID.from_base58(verifier.info["peer_id"]), HANDLER_VERIFY, request, runtime_pb2.ExpertResponse
            )
        )
        reply = msgpack.unpackb(response.metadata, raw=False)
        assert reply["error"]["kind"] == "unverifiable" and "verdict" not in reply, reply
        stats = peer_info(model, verifier.info["peer_id"])
        assert (stats["checked"], stats["failed"], stats["unverifiable"]) == (1, 0, 1), stats
        assert stats["rejected"] == {}, stats
    finally:
        model.close()

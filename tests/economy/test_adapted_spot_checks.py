"""Adapted work is spot-checked like base-weight work, and an honest learning peer is never failed.

Receipts state the adapter version a session ran with AND the sha256 of that version's adapters
(signed by both parties). A verifier fetches those adapters by digest (from the provider or a replica),
checks them against the receipt, and re-runs the work with them; a provider that does not hand them
over gets a failing verdict ("adapters unavailable"). Levels: real Llama blocks with a promoted LoRA
version and an in-process `Verifier`; the adapter exchange over real hivemind P2P; then a real swarm
(learning billing peer, `dllm verify`, dev chain).
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from dllm.verifier import Verifier, VerifierConfig
from economy.evidence_store import EvidenceStore
from economy.metering import StepKind, UsageMeter
from economy.receipts import (
    BASE_WEIGHTS,
    NO_ADAPTER_DIGEST,
    TRAINING_ADAPTERS,
    MalformedReceiptError,
    TrainingClaimError,
    UsageReceipt,
    check_claim,
)
from economy.verification import ADAPTERS_UNAVAILABLE, SignedVerdict, Tolerance, compare_activations, recheck
from economy.work_sample import SampledStep, UnverifiableSampleError, WorkSample
from peer.adapter_exchange import AdapterServer, fetch_adapters
from peer.adapters import (
    AdapterArchive,
    AdapterBundle,
    AdapterDigestMismatchError,
    AdapterSet,
    LoraConfig,
    adapter_digest,
    applied_adapters,
    retain_version,
)
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from swarm.client import GenerationParams
from swarm.model_files import load_config
from swarm.protocol import HANDLER_VERIFY, RemotePeerError
from tests.economy.receipt_helpers import co_signed
from tests.economy.swarm_economy import (
    UNIT,
    funded_key,
    spot_checked_client,
    start_billing_peer,
    start_cheater,
    start_verifier,
)
from tests.peer.learning_swarm import (
    FACTS,
    FACTS_CANARY,
    just_after_round,
    learning_args,
    peer_info,
    wait_for_peers,
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


def _digest_of(adapters: AdapterSet, version: int) -> bytes:
    if version in (BASE_WEIGHTS, TRAINING_ADAPTERS):
        return NO_ADAPTER_DIGEST
    return adapter_digest(adapters.state(version).tensors, adapters.config.scaling)


def _serve(
    span: SpanRunner,
    adapters: AdapterSet,
    keys,
    adapter_version: int,
    claimed_version: int | None = None,
    corrupt_step: int | None = None,
) -> WorkSample:
    """A prompt + 6 cached decode steps served as a peer does, metered, co-signed with the claimed version
    (and that version's digest); `corrupt_step` returns that step's outputs scaled by 1.1."""
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
        if i == corrupt_step:
            out = out * 1.1
        kind = StepKind.PROMPT if i == 0 else StepKind.GENERATED
        meter.record_step(kind, x.shape[1], x, out)
        steps.append(SampledStep(kind, position, x, out))
        position += x.shape[1]
    claimed = adapter_version if claimed_version is None else claimed_version
    receipt = co_signed(
        keys["bob"],
        keys["alice"],
        meter,
        adapter_version=claimed,
        adapter_digest=_digest_of(adapters, claimed)
        if claimed not in (BASE_WEIGHTS, TRAINING_ADAPTERS)
        else NO_ADAPTER_DIGEST,
    )
    return WorkSample(receipt, tuple(steps))


class _Sources:
    """In-process stand-in for the swarm: peer id -> what that peer hands over for a digest."""

    def __init__(self, **peers: AdapterArchive | None):
        self.peers = peers
        self.calls: list[str] = []

    async def sources(self, receipt: UsageReceipt) -> list[str]:
        return list(self.peers)

    async def fetch(self, peer_id: str, digest: bytes) -> AdapterBundle:
        self.calls.append(peer_id)
        archive = self.peers[peer_id]
        if archive is None:
            raise RemotePeerError("refused", peer_id, "invalid_request")
        return archive.get(digest) if digest in archive._bundles else next(iter(archive._bundles.values()))[0]


def _verifier(span: SpanRunner, tmp_path, sources: _Sources | None = None) -> Verifier:
    config = VerifierConfig(model="tiny", key="//Charlie", initial_peers=[])
    verifier = Verifier(config, span, "tiny", None, EvidenceStore(tmp_path / "evidence.sqlite3"))
    verifier.adapter_fetch_backoff_s = 0.05
    if sources is not None:
        verifier.adapter_sources, verifier.fetch_adapters = sources.sources, sources.fetch
    return verifier


def test_receipt_signs_the_adapter_version_and_digest(make_receipt) -> None:
    signed = make_receipt()
    r = signed.receipt
    assert r.adapter_version == BASE_WEIGHTS and r.base_weights and r.adapter_digest == NO_ADAPTER_DIGEST
    for version in (1, 7):
        adapted = UsageReceipt(**{**r.__dict__, "adapter_version": version, "adapter_digest": bytes([version]) * 32})
        assert UsageReceipt.decode(adapted.encode()) == adapted and adapted.published_adapters
        assert adapted.receipt_id != r.receipt_id  # version and digest are part of what both parties sign
        other = UsageReceipt(**{**adapted.__dict__, "adapter_digest": bytes(31) + b"\x01"})
        assert other.receipt_id != adapted.receipt_id
        with pytest.raises(MalformedReceiptError, match="adapter digest"):  # a version without its digest
            UsageReceipt.decode(UsageReceipt(**{**adapted.__dict__, "adapter_digest": NO_ADAPTER_DIGEST}).encode())
    training = UsageReceipt(**{**r.__dict__, "adapter_version": TRAINING_ADAPTERS})
    assert UsageReceipt.decode(training.encode()) == training and not training.published_adapters


def test_adapter_digest_is_canonical_and_merging_restores_the_weights(tiny_model_path) -> None:
    span, adapters, version = _learning_span(tiny_model_path, promote=True)
    state = adapters.state(version)
    digest = adapter_digest(state.tensors, adapters.config.scaling)
    # Computable from the tensors alone: order, device copies and dtype of the holder do not matter.
    shuffled = {name: state.tensors[name].double() for name in reversed(list(state.tensors))}
    assert adapter_digest(shuffled, adapters.config.scaling) == digest
    assert AdapterBundle.decode(AdapterBundle(adapters.config.scaling, state.tensors).encode()).digest == digest
    assert adapter_digest(state.tensors, adapters.config.scaling * 2) != digest  # the scaling is covered
    changed = dict(state.tensors)
    name = next(n for n in changed if n.endswith("lora_B"))
    changed[name] = changed[name].clone()
    changed[name][0, 0] += 1e-6
    assert adapter_digest(changed, adapters.config.scaling) != digest

    base = _span(tiny_model_path)
    before = {n: p.detach().clone() for n, p in base.layers.named_parameters()}
    with applied_adapters(base.layers, 0, AdapterBundle(adapters.config.scaling, state.tensors)):
        assert any(not torch.equal(p, before[n]) for n, p in base.layers.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in base.layers.named_parameters())


def test_learning_provider_is_checked_with_its_adapters(tiny_model_path, keys, tmp_path) -> None:
    """Honest adapted work passes; corrupted adapted work is caught; a false base claim is caught."""
    span, adapters, version = _learning_span(tiny_model_path, promote=True)
    provider = AdapterArchive()
    retain_version(adapters, provider, version)
    sources = _Sources(provider=provider)
    base = _span(tiny_model_path)
    honest = _serve(span, adapters, keys, version)
    inputs, positions, claimed = honest.forward_batch()
    with torch.no_grad():  # the honest adapted outputs are far from a base re-run: why adapters must be fetched
        plain = base.forward(inputs, position_ids=positions)
    assert not compare_activations(claimed, plain, Tolerance.for_dtype(torch.float32)).passed

    verifier = _verifier(base, tmp_path, sources)
    try:
        verdict = asyncio.run(verifier.check(honest)).verdict
        assert verdict.passed and verdict.reason == "", verdict
        assert verdict.worst_error_ppm < Tolerance.for_dtype("float32", 4).rel_l2 * 1e6
        corrupted = asyncio.run(verifier.check(_serve(span, adapters, keys, version, corrupt_step=3))).verdict
        assert not corrupted.passed and corrupted.worst_error_ppm > 50_000, corrupted
        lying = asyncio.run(verifier.check(_serve(span, adapters, keys, version, claimed_version=BASE_WEIGHTS)))
        assert not lying.verdict.passed  # adapted outputs under a "base weights" receipt
        # The verifier's span is its base model again after each adapted re-run.
        fresh, fresh_adapters, _ = _learning_span(tiny_model_path, promote=False)
        assert asyncio.run(verifier.check(_serve(fresh, fresh_adapters, keys, BASE_WEIGHTS))).verdict.passed
        assert (verifier.stats.checked, verifier.stats.failed, verifier.stats.unverifiable) == (4, 2, 0)
        assert sources.calls == ["provider", "provider"]  # one fetch per adapted check
        # A training pass (unpublished working adapters) is never judged.
        with pytest.raises(UnverifiableSampleError, match="training pass"):
            asyncio.run(verifier.check(_serve(span, adapters, keys, version, claimed_version=TRAINING_ADAPTERS)))
        with pytest.raises(UnverifiableSampleError):  # recheck refuses a base re-run of adapted work too
            recheck(honest, base.forward, Tolerance())
    finally:
        verifier.close()
    # A verifier that cannot fetch adapters at all abstains rather than judging with the wrong weights.
    blind = _verifier(base, tmp_path)
    try:
        with pytest.raises(UnverifiableSampleError, match=f"adapter version {version}"):
            asyncio.run(blind.check(honest))
    finally:
        blind.close()


def test_provider_that_refuses_its_adapters_fails_the_check(tiny_model_path, keys, tmp_path) -> None:
    span, adapters, version = _learning_span(tiny_model_path, promote=True)
    sources = _Sources(provider=None)  # answers every adapters request with a refusal
    verifier = _verifier(_span(tiny_model_path), tmp_path, sources)
    try:
        signed = asyncio.run(verifier.check(_serve(span, adapters, keys, version)))
        assert not signed.verdict.passed and signed.verdict.reason == ADAPTERS_UNAVAILABLE
        assert sources.calls == ["provider"] * verifier.adapter_fetch_attempts  # a bounded retry, then the verdict
        assert (verifier.stats.checked, verifier.stats.failed) == (1, 1)
        assert verifier.store.sample(signed.verdict.evidence_hash) is not None  # kept as evidence
        assert verifier.store.verdicts_on(signed.verdict.evidence_hash) == [signed]
    finally:
        verifier.close()


def test_adapters_not_matching_the_receipt_digest_are_refused(tiny_model_path, keys, tmp_path) -> None:
    span, adapters, version = _learning_span(tiny_model_path, promote=True)
    sample = _serve(span, adapters, keys, version)
    # The provider hands over other adapters (those of version 0, which it also "has"): refused by digest.
    other = AdapterArchive()
    retain_version(adapters, other, BASE_WEIGHTS)
    sources = _Sources(provider=other)
    verifier = _verifier(_span(tiny_model_path), tmp_path, sources)
    try:
        signed = asyncio.run(verifier.check(sample))
        assert not signed.verdict.passed and signed.verdict.reason == ADAPTERS_UNAVAILABLE
        assert len(sources.calls) == verifier.adapter_fetch_attempts
    finally:
        verifier.close()
    # A replica of the span holding the right version is as good a source: the check passes.
    replica = AdapterArchive()
    retain_version(adapters, replica, version)
    sources = _Sources(provider=other, replica=replica)
    verifier = _verifier(_span(tiny_model_path), tmp_path / "second", sources)
    try:
        assert asyncio.run(verifier.check(sample)).verdict.passed
        assert sources.calls == ["provider", "replica"]
    finally:
        verifier.close()


def test_client_refuses_a_training_claim_on_work_without_a_backward_pass(tiny_model_path, keys) -> None:
    """A training pass is the one kind of work never re-run: a provider must not claim it to dodge checks."""
    span, adapters, version = _learning_span(tiny_model_path, promote=True)
    for claimed in (version, BASE_WEIGHTS):
        r = _serve(span, adapters, keys, version, claimed_version=claimed).receipt.receipt
        check_claim(r, r.usage, r.commitment, r.rate, r.params_served)
    r = _serve(span, adapters, keys, version, claimed_version=TRAINING_ADAPTERS).receipt.receipt
    with pytest.raises(TrainingClaimError, match="no backward pass"):
        check_claim(r, r.usage, r.commitment, r.rate, r.params_served)


def test_adapters_travel_by_digest_over_p2p(tiny_model_path) -> None:
    """`dllm.v1.adapters` on real hivemind P2P: streamed, checked against the digest asked for."""
    _, adapters, version = _learning_span(tiny_model_path, promote=True)
    archive = AdapterArchive()
    digest = retain_version(adapters, archive, version)

    async def run() -> None:
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(initial_peers=[str(m) for m in await server.get_visible_maddrs()])
        try:
            await AdapterServer(archive).add_handlers(server)
            peer = server.peer_id.to_base58()
            bundle = await fetch_adapters(client, peer, digest, timeout_s=30)
            assert bundle.digest == digest and set(bundle.tensors) == set(adapters.names)
            with pytest.raises(RemotePeerError, match="no adapters with digest"):
                await fetch_adapters(client, peer, bytes(32), timeout_s=30)
            archive._bundles[bytes(32)] = archive._bundles[digest]  # a peer answering other adapters
            with pytest.raises(AdapterDigestMismatchError):
                await fetch_adapters(client, peer, bytes(32), timeout_s=30)
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(run())


def test_archive_keeps_versions_for_the_retention_period() -> None:
    archive = AdapterArchive(retention_s=100.0)
    bundle = AdapterBundle(
        2.0, {"layers.0.q_proj.lora_A": torch.ones(2, 3), "layers.0.q_proj.lora_B": torch.zeros(3, 2)}
    )
    digest = archive.retain(bundle, now=1000.0)
    assert archive.get(digest, now=1099.0) is bundle
    assert archive.touch(digest, now=1050.0)  # a later session on the same version extends it
    assert archive.get(digest, now=1149.0) is bundle
    with pytest.raises(Exception, match="no adapters"):
        archive.get(digest, now=1151.0)


# ------------------------------------------------------------------ swarm level: learning peer, dllm verify, dev chain


def test_learning_peer_is_spot_checked_with_its_live_adapters_and_passes(
    dev_chain, ledger, local_swarm, tiny_model_path, tmp_path
):
    peer_uri, _ = funded_key(ledger)
    client_uri, _ = funded_key(ledger, 1000 * UNIT)
    canary = tmp_path / "canary.txt"  # held-out phrasings of the taught facts: the update passes the gate
    canary.write_text(FACTS_CANARY)
    verifier = start_verifier(local_swarm, "//Alice", dev_chain.url)
    learning = learning_args(PERIOD, canary)
    peer = start_billing_peer(
        local_swarm, "0:8", peer_uri, dev_chain.url, tmp_path / "learner.sqlite3", rate=RATE, extra=learning
    )
    model = spot_checked_client(local_swarm, tiny_model_path, dev_chain.url, client_uri)
    core = model.core
    greedy = GenerationParams(max_new_tokens=4, ignore_eos=True)
    try:
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

        # A session on the live adapters: its receipt states the version and digest, it is paid, and it is
        # spot-checked like any other: the verifier fetches the adapters from the learner by digest and passes it.
        adapted = model.generate(FACTS[0][0], greedy)
        model._loop.run(core.billing.flush())
        session = adapted.billing
        assert session is not None
        (signed,) = session.receipts
        assert signed.receipt.adapter_version >= live["adapter_version"] >= 1
        assert signed.receipt.published_adapters and signed.receipt.adapter_digest != NO_ADAPTER_DIGEST
        assert core.billing.unverifiable_samples == []
        assert [v.verdict.passed for v in core.billing.verdicts] == [True, True], core.billing.sample_failures
        assert core.billing.verdicts[-1].verdict.receipt_id == signed.receipt.receipt_id_bytes

        # The honest adapted outputs would fail a base re-run: only the fetched adapters make the check fair.
        (meter,) = session.meters.values()
        sample = WorkSample(signed, tuple(meter.steps))
        inputs, positions, claimed = sample.forward_batch()
        base = SpanRunner(
            load_config(tiny_model_path), load_span_layers(tiny_model_path, load_config(tiny_model_path), 0, 8), 0, 8
        )
        with torch.no_grad():
            assert not compare_activations(
                claimed, base.forward(inputs, position_ids=positions), Tolerance.for_dtype(torch.float32)
            ).passed
        stats = peer_info(model, verifier.info["peer_id"])
        assert (stats["checked"], stats["failed"], stats["unverifiable"]) == (2, 0, 0), stats
        assert stats["rejected"] == {}, stats
        learner_info = peer_info(model, peer.info["peer_id"])
        assert learner_info["adapters_served"] >= 1, learner_info
        request = runtime_pb2.ExpertRequest(metadata=msgpack.packb({"sample": sample.encode()}, use_bin_type=True))
        response = model._loop.run(
            core.p2p.call_protobuf_handler(
                PeerID.from_base58(verifier.info["peer_id"]), HANDLER_VERIFY, request, runtime_pb2.ExpertResponse
            )
        )
        reply = msgpack.unpackb(response.metadata, raw=False)
        assert SignedVerdict.decode(reply["verdict"]).verdict.passed, reply
    finally:
        model.close()


def test_learning_cheater_with_live_adapters_is_caught(dev_chain, ledger, local_swarm, tiny_model_path, tmp_path):
    """A learning peer whose served steps are all corrupted gets version >= 1 live: its adapted session is still
    sent, re-run with the adapters fetched from it by digest, and fails."""
    peer_uri, _ = funded_key(ledger)
    client_uri, _ = funded_key(ledger, 1000 * UNIT)
    canary = tmp_path / "canary.txt"
    canary.write_text(FACTS_CANARY)
    verifier = start_verifier(local_swarm, "//Alice", dev_chain.url)
    cheater = start_cheater(
        local_swarm,
        "0:8",
        peer_uri,
        dev_chain.url,
        tmp_path / "cheater.sqlite3",
        rate=RATE,
        fraction=1.0,
        extra=learning_args(PERIOD, canary),
    )
    model = spot_checked_client(local_swarm, tiny_model_path, dev_chain.url, client_uri)
    core = model.core
    try:
        just_after_round(PERIOD)
        for _ in range(2):  # training passes run uncached: honest, so the update passes the canary
            for prompt, completion in FACTS:
                model.feedback(prompt, completion)
        ids = {"cheater": cheater.info["peer_id"]}
        wait_for_peers(model, ids, lambda i: i["adapter_version"] >= 1, 60, "a live adapter version")

        adapted = model.generate(FACTS[0][0], GenerationParams(max_new_tokens=4, ignore_eos=True))
        model._loop.run(core.billing.flush())
        assert adapted.billing is not None
        (signed,) = adapted.billing.receipts
        assert signed.receipt.adapter_version >= 1 and signed.receipt.published_adapters
        (verdict,) = [v.verdict for v in core.billing.verdicts]
        assert not verdict.passed and verdict.reason == "" and verdict.worst_error_ppm > 50_000, verdict
        assert verdict.receipt_id == signed.receipt.receipt_id_bytes
        assert peer_info(model, cheater.info["peer_id"])["adapters_served"] >= 1  # re-run with its own adapters
        stats = peer_info(model, verifier.info["peer_id"])
        assert (stats["checked"], stats["failed"], stats["unverifiable"]) == (1, 1, 0), stats
    finally:
        model.close()


def test_council_recheck_of_adapted_evidence_uses_the_adapters(tiny_model_path, keys, tmp_path) -> None:
    """What a council member (and `dllm verify --recheck`) re-runs: adapted evidence with its fetched adapters."""
    from dllm.recheck import fetch_evidence_adapters, recheck_with_span
    from economy.evidence_store import Evidence

    span, adapters, version = _learning_span(tiny_model_path, promote=True)
    provider = AdapterArchive()
    retain_version(adapters, provider, version)
    sources = _Sources(provider=provider)
    base = _span(tiny_model_path)
    verifier = _verifier(base, tmp_path, sources)
    try:
        honest = _serve(span, adapters, keys, version)
        corrupted = _serve(span, adapters, keys, version, corrupt_step=2)
        evidence = {
            name: Evidence.of([s.encode()], [asyncio.run(verifier.check(s))])
            for name, s in (("honest", honest), ("corrupted", corrupted))
        }
    finally:
        verifier.close()

    async def fetch(receipt: UsageReceipt) -> AdapterBundle | None:
        return provider.get(receipt.adapter_digest)

    async def refuse(receipt: UsageReceipt) -> AdapterBundle | None:
        return None

    fetched = asyncio.run(fetch_evidence_adapters(evidence["honest"], fetch))
    assert list(fetched) == [honest.receipt.receipt.adapter_digest]
    assert not recheck_with_span(evidence["honest"], base, fetched).provider_failed
    assert recheck_with_span(evidence["corrupted"], base, fetched).provider_failed
    # Adapters still unavailable to the re-checker: the sample fails, as it did for the verifier.
    assert asyncio.run(fetch_evidence_adapters(evidence["honest"], refuse)) == {}
    assert recheck_with_span(evidence["honest"], base, {}).provider_failed

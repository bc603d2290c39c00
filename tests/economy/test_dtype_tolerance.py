"""Spot checks judge a provider at the tolerance of the dtype it announced and its receipts state.

An honest bfloat16 provider (the dtype the README recommends on GPUs) passes a float32 re-run; a
provider that corrupts its outputs is still caught at that tolerance; a float32 provider that claims
bfloat16 gains no more than the bfloat16 noise bound; a receipt whose dtype differs from the
provider's DHT record is not countersigned. Real Llama blocks (dllm/default_model) served with a KV
cache in the provider's dtype, re-run by `economy.verification.recheck` and an in-process `Verifier`;
then one real bfloat16 peer process, a real `dllm verify` process and a paying client on the dev chain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest
import torch

from dllm.verifier import Verifier, VerifierConfig
from economy import canonical, receipts
from economy.evidence_store import EvidenceStore
from economy.metering import StepKind, UsageMeter
from economy.receipts import (
    COMPUTE_DTYPES,
    RECEIPT_TAG,
    DtypeMismatchError,
    MalformedReceiptError,
    UsageReceipt,
    check_claim,
)
from economy.verification import (
    DEFAULT_SAMPLE_RATE,
    DTYPE_NOISE,
    NOISE_MARGIN,
    SpotCheckPolicy,
    Tolerance,
    compare_activations,
    detection_probability,
    recheck,
)
from economy.work_sample import SampledStep, WorkSample
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from swarm.client import GenerationParams
from swarm.model_files import load_config, read_tensors
from swarm.records import RecordError, ServerRecord
from tests.economy.receipt_helpers import co_signed
from tests.economy.swarm_economy import UNIT, funded_key, spot_checked_client, start_billing_peer, start_verifier
from tests.peer.learning_swarm import peer_info

pytestmark = pytest.mark.timeout(600)

BLOCKS = 8  # the whole embedded model: the deepest span, so the most accumulated noise
PROMPT, GENERATED = 8, 4
RATE = 10**10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One compute thread: on a shared machine more threads contend and make these runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spans(tiny_model_path: Path) -> dict[str, SpanRunner]:
    config = load_config(tiny_model_path)
    return {
        name: SpanRunner(config, load_span_layers(tiny_model_path, config, 0, BLOCKS, dtype=getattr(torch, name)), 0, 8)
        for name in COMPUTE_DTYPES
    }


@pytest.fixture(scope="module")
def embeddings(tiny_model_path: Path) -> torch.Tensor:
    return read_tensors(tiny_model_path, ["model.embed_tokens."])["model.embed_tokens.weight"]


def session_inputs(seed: int, hidden: int, embeddings: torch.Tensor) -> list[torch.Tensor]:
    """A prompt and one token per generated step: real token embeddings (block 0's inputs) or N(0, 1) states."""
    g = torch.Generator().manual_seed(seed)
    if seed % 2:
        ids = torch.randint(embeddings.shape[0], (PROMPT + GENERATED,), generator=g)
        x = embeddings[ids].unsqueeze(0)
    else:
        x = torch.randn(1, PROMPT + GENERATED, hidden, generator=g)
    return [x[:, :PROMPT]] + [x[:, t : t + 1] for t in range(PROMPT, PROMPT + GENERATED)]


def serve(
    span: SpanRunner,
    keys,
    inputs: list[torch.Tensor],
    *,
    claimed_dtype: str,
    corrupt_step: int | None = None,
    corruption: str = "noise",
    session: bytes = b"dtype-session",
) -> WorkSample:
    """Serves a session as a peer does (float32 in, KV-cached steps in the span's dtype, float32 out), metered
    and co-signed with `claimed_dtype` in the receipt; one step corrupted if asked."""
    cache = span.new_cache(1, PROMPT + GENERATED, range(0, BLOCKS))
    meter = UsageMeter(session, "tiny", 0, BLOCKS, 1_600_000)
    steps, position = [], 0
    with torch.inference_mode():
        for i, x in enumerate(inputs):
            out = span.forward(x, cache=cache).float()
            if i == corrupt_step:
                if corruption == "noise":  # what tests/economy/cheating_peer.py returns
                    out = out + 0.5 * out.std() * torch.randn(out.shape, generator=torch.Generator().manual_seed(i))
                else:  # a 5 % scaled output: far below a skipped block, far above float noise
                    out = out * 1.05
            kind = StepKind.PROMPT if i == 0 else StepKind.GENERATED
            meter.record_step(kind, x.shape[1], x, out)
            steps.append(SampledStep(kind, position, x, out))
            position += x.shape[1]
    return WorkSample(co_signed(keys["bob"], keys["alice"], meter, dtype=claimed_dtype), tuple(steps))


def check(sample: WorkSample, verifier_span: SpanRunner):
    r = sample.receipt.receipt
    return recheck(sample, verifier_span.forward, Tolerance.for_dtype(r.dtype, r.end - r.start))


# ------------------------------------------------------------------------------------------ the tolerance


def test_tolerance_follows_the_stated_dtype_and_depth() -> None:
    assert Tolerance.for_dtype(torch.bfloat16, 4) == Tolerance.for_dtype("bfloat16", 4)
    assert Tolerance.for_dtype("float32", 1).rel_l2 < Tolerance.for_dtype("float16", 1).rel_l2
    assert Tolerance.for_dtype("float16", 1).rel_l2 < Tolerance.for_dtype("bfloat16", 1).rel_l2
    bound = DTYPE_NOISE["bfloat16"]
    assert Tolerance.for_dtype("bfloat16", 16).rel_l2 == pytest.approx(
        NOISE_MARGIN * (bound.first + 4 * bound.per_sqrt_block)
    )
    assert Tolerance.for_dtype("bfloat16", BLOCKS).rel_l2 < 0.05  # a 5 % deviation on the embedded model is caught
    assert set(DTYPE_NOISE) == set(COMPUTE_DTYPES)
    with pytest.raises(ValueError, match="no measured tolerance"):
        Tolerance.for_dtype("int8")
    with pytest.raises(ValueError, match="blocks"):
        Tolerance.for_dtype("float32", 0)


# ------------------------------------------------------------------------------------------ honest providers


def test_honest_bfloat16_provider_passes_1000_spot_checks(spans, keys, embeddings) -> None:
    verifier = spans["float32"]
    tolerance = Tolerance.for_dtype("bfloat16", BLOCKS).rel_l2
    worst = 0.0
    failed_at_float32_tolerance = 0
    for seed in range(1000):
        inputs = session_inputs(seed, verifier.hidden_size, embeddings)
        sample = serve(spans["bfloat16"], keys, inputs, claimed_dtype="bfloat16", session=seed.to_bytes(8, "big"))
        result = check(sample, verifier)
        assert result.passed, (seed, result, tolerance)
        worst = max(worst, result.worst_rel_error)
        failed_at_float32_tolerance += result.worst_rel_error > Tolerance.for_dtype("float32", BLOCKS).rel_l2
    assert worst < DTYPE_NOISE["bfloat16"].bound(BLOCKS) * 1.25, (worst, tolerance)  # near the measured envelope
    # Judged at the verifier's own dtype (float32) instead, these honest sessions fail: the slashing bug.
    assert failed_at_float32_tolerance > 900


def test_honest_float16_and_float32_providers_pass(spans, keys, embeddings) -> None:
    for dtype in ("float16", "float32"):
        for seed in range(20):
            inputs = session_inputs(seed, 128, embeddings)
            result = check(serve(spans[dtype], keys, inputs, claimed_dtype=dtype), spans["float32"])
            assert result.passed, (dtype, seed, result)


def test_verifier_judges_at_the_receipts_dtype(spans, keys, embeddings, tmp_path) -> None:
    """The verifier process's check, in-process: float32 re-run, tolerance from the receipt."""
    config = VerifierConfig(model="tiny", key="//Charlie", initial_peers=[])
    verifier = Verifier(config, spans["float32"], "tiny", None, EvidenceStore(tmp_path / "evidence.sqlite3"))
    try:
        inputs = session_inputs(1, 128, embeddings)
        honest = serve(spans["bfloat16"], keys, inputs, claimed_dtype="bfloat16")
        assert asyncio.run(verifier.check(honest)).verdict.passed
        # The same honest bfloat16 outputs under a receipt that says float32 fail: the dtype is what is judged.
        mislabelled = serve(spans["bfloat16"], keys, inputs, claimed_dtype="float32")
        assert not asyncio.run(verifier.check(mislabelled)).verdict.passed
        scaled = serve(spans["bfloat16"], keys, inputs, claimed_dtype="bfloat16", corrupt_step=2, corruption="scale")
        verdict = asyncio.run(verifier.check(scaled)).verdict
        assert not verdict.passed and verdict.worst_error_ppm > 40_000
        assert (verifier.stats.checked, verifier.stats.failed) == (3, 2)
    finally:
        verifier.close()
    with pytest.raises(ValueError, match="float32"):
        Verifier(config, spans["bfloat16"], "tiny", None, EvidenceStore(tmp_path / "other.sqlite3"))


def test_bfloat16_verifier_judges_at_the_coarser_of_the_two_dtypes(spans, keys, embeddings, tmp_path) -> None:
    """`dllm verify --dtype bfloat16`, in-process: bfloat16 work is judged as tightly as by a float32 re-run
    (a 5 % scaled step is caught); float32 work only at bfloat16's bound (its honest outputs pass)."""
    for dtype in COMPUTE_DTYPES:
        assert Tolerance.for_dtype(dtype, BLOCKS, rerun="float32") == Tolerance.for_dtype(dtype, BLOCKS)
    assert Tolerance.for_dtype("bfloat16", BLOCKS, rerun="bfloat16") == Tolerance.for_dtype("bfloat16", BLOCKS)
    assert Tolerance.for_dtype("float32", BLOCKS, rerun=torch.bfloat16) == Tolerance.for_dtype("bfloat16", BLOCKS)
    config = VerifierConfig(model="tiny", key="//Charlie", initial_peers=[], dtype="bfloat16")
    with pytest.raises(ValueError, match="bfloat16"):
        Verifier(config, spans["float32"], "tiny", None, EvidenceStore(tmp_path / "other.sqlite3"))
    with pytest.raises(ValueError, match="dtype"):
        VerifierConfig(model="tiny", key="//Charlie", initial_peers=[], dtype="int8")
    verifier = Verifier(config, spans["bfloat16"], "tiny", None, EvidenceStore(tmp_path / "evidence.sqlite3"))
    tolerance = Tolerance.for_dtype("bfloat16", BLOCKS).rel_l2
    try:
        worst = 0.0
        for seed in range(40):
            inputs = session_inputs(seed, 128, embeddings)
            for provider in ("bfloat16", "float32"):
                verdict = asyncio.run(verifier.check(serve(spans[provider], keys, inputs, claimed_dtype=provider)))
                assert verdict.verdict.passed, (seed, provider, verdict.verdict)
                worst = max(worst, verdict.verdict.worst_error_ppm / 1e6)
        assert worst < tolerance / 2  # measured 0.016 at most over 200 sessions each (tolerance 0.040)
        for provider in ("bfloat16", "float32"):
            scaled = serve(spans[provider], keys, inputs, claimed_dtype=provider, corrupt_step=2, corruption="scale")
            assert not asyncio.run(verifier.check(scaled)).verdict.passed, provider
        # The loss a bfloat16 verifier accepts: bfloat16 outputs under a float32 receipt pass here (a float32
        # verifier fails them, test above); a council member re-runs in float32 before anyone is slashed.
        mislabelled = serve(spans["bfloat16"], keys, inputs, claimed_dtype="float32")
        assert asyncio.run(verifier.check(mislabelled)).verdict.passed
    finally:
        verifier.close()


# ------------------------------------------------------------------------------------------ cheating providers


@pytest.mark.parametrize("corruption", ["noise", "scale"])
def test_bfloat16_provider_corrupting_5_percent_of_requests_is_caught(spans, keys, embeddings, corruption) -> None:
    """200 requests, 5 % of them with one corrupted step; the keyed lottery picks which are re-run."""
    requests, fraction = 200, 0.05
    assert detection_probability(DEFAULT_SAMPLE_RATE, fraction, requests) >= 0.99
    rng = random.Random(5)
    corrupted = set(rng.sample(range(requests), int(fraction * requests)))
    policy = SpotCheckPolicy(DEFAULT_SAMPLE_RATE, secret=b"client-secret")
    failed_checks, corrupted_checked = [], 0
    for i in range(requests):
        inputs = session_inputs(i, 128, embeddings)
        sample = serve(
            spans["bfloat16"],
            keys,
            inputs,
            claimed_dtype="bfloat16",
            corrupt_step=rng.randrange(len(inputs)) if i in corrupted else None,
            corruption=corruption,
            session=i.to_bytes(8, "big"),
        )
        # Every corrupted request is re-run here (the check must catch each one it draws); honest ones when drawn.
        if i not in corrupted and not policy.selects(sample.receipt.receipt.receipt_id_bytes):
            continue
        result = check(sample, spans["float32"])
        assert result.passed == (i not in corrupted), (i, corruption, result)
        if policy.selects(sample.receipt.receipt.receipt_id_bytes):
            corrupted_checked += i in corrupted
            if not result.passed:
                failed_checks.append(i)
    assert corrupted_checked >= 1 and len(failed_checks) == corrupted_checked  # caught within the 200 requests


def test_float32_provider_claiming_bfloat16_gains_only_the_bfloat16_noise_bound(spans, keys, embeddings) -> None:
    """Lying about the dtype widens the tolerance to bfloat16's: a 5 % scaled output is still caught;
    what slips through is a deviation below that bound (the loss the threat table states)."""
    tolerance = Tolerance.for_dtype("bfloat16", BLOCKS).rel_l2
    assert tolerance < 0.05
    for seed in range(10):
        inputs = session_inputs(seed, 128, embeddings)
        assert check(serve(spans["float32"], keys, inputs, claimed_dtype="bfloat16"), spans["float32"]).passed
        for corruption in ("scale", "noise"):
            liar = serve(
                spans["float32"], keys, inputs, claimed_dtype="bfloat16", corrupt_step=1, corruption=corruption
            )
            result = check(liar, spans["float32"])
            assert not result.passed and result.worst_rel_error > tolerance, (seed, corruption, result)
    # The bound itself: an output off by half the tolerance passes, as an honest bfloat16 one would.
    inputs = session_inputs(0, 128, embeddings)
    sample = serve(spans["float32"], keys, inputs, claimed_dtype="bfloat16")
    steps = list(sample.steps)
    steps[1] = dataclasses.replace(steps[1], outputs=steps[1].outputs * (1 + tolerance / 2))
    inputs_, positions, claimed = WorkSample(sample.receipt, tuple(steps)).forward_batch()
    with torch.inference_mode():
        rerun = spans["float32"].forward(inputs_, position_ids=positions)
    assert compare_activations(claimed, rerun, Tolerance.for_dtype("bfloat16", BLOCKS)).passed


# ------------------------------------------------------------------------------------------ receipts and records


def test_receipt_signs_the_dtype(make_receipt) -> None:
    signed = make_receipt()
    assert signed.receipt.dtype == "float32"
    bf16 = dataclasses.replace(signed.receipt, dtype="bfloat16")
    assert UsageReceipt.decode(bf16.encode()) == bf16
    assert bf16.receipt_id != signed.receipt_id  # the dtype is part of what both parties sign
    with pytest.raises(MalformedReceiptError, match="dtype"):
        dataclasses.replace(signed.receipt, dtype="int8").check_consistent()
    names = [f.name for f in receipts._RECEIPT_SCHEMA]
    values = [getattr(bf16, name) for name in names]
    values[names.index("dtype")] = "float8"
    with pytest.raises(MalformedReceiptError, match="dtype"):
        UsageReceipt.decode(canonical.encode(RECEIPT_TAG, receipts._RECEIPT_SCHEMA, tuple(values)))
    # The format before the dtype (tag .2) is malformed now: never judged as float32 by default.
    old_schema = receipts._RECEIPT_SCHEMA[: names.index("dtype")]
    old_values = tuple(getattr(bf16, f.name) for f in old_schema)
    with pytest.raises(MalformedReceiptError):
        UsageReceipt.decode(canonical.encode("dllm.receipt.2", old_schema, old_values))


def test_client_refuses_a_receipt_whose_dtype_differs_from_the_record(make_receipt) -> None:
    r = make_receipt().receipt
    observed = r.usage
    check_claim(r, observed, r.commitment, r.rate, r.params_served, announced_dtype="float32")
    widened = dataclasses.replace(r, dtype="bfloat16")
    with pytest.raises(DtypeMismatchError, match="announced float32"):
        check_claim(widened, observed, r.commitment, r.rate, r.params_served, announced_dtype="float32")


def test_server_record_carries_a_known_dtype() -> None:
    wire = ServerRecord("peer", "tiny", 0, 4, 10.0, 100, 1, dtype="bfloat16").to_wire()
    assert ServerRecord.from_wire(wire).dtype == "bfloat16"
    assert ServerRecord.from_wire({k: v for k, v in wire.items() if k != "dtype"}).dtype == "float32"
    for bad in ("int8", 16, None):
        with pytest.raises(RecordError, match="dtype"):
            ServerRecord.from_wire({**wire, "dtype": bad})


# ------------------------------------------------------------------------------------------ end to end


def test_real_bfloat16_peer_passes_a_real_verifier(dev_chain, ledger, local_swarm, tiny_model_path, tmp_path) -> None:
    """A `dllm peer join --dtype bfloat16` billing peer, a `dllm verify` process, a client checking every receipt."""
    peer_uri, _ = funded_key(ledger)
    client_uri, _ = funded_key(ledger, 1000 * UNIT)
    verifier = start_verifier(local_swarm, "//Alice", dev_chain.url)
    bf16 = ("--dtype", "bfloat16")
    peer = start_billing_peer(
        local_swarm, "0:8", peer_uri, dev_chain.url, tmp_path / "bf16.sqlite3", rate=RATE, extra=bf16
    )
    model = spot_checked_client(local_swarm, tiny_model_path, dev_chain.url, client_uri)
    core = model.core
    try:
        for prompt in ("The swarm", "Receipts are", "A verifier"):
            result = model.generate(prompt, GenerationParams(max_new_tokens=6, ignore_eos=True))
            assert result.billing is not None
            for signed in result.billing.receipts:
                assert signed.receipt.dtype == "bfloat16"
        model._loop.run(core.billing.flush())
        verdicts = [v.verdict for v in core.billing.verdicts]
        assert len(verdicts) == 3 and all(v.passed for v in verdicts), (verdicts, core.billing.sample_failures)
        assert max(v.worst_error_ppm for v in verdicts) > Tolerance.for_dtype("float32", BLOCKS).rel_l2 * 1e6
        (record,) = [r for r in model._loop.run(core.records(refresh=True)) if r.peer_id == peer.info["peer_id"]]
        assert record.dtype == "bfloat16"
        stats = peer_info(model, verifier.info["peer_id"])
        assert (stats["checked"], stats["failed"]) == (3, 0), stats
    finally:
        model.close()

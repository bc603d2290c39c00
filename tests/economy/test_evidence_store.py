"""Evidence is content-addressed and canonical, and a verifier's store keeps the tally until the slash is on chain."""

from __future__ import annotations

import hashlib

import pytest
import torch

from economy.evidence_store import Evidence, EvidenceStore, MalformedEvidenceError
from economy.metering import StepKind, UsageMeter
from economy.verification import Comparison, SignedVerdict, make_verdict
from economy.work_sample import SampledStep, WorkSample
from tests.economy.receipt_helpers import co_signed


def _sample(keys, seed: int) -> WorkSample:
    torch.manual_seed(seed)
    inputs, outputs = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    meter = UsageMeter(f"session-{seed}".encode(), "tiny", 0, 4, 800_000)
    meter.record_step(StepKind.PROMPT, 3, inputs, outputs)
    signed = co_signed(keys["bob"], keys["alice"], meter, issued_at=1_800_000_000)
    return WorkSample(signed, (SampledStep(StepKind.PROMPT, 0, inputs, outputs),))


def _verdict(keys, name: str, sample: WorkSample, passed: bool = False) -> SignedVerdict:
    comparison = Comparison(passed=passed, worst_rel_error=0.0 if passed else 0.5, worst_position=0, positions=3)
    return make_verdict(keys[name], sample, comparison, issued_at=1_800_000_000)


def test_evidence_hash_names_the_content_whoever_builds_it(keys) -> None:
    a, b = _sample(keys, 1), _sample(keys, 2)
    verdicts = [_verdict(keys, "charlie", a), _verdict(keys, "dave", b), _verdict(keys, "eve", a)]
    one = Evidence.of([a.encode(), b.encode()], verdicts)
    other = Evidence.of([b.encode(), a.encode(), a.encode()], list(reversed(verdicts)))
    assert one.encode() == other.encode() and one.evidence_hash == hashlib.sha256(one.encode()).digest()
    assert Evidence.decode(one.encode()) == one
    assert Evidence.decode_checked(one.encode(), one.evidence_hash).provider == keys["bob"].ss58_address
    # A server answering other evidence, or the same evidence re-ordered, is caught by the fetcher.
    alone = Evidence.of([a.encode()], [verdicts[0]])
    with pytest.raises(MalformedEvidenceError):
        Evidence.decode_checked(alone.encode(), one.evidence_hash)
    import msgpack

    reordered = msgpack.packb(["dllm.evidence.1", [b.encode(), a.encode()], [v.encode() for v in verdicts]])
    with pytest.raises(MalformedEvidenceError):
        Evidence.decode(reordered)
    # Every verdict must judge a sample in the evidence, and every sample be judged.
    with pytest.raises(MalformedEvidenceError):
        Evidence.of([a.encode()], [verdicts[1]])
    with pytest.raises(MalformedEvidenceError):
        Evidence.of([a.encode(), b.encode()], [verdicts[0]])
    for garbage in (b"", b"\x90", msgpack.packb(["dllm.evidence.1", [], []]), b"x" * 100):
        with pytest.raises(MalformedEvidenceError):
            Evidence.decode(garbage)


def test_store_persists_evidence_and_keeps_the_tally_until_the_slash_is_on_chain(keys, tmp_path) -> None:
    path = tmp_path / "evidence.sqlite3"
    sample = _sample(keys, 3)
    failing = [_verdict(keys, "charlie", sample), _verdict(keys, "dave", sample)]
    with EvidenceStore(path) as store:
        digest = store.put_sample(sample)
        assert digest == sample.evidence_hash and store.sample(digest) == sample.encode()
        for verdict in failing:
            store.tally_add(verdict)
        store.tally_add(_verdict(keys, "charlie", sample, passed=False))  # one verifier counts once
        evidence = store.evidence_of(failing)
        assert evidence is not None
        evidence_hash = store.put_evidence(evidence)
        store.want_slash(keys["bob"].ss58_address, evidence_hash)
        store.slash_failed(keys["bob"].ss58_address, "DispatchError: the chain refused")
    # A restart (or a failed slash) loses nothing: the tally, the evidence and the wanted slash are all there.
    with EvidenceStore(path) as store:
        assert sorted(v.verdict.verifier for v in store.tally()) == sorted(v.verdict.verifier for v in failing)
        assert store.evidence(evidence_hash) == evidence.encode()
        (pending,) = store.pending_slashes()
        assert (pending.provider, pending.evidence_hash, pending.attempts) == (
            keys["bob"].ss58_address,
            evidence_hash,
            1,
        )
        assert store.evidence_of([_verdict(keys, "eve", _sample(keys, 4))]) is None  # that sample is not held
        store.slash_done(keys["bob"].ss58_address, 42)
        assert store.tally() == [] and store.pending_slashes() == [] and store.slashed() == [keys["bob"].ss58_address]
        assert store.evidence(evidence_hash) == evidence.encode()  # still served after the slash

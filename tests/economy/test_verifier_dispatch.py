"""Which verifiers judge a client's spot-check sample, and whose verdicts count.

Attacks: a provider announces its own verifier in the DHT and has it report passes, to lower its check rate
(only verifiers the council authorized count); an authorized verifier that passes everything hides a
cheater (one verifier is drawn first by the client's key, a keyed audit sends passes to a second one,
disagreement sends the sample to all: the detection bound with a liar is simulated here). The verifiers
below are real DHT nodes serving `dllm.v1.verify` over real sockets; they sign verdicts without re-running
(what a verdict says is the point here, not how it was reached). Simulations use fixed seeds, no timing.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from substrateinterface import Keypair

from dllm.verifier import _announce
from economy.metering import StepKind
from economy.receipts import SignedReceipt
from economy.verification import (
    DEFAULT_AUDIT_RATE,
    DEFAULT_MIN_SAMPLE_RATE,
    DEFAULT_PROBATION_RATE,
    DEFAULT_PROBATION_REQUESTS,
    AdaptiveSpotCheck,
    CheckHistory,
    Comparison,
    VerifierDispatch,
    detection_probability,
    dispatch_detection_bound,
    make_verdict,
)
from economy.work_sample import SampledStep, WorkSample
from swarm import protocol
from swarm.billing import BillingConfig, ClientBilling
from swarm.dht import start_dht

pytestmark = pytest.mark.timeout(180)


@dataclass
class StubVerifier:
    """A verifier node: announces `keypair`'s account for model "tiny" and signs `passes` on every sample."""

    keypair: Keypair
    passes: bool
    asked: list[bytes] = field(default_factory=list)  # receipt ids of the samples it was sent
    announce_as: str | None = None
    """Account written in its DHT record when it is not its own (a peer posing as another verifier)."""

    async def rpc_verify(self, request: runtime_pb2.ExpertRequest, context: Any) -> runtime_pb2.ExpertResponse:
        sample = WorkSample.decode(msgpack.unpackb(request.metadata, raw=False)["sample"])
        self.asked.append(sample.receipt.receipt.receipt_id_bytes)
        comparison = Comparison(self.passes, 1e-7 if self.passes else 0.4, 0, 5)
        verdict = make_verdict(self.keypair, sample, comparison)
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"verdict": verdict.encode()}, use_bin_type=True))


@asynccontextmanager
async def _swarm(verifiers: list[StubVerifier], **config: Any) -> AsyncIterator[ClientBilling]:
    """The stub verifiers, each its own DHT node, announced; and a client's billing on a DHT joined to them."""
    nodes = []
    try:
        first, _ = start_dht()
        nodes.append(first)
        peers = [str(a) for a in first.get_visible_maddrs()]
        for stub in verifiers:
            dht, validator = start_dht(peers)
            nodes.append(dht)
            p2p = await dht.replicate_p2p()
            await p2p.add_protobuf_handler(protocol.HANDLER_VERIFY, stub.rpc_verify, runtime_pb2.ExpertRequest)
            account = stub.announce_as or stub.keypair.ss58_address
            record = {"peer_id": str(p2p.peer_id), "account": account, "model": "tiny"}
            await _announce(dht, validator, record, 300.0)
        client_dht, _ = start_dht(peers)
        nodes.append(client_dht)
        billing = ClientBilling(
            BillingConfig("ws://127.0.0.1:1", "//Alice", **config), await client_dht.replicate_p2p(), client_dht, "tiny"
        )
        for _ in range(50):
            if len(await billing.verifier_peers()) == len(verifiers):
                break
        assert len(await billing.verifier_peers()) == len(verifiers)
        yield billing
    finally:
        for node in nodes:
            node.shutdown()


def _sample(
    make_receipt: Callable[..., SignedReceipt], session: bytes = b"session-1", provider: str = "dave"
) -> WorkSample:
    """A sample of the steps `make_receipt` meters (4 prompt tokens, 1 generated), as a client sends it."""
    steps = (
        SampledStep(StepKind.PROMPT, 0, torch.ones(1, 4, 8), torch.full((1, 4, 8), 2.0)),
        SampledStep(StepKind.GENERATED, 4, torch.ones(1, 1, 8), torch.full((1, 1, 8), 3.0)),
    )
    client = "bob" if provider == "alice" else "alice"
    return WorkSample(make_receipt(provider=provider, client=client, session=session), steps)


async def test_rogue_verifier_announced_in_the_dht_cannot_lower_the_rate(keys, make_receipt) -> None:
    """A provider (Dave) announces its own verifier (Eve, not authorized by the council) that passes everything."""
    rogue = StubVerifier(keys["eve"], passes=True)
    async with _swarm([rogue]) as billing:
        sample = _sample(make_receipt)
        verdicts = await billing.send_sample(sample)
        assert verdicts == [] and rogue.asked == []
        assert sample.receipt.receipt.provider not in billing.check_history  # still at the maximum rate
        assert billing.sample_failures == ["no verifier the council authorized is announced in the DHT"]
        # its passing verdict, handed in directly, does not count either
        passing = make_verdict(keys["eve"], sample, Comparison(True, 1e-7, 0, 5))
        billing._record_check(sample, [(keys["eve"].ss58_address, passing)])
        assert sample.receipt.receipt.provider not in billing.check_history


async def test_rogue_verifier_next_to_an_authorized_one_gets_nothing(keys, make_receipt) -> None:
    rogue, charlie = StubVerifier(keys["eve"], passes=True), StubVerifier(keys["charlie"], passes=False)
    async with _swarm([rogue, charlie], audit_rate=0.0) as billing:
        for i in range(6):
            await billing.send_sample(_sample(make_receipt, session=f"s-{i}".encode()))
        assert rogue.asked == [] and len(charlie.asked) == 6, billing.sample_failures
        assert billing.check_history[keys["dave"].ss58_address] == CheckHistory(passed=0, failed=6)


async def test_a_peer_posing_as_an_authorized_verifier_does_not_block_the_real_one(keys, make_receipt) -> None:
    """Eve announces Charlie's account (in another SS58 format, so the strings differ) from its own peer."""
    from scalecodec.utils.ss58 import ss58_decode, ss58_encode

    posing_as = ss58_encode(ss58_decode(keys["charlie"].ss58_address), 0)
    poser = StubVerifier(keys["eve"], passes=True, announce_as=posing_as)
    charlie = StubVerifier(keys["charlie"], passes=False)
    async with _swarm([poser, charlie], audit_rate=0.0) as billing:
        for i in range(4):
            verdicts = await billing.send_sample(_sample(make_receipt, session=f"s-{i}".encode()))
            assert [v.verdict.verifier for v in verdicts] == [keys["charlie"].ss58_address]
        assert len(charlie.asked) == 4
        assert billing.check_history[keys["dave"].ss58_address] == CheckHistory(passed=0, failed=4)


async def test_a_passed_sample_goes_to_one_verifier_a_failed_one_to_a_second(keys, make_receipt) -> None:
    alice, bob = StubVerifier(keys["alice"], passes=True), StubVerifier(keys["bob"], passes=True)
    async with _swarm([alice, bob], audit_rate=0.0) as billing:
        for i in range(8):
            await billing.send_sample(_sample(make_receipt, session=f"s-{i}".encode()))
        assert len(alice.asked) + len(bob.asked) == 8  # one verifier per passed sample
        assert alice.asked and bob.asked  # the first verifier is drawn, not always the same one
        assert billing.check_history[keys["dave"].ss58_address] == CheckHistory(passed=8)
        alice.passes = bob.passes = False
        verdicts = await billing.send_sample(_sample(make_receipt, session=b"corrupt"))
        assert {v.verdict.verifier for v in verdicts} == {keys["alice"].ss58_address, keys["bob"].ss58_address}
        assert not any(v.verdict.passed for v in verdicts)  # two failing verdicts: the council's threshold
        assert billing.check_history[keys["dave"].ss58_address] == CheckHistory(passed=0, failed=1)
        assert billing.sample_failures == []


async def test_a_lying_authorized_verifier_is_contradicted_by_the_audit(keys, make_receipt) -> None:
    """Bob is authorized but passes everything; Charlie fails the corrupted work. With every pass audited the
    sample reaches both whoever is drawn first; the failing verdict wins and the disagreement is recorded."""
    liar, honest = StubVerifier(keys["bob"], passes=True), StubVerifier(keys["charlie"], passes=False)
    async with _swarm([liar, honest], audit_rate=1.0) as billing:
        for i in range(4):
            verdicts = await billing.send_sample(_sample(make_receipt, session=f"s-{i}".encode()))
            assert sorted(v.verdict.passed for v in verdicts) == [False, True]
        assert billing.check_history[keys["dave"].ss58_address] == CheckHistory(passed=0, failed=4)
        assert len(billing.contradictions) == 4


async def test_a_provider_that_is_an_authorized_verifier_never_judges_its_own_work(keys, make_receipt) -> None:
    own, other = StubVerifier(keys["alice"], passes=True), StubVerifier(keys["charlie"], passes=False)
    async with _swarm([own, other], audit_rate=0.0) as billing:
        sample = _sample(make_receipt, provider="alice")
        await billing.send_sample(sample)
        assert own.asked == [] and len(other.asked) == 1
        passing = make_verdict(keys["alice"], sample, Comparison(True, 1e-7, 0, 5))
        billing._record_check(sample, [(keys["alice"].ss58_address, passing)])
        assert billing.check_history[keys["alice"].ss58_address] == CheckHistory(passed=0, failed=1)


def test_billing_authorizes_the_dev_council_unless_told_otherwise(keys) -> None:
    from chain.account_derivation import account_id

    default = BillingConfig("ws://127.0.0.1:1", "//Alice").authorized_verifier_ids()
    assert default == {account_id(keys[n].ss58_address) for n in ("alice", "bob", "charlie")}
    chosen = BillingConfig("ws://127.0.0.1:1", "//Alice", verifiers=(keys["eve"].ss58_address,))
    assert chosen.authorized_verifier_ids() == {account_id(keys["eve"].ss58_address)}
    with pytest.raises(ValueError):
        BillingConfig("ws://127.0.0.1:1", "//Alice", verifiers=("not an address",))
    with pytest.raises(ValueError):
        BillingConfig("ws://127.0.0.1:1", "//Alice", audit_rate=1.5)


# ------------------------------------------------------------------------------------- the dispatch rule


def test_first_verifier_is_uniform_and_keyed_by_the_client() -> None:
    verifiers = [bytes([i]) * 32 for i in range(3)]
    ids = [i.to_bytes(4, "big") for i in range(6000)]
    dispatch = VerifierDispatch(b"client key")
    firsts = [dispatch.order(w, verifiers)[0] for w in ids]
    assert all(abs(firsts.count(v) / len(ids) - 1 / 3) < 0.03 for v in verifiers)
    other = VerifierDispatch(b"another key")
    same = sum(a == other.order(w, verifiers)[0] for a, w in zip(firsts, ids, strict=True))
    assert abs(same / len(ids) - 1 / 3) < 0.03  # without the key, the first verifier is a guess
    assert sorted(dispatch.order(ids[0], verifiers + verifiers)) == sorted(verifiers)  # duplicates count once


def test_audit_lottery_is_independent_of_the_spot_check_lottery() -> None:
    secret = b"client key"
    ids = [i.to_bytes(4, "big") for i in range(8000)]
    dispatch, rule = VerifierDispatch(secret, audit_rate=0.3), AdaptiveSpotCheck(secret)
    audited = {w for w in ids if dispatch.audits(w)}
    selected = {w for w in ids if rule.selects(CheckHistory(passed=100, requests=10**4), w)}
    assert abs(len(audited) / len(ids) - 0.3) < 0.02
    assert abs(len(audited & selected) / len(ids) - 0.3 * rule.min_rate) < 0.02


def test_wanted_verdicts_grow_only_with_failures_disagreement_or_audit() -> None:
    d = VerifierDispatch(b"k", confirmations=2)
    assert d.wanted([], audited=False, available=3) == 1
    assert d.wanted([True], audited=False, available=3) == 1
    assert d.wanted([True], audited=True, available=3) == 2
    assert d.wanted([False], audited=False, available=3) == 2
    assert d.wanted([True, False], audited=True, available=3) == 3
    assert d.wanted([False], audited=False, available=1) == 1


IN_PROBATION = CheckHistory(passed=1000)
"""A provider decayed to the probation floor (0.47) with all of its probation ahead: the 200-request target."""
AFTER_PROBATION = CheckHistory(passed=1000, requests=DEFAULT_PROBATION_REQUESTS)
"""A provider at the floor after probation (0.25): the steady state."""


def _simulate(
    rng: random.Random,
    verifiers: int,
    liars: int,
    audit_rate: float,
    f: float,
    n: int,
    history: CheckHistory = IN_PROBATION,
) -> tuple[bool, int]:
    """A provider from `history` corrupting each of `n` requests w.p. f, `liars` of the verifiers passing
    everything: (caught, verifier checks run), through the real lotteries, draw and dispatch rule."""
    secret = rng.randbytes(16)
    rule, dispatch = AdaptiveSpotCheck(secret), VerifierDispatch(secret, audit_rate)
    accounts = [bytes([i]) * 32 for i in range(verifiers)]
    lying = set(accounts[:liars])
    runs = 0
    for i in range(n):
        work = i.to_bytes(4, "big")
        selected, history = rule.draw(history, work)
        if not selected:
            continue
        bad = rng.random() < f
        order, audited, outcomes = dispatch.order(work, accounts), dispatch.audits(work), []
        for account in order:
            if len(outcomes) >= dispatch.wanted(outcomes, audited, len(order)):
                break
            outcomes.append(account in lying or not bad)
        runs += len(outcomes)
        if not all(outcomes):
            return True, runs
    return False, runs


def test_detection_with_and_without_a_lying_verifier_meets_its_bound() -> None:
    rng = random.Random(20261130)
    trials = 4000
    for verifiers, liars in ((3, 0), (3, 1), (2, 1)):
        caught = sum(_simulate(rng, verifiers, liars, DEFAULT_AUDIT_RATE, 0.05, 200)[0] for _ in range(trials))
        bound = dispatch_detection_bound(DEFAULT_PROBATION_RATE, 0.05, 200, verifiers, liars, DEFAULT_AUDIT_RATE)
        sigma = (bound * (1 - bound) / trials) ** 0.5
        assert caught / trials >= bound - 4 * sigma, (verifiers, liars)
    # after probation the same liar faces the lower floor: the bound is the dispatch bound at min_rate
    caught = sum(_simulate(rng, 3, 1, DEFAULT_AUDIT_RATE, 0.05, 200, AFTER_PROBATION)[0] for _ in range(trials))
    bound = dispatch_detection_bound(DEFAULT_MIN_SAMPLE_RATE, 0.05, 200, 3, 1, DEFAULT_AUDIT_RATE)
    assert caught / trials >= bound - 4 * (bound * (1 - bound) / trials) ** 0.5
    assert dispatch_detection_bound(DEFAULT_PROBATION_RATE, 0.05, 200, 3, 0, DEFAULT_AUDIT_RATE) >= 0.99
    assert dispatch_detection_bound(DEFAULT_PROBATION_RATE, 0.05, 200, 3, 0, 0.0) == pytest.approx(
        detection_probability(DEFAULT_PROBATION_RATE, 0.05, 200)
    )
    # an audit rate of 1 sends every sample to two verifiers: one liar among them hides nothing
    assert dispatch_detection_bound(0.47, 0.05, 200, 3, 1, 1.0) == pytest.approx(detection_probability(0.47, 0.05, 200))


def test_an_honest_provider_costs_one_verifier_per_check_plus_the_audits() -> None:
    rng = random.Random(5)
    for history, rate in ((IN_PROBATION, DEFAULT_PROBATION_RATE), (AFTER_PROBATION, DEFAULT_MIN_SAMPLE_RATE)):
        runs = sum(_simulate(rng, 3, 0, DEFAULT_AUDIT_RATE, 0.0, 200, history)[1] for _ in range(300))
        per_request = runs / (300 * 200)
        expected = rate * (1 + DEFAULT_AUDIT_RATE)
        assert abs(per_request - expected) < 0.02
        assert per_request < 2 * rate * 0.6  # two verifiers per sample cost ~1.8x as much

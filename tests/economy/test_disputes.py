"""Provider disputes and one proposal per slash, on the real dev chain with real evidence re-run by council members.

- A provider's signed `dispute` record holds ITS OWN unbond until the council's decision window closes (or a slash
  citing the evidence is on chain); a dispute sent by another account, by an unregistered account, or malformed
  attaches to nobody else (attacks: disputing on another provider's behalf, blocking another's unbond).
- Two council members whose verdicts arrived in different orders build different evidence (different hashes), yet
  converge on one slash: the second joins the proposal the first opened after re-running ITS evidence; when both
  opened at once, the newer proposal's opener joins the oldest and withdraws its own.
- A member that meets a dispute re-runs the evidence once more before signing (the decision log shows it) and still
  slashes a cheater; a member that cannot load disputed evidence holds its signature only until the window closes.
- `dllm peer dispute HASH` fetches the evidence from a verifier, re-runs it, and files the provider's dispute; run
  with another provider's key it refuses (the evidence accuses someone else).
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time

import pytest
import torch

from chain.account_derivation import account_id
from chain.errors import DisputePendingError, NotRegisteredError
from chain.ledger import ComputeLedger
from dllm.council import CouncilConfig, CouncilMember
from economy.evidence_store import Evidence, EvidenceStore
from economy.verification import Comparison, make_verdict
from economy.work_sample import WorkSample
from peer.blocks import load_span_layers
from peer.span import SpanRunner
from swarm.model_files import load_config
from tests.chain.ledger_helpers import council_keys
from tests.economy.swarm_economy import REPO, UNIT, funded_key, wait_until
from tests.economy.test_dtype_tolerance import BLOCKS, serve

pytestmark = pytest.mark.timeout(600)

STAKE_UNITS = 5
VERIFIERS = ("charlie", "dave", "eve")


@pytest.fixture(scope="module")
def ledger(dev_chain):
    client = ComputeLedger(dev_chain.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def span(tiny_model_path) -> SpanRunner:
    """Every block of the embedded model in float32: what a council member re-runs evidence with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: one thread is faster than contending ones
    config = load_config(tiny_model_path)
    yield SpanRunner(config, load_span_layers(tiny_model_path, config, 0, BLOCKS), 0, BLOCKS)
    torch.set_num_threads(threads)


def _registered(ledger) -> tuple[str, object]:
    uri, kp = funded_key(ledger)
    ledger.register_provider(kp, STAKE_UNITS * UNIT)
    return uri, kp


def _work(span, provider, client, label: str, *, corrupt: bool) -> WorkSample:
    """A metered, co-signed session of `provider` over every block; one output corrupted if asked."""
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(label.encode()).digest()[:4], "little"))
    hidden = span.config.hidden_size
    x = torch.randn(1, 4, hidden, generator=g)
    inputs = [x[:, :3], x[:, 3:4]]
    keys = {"bob": provider, "alice": client}
    return serve(
        span, keys, inputs, claimed_dtype="float32", corrupt_step=0 if corrupt else None, session=label.encode()
    )


def _failing(keys, name: str, sample: WorkSample):
    return make_verdict(keys[name], sample, Comparison(False, 0.5, 0, 4), issued_at=int(time.time()))


def _member(uri: str, url: str, span, tmp_path, keys, samples: list[WorkSample]) -> CouncilMember:
    config = CouncilConfig(
        model="unused",
        key=uri,
        initial_peers=[],
        chain_url=url,
        verifiers=[keys[n].ss58_address for n in VERIFIERS],
        threshold=2,
    )
    store = EvidenceStore(tmp_path / f"council-{uri[2:]}.sqlite3")
    for sample in samples:  # what the member fetched from the verifiers by hash
        store.put_sample(sample)
    return CouncilMember(config, span, None, store, ComputeLedger(url))


def _serves_evidence_of(*members: CouncilMember):
    """dllm.v1.evidence as the other members serve it: canonical bytes by hash, checked by the fetcher."""

    async def fetch(digest: bytes) -> Evidence:
        for member in members:
            data = member.store.evidence(digest)
            if data is not None:
                return Evidence.decode_checked(data, digest)
        raise LookupError(digest.hex())

    return fetch


def _raw_dispute(ledger, signer, evidence: bytes, reason: str = "", passed: bool = True) -> None:
    """A dispute record submitted directly, bypassing file_dispute's client-side checks (as an attacker can)."""
    body = {"evidence": evidence.hex(), "passed": passed, "worst_error_ppm": 0, "reason": reason}
    ledger.submitter.submit(signer, ledger._remark("dispute", body))


# ------------------------------------------------------------------------------------------- disputes on chain


def test_a_dispute_holds_only_its_senders_unbond_and_only_until_the_window_closes(ledger, dev_chain) -> None:
    _, provider = _registered(ledger)
    _, other = _registered(ledger)
    _, stranger = funded_key(ledger)  # never registered
    alice, bob, _ = council_keys(ledger)
    evidence = hashlib.sha256(b"evidence against the provider").digest()
    ledger.request_unbond(provider)
    filed = ledger.file_dispute(provider, evidence, True, 12, "my outputs match the model")

    # Attacks: another provider and a stranger "dispute" the same evidence; a malformed record; none reaches the
    # provider's status (a dispute binds its sender only), and the stranger's is ignored entirely.
    ledger.file_dispute(other, evidence, True, 0, "on behalf of the provider")
    _raw_dispute(ledger, stranger, evidence)
    _raw_dispute(ledger, provider, hashlib.sha256(b"other evidence").digest(), reason="x" * 281)
    with pytest.raises(NotRegisteredError):
        ledger.file_dispute(stranger, evidence, True, 0)
    (dispute,) = ledger.provider_status(provider.ss58_address).open_disputes
    assert (dispute.evidence_hash, dispute.provider_passed, dispute.worst_error_ppm) == (evidence, True, 12)
    assert dispute.reason == "my outputs match the model" and dispute.block_number == filed.block_number
    assert dispute.open_until == filed.block_number + ledger.config.dispute_window_blocks
    assert [d.evidence_hash for d in ledger.provider_status(other.ss58_address).open_disputes] == [evidence]
    assert ledger.provider_status(stranger.ss58_address).open_disputes == ()

    dev_chain.new_blocks(ledger.config.unbond_delay_blocks)  # the unbond delay has passed; the dispute still holds it
    with pytest.raises(DisputePendingError, match="decision window"):
        ledger.unbond([alice, bob], provider.ss58_address)
    head = ledger.substrate.get_block_number(None)
    dev_chain.new_blocks(max(0, dispute.open_until - head))
    assert ledger.provider_status(provider.ss58_address).open_disputes == ()
    ledger.unbond([alice, bob], provider.ss58_address)
    assert ledger.provider_status(provider.ss58_address).stake == 0


def test_a_slash_citing_the_disputed_evidence_closes_the_dispute(ledger) -> None:
    _, provider = _registered(ledger)
    evidence = hashlib.sha256(b"evidence the council upheld").digest()
    ledger.file_dispute(provider, evidence, True, 0, "wrong")
    assert len(ledger.provider_status(provider.ss58_address).open_disputes) == 1
    ledger.slash(list(council_keys(ledger)[:2]), provider.ss58_address, None, evidence)
    status = ledger.provider_status(provider.ss58_address)
    assert status.open_disputes == () and [s.evidence_hash for s in status.slashes] == [evidence]


# ------------------------------------------------------------------------------------------ one proposal per slash


def test_members_whose_verdicts_came_in_different_orders_converge_on_one_slash(
    ledger, dev_chain, span, keys, tmp_path
) -> None:
    _, cheater = _registered(ledger)
    samples = [_work(span, cheater, keys["ferdie"], f"order-{i}", corrupt=True) for i in range(3)]
    charlie, dave, eve = (_failing(keys, n, s) for n, s in zip(VERIFIERS, samples, strict=True))
    alice = _member("//Alice", dev_chain.url, span, tmp_path, keys, samples)
    bob = _member("//Bob", dev_chain.url, span, tmp_path, keys, samples)
    alice.fetch_evidence, bob.fetch_evidence = _serves_evidence_of(bob), _serves_evidence_of(alice)
    try:
        # Alice heard Charlie then Dave; Bob heard Eve then Dave: their own evidence differs.
        asyncio.run(alice.count(charlie))
        asyncio.run(alice.count(dave))
        (opened,) = ledger.open_slash_proposals(cheater.ss58_address)
        assert account_id(opened.proposer) == keys["alice"].public_key and opened.evidence_hash is not None
        assert ledger.provider_status(cheater.ss58_address).stake == STAKE_UNITS * UNIT
        asyncio.run(bob.count(eve))
        asyncio.run(bob.count(dave))
        own = Evidence.of([samples[1].encode(), samples[2].encode()], [dave, eve]).evidence_hash
        assert own != opened.evidence_hash  # under the old rule Bob would have opened a second, lone proposal
        status = ledger.provider_status(cheater.ss58_address)
        assert status.stake == 0 and status.open_slashes == ()
        assert [s.evidence_hash for s in status.slashes] == [opened.evidence_hash]
        assert bob.stats.adopted == 1 and bob.stats.rechecked == 1 and bob.stats.executed == [cheater.ss58_address]
        assert own not in {e for e, _ in ledger.index.providers[cheater.public_key].slash_proposers.values()}
        asyncio.run(alice.retry_slashes())
        assert alice.store.pending_slashes() == [] and alice.stats.executed == [cheater.ss58_address]

        # Both opened at once (each from its own tally): the newer proposal's opener joins the oldest and
        # withdraws its own, so one slash executes and nothing stays open.
        _, racer = _registered(ledger)
        more = [_work(span, racer, keys["ferdie"], f"race-{i}", corrupt=True) for i in range(3)]
        for member in (alice, bob):
            for sample in more:
                member.store.put_sample(sample)
        charlie, dave, eve = (_failing(keys, n, s) for n, s in zip(VERIFIERS, more, strict=True))
        evidence_a = Evidence.of([more[0].encode(), more[1].encode()], [charlie, dave])
        evidence_b = Evidence.of([more[1].encode(), more[2].encode()], [dave, eve])
        for member, evidence in ((alice, evidence_a), (bob, evidence_b)):
            member.store.put_evidence(evidence)
            member.store.want_slash(racer.ss58_address, evidence.evidence_hash)
            ledger.approve_slash(member.keypair, racer.ss58_address, evidence.evidence_hash)
        assert len(ledger.provider_status(racer.ss58_address).open_slashes) == 2
        asyncio.run(alice.retry_slashes())  # its own is the oldest: it keeps it and waits
        assert ledger.provider_status(racer.ss58_address).stake == STAKE_UNITS * UNIT
        asyncio.run(bob.retry_slashes())  # re-runs Alice's evidence, joins it, withdraws its own
        status = ledger.provider_status(racer.ss58_address)
        assert status.stake == 0 and status.open_slashes == ()
        assert [s.evidence_hash for s in status.slashes] == [evidence_a.evidence_hash]
    finally:
        alice.close()
        bob.close()


def test_a_member_refuses_a_proposal_whose_evidence_accuses_someone_else(
    ledger, dev_chain, span, keys, tmp_path
) -> None:
    _, honest = _registered(ledger)
    _, cheater = _registered(ledger)
    samples = [_work(span, cheater, keys["ferdie"], f"else-{i}", corrupt=True) for i in range(2)]
    verdicts = [_failing(keys, n, s) for n, s in zip(VERIFIERS, samples, strict=False)]
    evidence = Evidence.of([s.encode() for s in samples], verdicts)  # real evidence, against the cheater
    alice = _member("//Alice", dev_chain.url, span, tmp_path, keys, samples)
    bob = _member("//Bob", dev_chain.url, span, tmp_path, keys, samples)
    alice.store.put_evidence(evidence)
    bob.fetch_evidence = _serves_evidence_of(alice)
    try:
        # A member (one key) opens a slash of the HONEST provider citing the cheater's evidence.
        ledger.approve_slash(alice.keypair, honest.ss58_address, evidence.evidence_hash)
        asyncio.run(bob.retry_slashes())
        assert bob.stats.signed == 0 and bob.stats.rechecked == 0
        assert "accuses" in bob.decisions[-1]["decision"]
        assert ledger.provider_status(honest.ss58_address).stake == STAKE_UNITS * UNIT
        (opened,) = ledger.open_slash_proposals(honest.ss58_address)
        assert ledger.withdraw_slash(alice.keypair, opened.call_hash)  # its opener can take it back
        assert ledger.provider_status(honest.ss58_address).open_slashes == ()
    finally:
        alice.close()
        bob.close()


# ----------------------------------------------------------------------------------- disputes and the council


def test_a_disputed_slash_executes_only_after_a_rerun_since_the_dispute(ledger, dev_chain, span, keys, tmp_path):
    _, cheater = _registered(ledger)
    samples = [_work(span, cheater, keys["ferdie"], f"dispute-{i}", corrupt=True) for i in range(2)]
    charlie, dave = (_failing(keys, n, s) for n, s in zip(VERIFIERS, samples, strict=False))
    alice = _member("//Alice", dev_chain.url, span, tmp_path, keys, samples)
    bob = _member("//Bob", dev_chain.url, span, tmp_path, keys, samples)
    alice.fetch_evidence, bob.fetch_evidence = _serves_evidence_of(bob), _serves_evidence_of(alice)
    try:
        asyncio.run(alice.count(charlie))
        asyncio.run(alice.count(dave))
        (opened,) = ledger.open_slash_proposals(cheater.ss58_address)
        # The cheater disputes, claiming its own re-run passes (a lie: every member re-runs anyway).
        ledger.file_dispute(cheater, opened.evidence_hash, True, 0, "my outputs are right")
        asyncio.run(bob.count(charlie))
        asyncio.run(bob.count(dave))
        status = ledger.provider_status(cheater.ss58_address)
        assert status.stake == 0 and [s.evidence_hash for s in status.slashes] == [opened.evidence_hash]
        assert status.open_disputes == ()  # the slash citing it closed the dispute
        assert bob.stats.disputes == 1
        logged = [d["decision"] for d in bob.decisions if d["evidence"] == opened.evidence_hash.hex()]
        seen = next(i for i, d in enumerate(logged) if "disputes it" in d and "my outputs are right" in d)
        assert "my re-run FAILS the provider" in logged[seen + 1 :], logged
    finally:
        alice.close()
        bob.close()


def test_disputed_evidence_a_member_cannot_load_holds_its_signature_only_until_the_window_closes(
    ledger, dev_chain, tmp_path
) -> None:
    _, provider = _registered(ledger)
    evidence = hashlib.sha256(b"evidence nobody serves any more").digest()
    paths = {uri: tmp_path / f"council-{uri[2:]}.sqlite3" for uri in ("//Alice", "//Bob")}
    for path in paths.values():  # both members judged it before (their re-run failed the provider)
        with EvidenceStore(path) as store:
            store.want_slash(provider.ss58_address, evidence)

    def member(uri: str) -> CouncilMember:
        config = CouncilConfig(model="unused", key=uri, initial_peers=[], chain_url=dev_chain.url)
        return CouncilMember(config, None, None, EvidenceStore(paths[uri]), ComputeLedger(dev_chain.url))

    alice, bob = member("//Alice"), member("//Bob")
    try:
        asyncio.run(alice.retry_slashes())  # opens it
        dispute = ledger.file_dispute(provider, evidence, True, 0, "re-run it")
        asyncio.run(bob.retry_slashes())  # cannot re-run it since the dispute: holds its signature
        status = ledger.provider_status(provider.ss58_address)
        assert status.stake == STAKE_UNITS * UNIT and len(status.open_slashes) == 1 and bob.stats.signed == 0
        head = ledger.substrate.get_block_number(None)
        dev_chain.new_blocks(max(0, dispute.block_number + ledger.config.dispute_window_blocks - head))
        asyncio.run(bob.retry_slashes())  # the window closed: its earlier judgment stands
        status = ledger.provider_status(provider.ss58_address)
        assert status.stake == 0 and [s.evidence_hash for s in status.slashes] == [evidence]
    finally:
        alice.close()
        bob.close()


# ------------------------------------------------------------------------------------------ dllm peer dispute


def test_dllm_peer_dispute_fetches_rechecks_and_files_only_for_the_accused(
    ledger, dev_chain, local_swarm, span, keys
) -> None:
    swarm = local_swarm
    uri, honest = _registered(ledger)
    other_uri, _ = _registered(ledger)
    samples = [_work(span, honest, keys["ferdie"], f"cli-{i}", corrupt=False) for i in range(2)]
    verdicts = [_failing(keys, n, s) for n, s in zip(VERIFIERS, samples, strict=False)]  # false verdicts
    evidence = Evidence.of([s.encode() for s in samples], verdicts)
    db = swarm.workdir / "evidence-published.sqlite3"
    with EvidenceStore(db) as store:
        store.put_evidence(evidence)
    swarm.start_verifier("//Dave", "--evidence-db", str(db))

    def dispute(key: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "dllm.cli", "peer", "dispute", evidence.evidence_hash.hex()]
        command += [
            "--reason",
            "the verdicts are false",
            "--model",
            swarm.model,
            "--initial-peers",
            *swarm.initial_peers,
        ]
        command += ["--chain-url", dev_chain.url, "--chain-key", key]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=swarm.env)

    refused = dispute(other_uri)
    assert refused.returncode == 1 and "accuses" in refused.stderr, refused.stderr
    filed = dispute(uri)
    assert filed.returncode == 0, filed.stderr
    assert "passes the provider" in filed.stdout and "recheck: receipt=" in filed.stdout
    status = wait_until(lambda: ledger.provider_status(honest.ss58_address).open_disputes, 30, "the dispute")
    (record,) = status
    assert record.evidence_hash == evidence.evidence_hash and record.provider_passed
    assert record.reason == "the verdicts are false" and f"open until block {record.open_until}" in filed.stdout

"""A real council on the real dev chain: each member is its own process with ONE key and slashes only what it
re-checked itself.

- One member's signature (`approve_slash`) opens the Multisig operation and moves nothing; the same member
  signing again still moves nothing; a second member's signature executes the slash, whose remark carries
  the evidence hash.
- A slash a member wanted but could not sign (the chain failed it) is kept in its store across a restart and
  signed when retried: the first member's retry opens it, the second's executes it, and the first then
  records it done.
- Two verifiers that sign false failing verdicts against an honest provider (tests/economy/lying_verifier.py)
  make a proposal, but both council members re-run the published evidence, find the provider honest and
  refuse: no slash is opened and the stake stays.
(A real cheater's evidence leading two members to slash, and `dllm verify --recheck` reproducing it, is
tests/economy/test_evidence.py.)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys

import pytest
from hivemind.proto import runtime_pb2

from chain.ledger import ComputeLedger
from dllm.council import CouncilConfig, CouncilMember
from dllm.processes import ManagedProcess
from economy.evidence_store import EvidenceStore
from swarm import protocol
from swarm.client import GenerationParams
from tests.chain.ledger_helpers import council_keys, fresh_account
from tests.economy.swarm_economy import (
    REPO,
    UNIT,
    funded_key,
    spot_checked_client,
    start_billing_peer,
    start_council,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

RATE = 10**10
STAKE_UNITS = 5


def test_one_member_alone_cannot_slash_two_members_do_and_the_remark_names_the_evidence(dev_chain) -> None:
    with ComputeLedger(dev_chain.url) as ledger:
        provider = fresh_account(ledger)
        ledger.register_provider(provider, STAKE_UNITS * UNIT)
        alice, bob, _ = council_keys(ledger)
        evidence = hashlib.sha256(b"published evidence").digest()
        assert ledger.approve_slash(alice, provider.ss58_address, evidence) is None  # opened
        assert ledger.approve_slash(alice, provider.ss58_address, evidence) is None  # the same key again: nothing
        status = ledger.provider_status(provider.ss58_address)
        assert status.stake == STAKE_UNITS * UNIT and len(status.open_slashes) == 1 and status.slashes == ()
        result = ledger.approve_slash(bob, provider.ss58_address, evidence)
        assert result is not None
        status = ledger.provider_status(provider.ss58_address)
        (slash,) = status.slashes
        assert status.stake == 0 and slash.evidence_hash == evidence and slash.block_number == result.block_number


def test_a_wanted_slash_survives_a_restart_and_is_signed_when_retried(dev_chain, tmp_path) -> None:
    with ComputeLedger(dev_chain.url) as ledger:
        provider = fresh_account(ledger)
        ledger.register_provider(provider, STAKE_UNITS * UNIT)
        evidence = hashlib.sha256(b"evidence of a failed attempt").digest()
        paths = {uri: tmp_path / f"council-{uri[2:]}.sqlite3" for uri in ("//Alice", "//Bob")}
        for path in paths.values():  # what a member's failed signature leaves behind
            with EvidenceStore(path) as store:
                store.want_slash(provider.ss58_address, evidence)
                store.slash_failed(provider.ss58_address, "ChainConnectionError: the chain did not answer")

        def restarted(uri: str) -> CouncilMember:
            config = CouncilConfig(model="unused", key=uri, initial_peers=[], chain_url=dev_chain.url)
            return CouncilMember(config, None, None, EvidenceStore(paths[uri]), ComputeLedger(dev_chain.url))

        alice, bob = restarted("//Alice"), restarted("//Bob")
        try:
            asyncio.run(alice.retry_slashes())
            status = ledger.provider_status(provider.ss58_address)
            assert status.stake == STAKE_UNITS * UNIT and len(status.open_slashes) == 1
            assert [p.attempts for p in alice.store.pending_slashes()] == [1]  # still wanted until on chain
            asyncio.run(bob.retry_slashes())
            status = ledger.provider_status(provider.ss58_address)
            assert status.stake == 0 and [s.evidence_hash for s in status.slashes] == [evidence]
            assert bob.store.pending_slashes() == [] and bob.store.slashed() == [provider.ss58_address]
            asyncio.run(alice.retry_slashes())  # sees the slash on chain: done, its tally dropped
            assert alice.store.pending_slashes() == [] and alice.stats.executed == [provider.ss58_address]
        finally:
            alice.close()
            bob.close()


def _start_lying_verifier(swarm, uri: str, chain_url: str) -> ManagedProcess:
    """A `dllm verify` process whose every verdict fails the provider."""
    name = f"liar-{uri.strip('/').lower()}"
    log_path = swarm.workdir / f"{name}.log"
    args = [sys.executable, "-m", "tests.economy.lying_verifier", "verify", "--model", swarm.model]
    args += ["--initial-peers", *swarm.initial_peers, "--chain-key", uri, "--chain-url", chain_url]
    args += ["--evidence-db", str(swarm.workdir / f"evidence-{name}.sqlite3")]
    env = {**swarm.env, "PYTHONPATH": str(REPO) + os.pathsep + swarm.env.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    proc = ManagedProcess(name, popen, log_path, {})
    swarm.processes.append(proc)
    return swarm.wait_verifier_ready(proc)


def test_false_verdicts_against_an_honest_provider_lead_to_no_slash(dev_chain, local_swarm, tiny_model_path) -> None:
    swarm = local_swarm
    with ComputeLedger(dev_chain.url) as ledger:
        uri, provider = funded_key(ledger)
        client_uri, _ = funded_key(ledger, 1000 * UNIT)
        _start_lying_verifier(swarm, "//Alice", dev_chain.url)
        _start_lying_verifier(swarm, "//Bob", dev_chain.url)
        members = start_council(swarm, dev_chain.url)
        start_billing_peer(swarm, "0:8", uri, dev_chain.url, swarm.workdir / "receipts.sqlite3", rate=RATE)
        model = spot_checked_client(swarm, tiny_model_path, dev_chain.url, client_uri, verifiers=2)
        core = model.core
        try:
            model.generate("def add(a, b):", GenerationParams(max_new_tokens=6, ignore_eos=True))
            model._loop.run(core.billing.flush())
            failing = [v for v in core.billing.verdicts if not v.verdict.passed]
            assert len({v.verdict.verifier for v in failing}) == 2  # both liars failed the honest provider

            def info(member: ManagedProcess) -> dict:
                request = runtime_pb2.ExpertRequest()
                response = model._loop.run(core.call(member.info["peer_id"], protocol.HANDLER_INFO, request))
                return protocol.unpack_metadata(response.metadata)

            for member in members:  # each re-ran the evidence itself and refused
                wait_until(lambda member=member: info(member)["refused"] >= 1, 120, "the member's own re-check")
                state = info(member)
                assert state["signed"] == 0 and state["executed"] == [] and state["pending_slashes"] == 0, state
        finally:
            model.close()
        status = ledger.provider_status(provider.ss58_address)
        assert status.stake == STAKE_UNITS * UNIT and status.slashes == () and status.open_slashes == ()

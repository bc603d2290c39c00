"""Evidence anyone can re-check, against real peers, real verifiers and the dev chain.

A cheating provider (every inference output corrupted) and an honest one serve billed requests whose
work is all sampled to two verifiers; two council members (`dllm council`, one key each) re-run the
evidence and slash the cheater. The slash on chain carries the SHA-256 of evidence that any
client fetches by that hash from the verifiers announced in the DHT (hash checked), and
`dllm verify --recheck HASH` re-runs it on this machine: it fails the cheater and passes the honest
provider's published evidence. A hash no verifier holds is refused.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from chain.account_derivation import account_id
from chain.ledger import ComputeLedger
from economy.evidence_store import EvidenceNotFoundError
from swarm.client import GenerationParams
from swarm.evidence import fetch_evidence
from swarm.routing import BanList
from tests.economy.swarm_economy import (
    REPO,
    UNIT,
    funded_key,
    spot_checked_client,
    start_billing_peer,
    start_cheater,
    start_council,
    start_verifier,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

RATE = 10**10


def _recheck(swarm, model_path, digest: bytes) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dllm.cli", "verify", "--recheck", digest.hex(), "--model", str(model_path)]
    command += ["--initial-peers", *swarm.initial_peers]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=swarm.env)


def test_slash_cites_evidence_anyone_fetches_and_rechecks(dev_chain, local_swarm, tiny_model_path) -> None:
    swarm = local_swarm
    ledger = ComputeLedger(dev_chain.url)
    try:
        keys = {name: funded_key(ledger) for name in ("honest", "cheater")}
        client_uri, _ = funded_key(ledger, 1000 * UNIT)
        stores = {name: swarm.workdir / f"receipts-{name}.sqlite3" for name in keys}
        start_verifier(swarm, "//Alice", dev_chain.url)
        start_verifier(swarm, "//Bob", dev_chain.url)
        start_council(swarm, dev_chain.url)
        procs = {
            "honest": start_billing_peer(swarm, "0:8", keys["honest"][0], dev_chain.url, stores["honest"], rate=RATE),
            "cheater": start_cheater(
                swarm, "0:8", keys["cheater"][0], dev_chain.url, stores["cheater"], rate=RATE, fraction=1.0
            ),
        }
        accounts = {name: kp.ss58_address for name, (_, kp) in keys.items()}
        model = spot_checked_client(swarm, tiny_model_path, dev_chain.url, client_uri, verifiers=2)
        core = model.core
        try:
            for other in ("honest", "cheater"):  # first through the cheater, then through the honest peer
                core.bans = BanList(3600)
                core.bans.ban(procs[other].info["peer_id"])
                model.generate("def add(a, b):", GenerationParams(max_new_tokens=6, ignore_eos=True))
            model._loop.run(core.billing.flush())

            status = wait_until(
                lambda: (s := ledger.provider_status(accounts["cheater"])).slashes and s, 120, "the cheater's slash"
            )
            (slash,) = status.slashes
            evidence = model._loop.run(fetch_evidence(core.dht, core.p2p, slash.evidence_hash))
            assert account_id(evidence.provider) == account_id(accounts["cheater"])
            assert len({v.verdict.verifier for v in evidence.verdicts}) == 2
            assert all(not v.verdict.passed for v in evidence.verdicts)
            with pytest.raises(EvidenceNotFoundError):
                model._loop.run(fetch_evidence(core.dht, core.p2p, bytes(32)))
        finally:
            model.close()

        cheater = _recheck(swarm, tiny_model_path, slash.evidence_hash)
        assert cheater.returncode == 1, cheater.stdout + cheater.stderr
        assert "recheck:" in cheater.stdout and "FAILED" in cheater.stdout
        assert "FAILS provider" in cheater.stdout + cheater.stderr

        # The honest provider's published evidence (what its verifier stored and serves) passes a re-run.
        rows = []
        for path in sorted(swarm.workdir.glob("evidence-*.sqlite3")):
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                rows += db.execute("SELECT hash, provider FROM evidence").fetchall()
        honest_hashes = [bytes(h) for h, p in rows if account_id(p) == account_id(accounts["honest"])]
        assert honest_hashes, rows
        honest = _recheck(swarm, tiny_model_path, honest_hashes[0])
        assert honest.returncode == 0, honest.stdout + honest.stderr
        assert "passes provider" in honest.stdout and "FAILED" not in honest.stdout

        unknown = _recheck(swarm, tiny_model_path, bytes(32))
        assert unknown.returncode != 0 and "no verifier served" in unknown.stdout + unknown.stderr
        assert ledger.provider_status(accounts["honest"]).stake == 5 * UNIT
    finally:
        ledger.close()

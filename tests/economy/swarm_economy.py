"""Helpers for the economy tests that run real peers, verifiers and a client against the dev chain."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from substrateinterface import Keypair

from chain.devchain.dev_accounts import dev_keypair
from chain.ledger import ComputeLedger
from chain.units import PLANCK_PER_TOKEN
from dllm.processes import LocalSwarm, ManagedProcess

if TYPE_CHECKING:
    from swarm.client import DistributedModel

UNIT = PLANCK_PER_TOKEN
REPO = Path(__file__).resolve().parents[2]


def funded_key(ledger: ComputeLedger, funds: int = 100 * UNIT) -> tuple[str, Keypair]:
    """A fresh key URI (unique across runs) and its keypair, funded by //Ferdie."""
    uri = f"//dllm-econ-{uuid.uuid4().hex[:12]}"
    kp = Keypair.create_from_uri(uri, ss58_format=ledger.ss58_format)
    call = ledger.substrate.compose_call("Balances", "transfer_keep_alive", {"dest": kp.ss58_address, "value": funds})
    ledger.submitter.submit(dev_keypair("Ferdie", ledger.ss58_format), call)
    return uri, kp


def start_billing_peer(
    swarm: LocalSwarm,
    blocks: str,
    uri: str,
    chain_url: str,
    receipts: Path,
    *,
    rate: int,
    stake_units: int = 5,
    settle_interval: float = 2.0,
    wait: bool = True,
    extra: tuple[str, ...] = (),
) -> ManagedProcess:
    """`dllm peer join` staked on chain, billing with `uri`, receipts in `receipts`; `extra`: more peer options."""
    return swarm.start_peer(
        blocks,
        "--chain-url",
        chain_url,
        "--chain-key",
        uri,
        "--stake",
        str(stake_units),
        "--rate",
        str(rate),
        "--receipts",
        str(receipts),
        "--settle-interval",
        str(settle_interval),
        *extra,
        name=f"peer-{receipts.stem}",
        wait=wait,
        timeout=120,
    )


def start_cheater(
    swarm: LocalSwarm,
    blocks: str,
    uri: str,
    chain_url: str,
    receipts: Path,
    *,
    rate: int,
    stake_units: int = 5,
    fraction: float = 0.2,
    seed: int = 7,
    extra: tuple[str, ...] = (),
) -> ManagedProcess:
    """The corrupting test peer (tests/economy/cheating_peer.py) as a managed process of `swarm`."""
    log_path = swarm.workdir / f"cheater-{receipts.stem}.log"
    args = [
        sys.executable,
        "-m",
        "tests.economy.cheating_peer",
        "--model",
        swarm.model,
        "--blocks",
        blocks,
        "--initial-peers",
        *swarm.initial_peers,
        "--chain-url",
        chain_url,
        "--chain-key",
        uri,
        "--stake-planck",
        str(stake_units * UNIT),
        "--receipts",
        str(receipts),
        "--rate",
        str(rate),
        "--fraction",
        str(fraction),
        "--seed",
        str(seed),
        "--settle-interval",
        "2",
        *extra,
    ]
    env = {**swarm.env, "PYTHONPATH": str(REPO) + os.pathsep + swarm.env.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    proc = ManagedProcess("cheater", popen, log_path, {"started_at": time.monotonic()})
    swarm.processes.append(proc)
    return swarm.wait_ready(proc, timeout=120)


def start_verifier(swarm: LocalSwarm, uri: str, chain_url: str) -> ManagedProcess:
    """`dllm verify` (the verifier process) signing its verdicts with `uri` (it holds no council key)."""
    return swarm.start_verifier(uri, "--chain-url", chain_url)


def spot_checked_client(
    swarm: LocalSwarm, model_path: Path, chain_url: str, client_uri: str, verifiers: int = 1
) -> DistributedModel:
    """A client paying with `client_uri` that sends every receipt's work to `verifiers` verifiers, returned once
    exactly that many are announced in the DHT (the caller closes it)."""
    from swarm.billing import BillingConfig
    from swarm.client import ClientConfig, DistributedModel

    billing = BillingConfig(chain_url, client_uri, sample_rate=1.0, verifiers_per_sample=verifiers)
    model = DistributedModel.from_pretrained(str(model_path), swarm.initial_peers, config=ClientConfig(billing=billing))
    try:
        client_billing = model.core.billing
        assert client_billing is not None
        peers = client_billing.verifier_peers
        wait_until(lambda: len(model._loop.run(peers())) == verifiers, 30, f"{verifiers} verifier(s) in the DHT")
    except BaseException:
        model.close()
        raise
    return model


def start_council(swarm: LocalSwarm, chain_url: str, members: tuple[str, ...] = ("//Alice", "//Bob")) -> list:
    """One `dllm council` process per member key (each holds its one key), started together, all ready."""
    procs = [swarm.start_council_member(key, chain_url, wait=False) for key in members]
    return [swarm.wait_council_ready(proc) for proc in procs]


def store_totals(path: Path) -> dict[str, tuple[int, int]]:
    """state -> (receipts, planck) of a provider's receipt store, read while the provider runs."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute("SELECT state, COUNT(*), COALESCE(SUM(amount), 0) FROM receipts GROUP BY state").fetchall()
    return {state: (int(n), int(total)) for state, n, total in rows}


def total_balance(ledger: ComputeLedger, ss58: str) -> int:
    """free + reserved: deposits the runtime reserves stay the account's money."""
    data = ledger.substrate.query("System", "Account", [ss58]).value["data"]
    return int(data["free"]) + int(data["reserved"])


def fees_paid(ledger: ComputeLedger, first_block: int, last_block: int, payers: set[str]) -> int:
    """Transaction fees the given accounts paid in blocks first..last (withdrawal minus refund, per extrinsic)."""
    from chain.account_derivation import account_id
    from chain.records import ChainEvent
    from chain.submission import fee_paid

    ids = {account_id(p) for p in payers}
    total = 0
    for number in range(first_block, last_block + 1):
        by_extrinsic: dict[int, list[ChainEvent]] = {}
        for event in ledger.substrate.get_events(ledger.substrate.get_block_hash(number)):
            v = event.value
            if v.get("extrinsic_idx") is not None:
                by_extrinsic.setdefault(v["extrinsic_idx"], []).append(
                    ChainEvent(v["module_id"], v["event_id"], v["attributes"])
                )
        for events in by_extrinsic.values():
            withdrawals = [e for e in events if (e.module, e.name) == ("Balances", "Withdraw")]
            if withdrawals and account_id(withdrawals[0].attributes["who"]) in ids:
                total += fee_paid(tuple(events))
    return total


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)

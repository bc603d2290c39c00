"""Chaos with the economy on: billed clients, billing peers and the real dev chain under faults.

One module-scoped setup: a dev chain (chopsticks, real runtime) with a state directory, a bootstrap
node, four billing peers (0:4 twice, 4:8 twice; each with a chain key, an identity and a receipts
store) and fleets of three clients, each paying with its own funded key. Faults: a peer SIGKILLed
mid-session and restarted with the same identity and receipts store, a peer frozen, the dev chain
stopped and restarted mid-run (state kept), a provider replaying settled receipts, the bootstrap
node killed. After each scenario the receipts are settled and audited: every co-signed receipt
held by a provider (its SQLite store) or a client is paid exactly once on chain, every provider's
balance grew by exactly what the chain's settlement log paid it, and no request was wrong or hung.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import pytest

from chain.account_derivation import account_id
from chain.errors import DispatchError, DoubleSettlementError, ExtrinsicRejectedError
from chain.ledger import ComputeLedger
from chain.records import Payment
from economy.receipt_store import ReceiptStore
from swarm.billing import BillingConfig
from swarm.client import ClientConfig
from swarm.sampling import GenerationParams
from tests.chaos.economy_harness import (
    UNIT,
    MoneyAudit,
    RestartableChain,
    fund_fresh_keys,
    store_receipts,
    store_states,
    total_balance,
)
from tests.chaos.harness import (
    ChaosSwarm,
    ClientFleet,
    ResourceSnapshot,
    ScenarioReport,
    alive_in_groups,
    pause,
    unix_sockets_of,
)
from tests.conftest import free_tcp_port

pytestmark = pytest.mark.timeout(300)

PARAMS = GenerationParams(max_new_tokens=24, ignore_eos=True)
RATE = 10**10
PEERS = {"a": "0:4", "b": "0:4", "c": "4:8", "d": "4:8"}
SETTLE_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def econ(tiny_model_path, tmp_path_factory):
    from chain.devchain.launcher import dev_chain_available

    if dev_chain_available():
        pytest.skip(f"dev chain unavailable: {dev_chain_available()}")
    workdir = tmp_path_factory.mktemp("chaos-economy")
    chain = RestartableChain(free_tcp_port(), workdir / "chain-state")
    swarm = ChaosSwarm(str(tiny_model_path), workdir=workdir)
    ledger = None
    try:
        chain.start()
        ledger = ComputeLedger(chain.url)
        keys = fund_fresh_keys(ledger, len(PEERS) + 3, 100 * UNIT)
        provider_keys, client_keys = dict(zip(PEERS, keys[: len(PEERS)], strict=True)), keys[len(PEERS) :]
        stores = {name: workdir / f"receipts-{name}.sqlite3" for name in PEERS}
        swarm.start_bootstrap()
        procs = [
            swarm.start_peer_with(
                blocks,
                "--chain-url",
                chain.url,
                "--chain-key",
                provider_keys[name][0],
                "--stake",
                "0",
                "--rate",
                str(RATE),
                "--receipts",
                str(stores[name]),
                "--settle-interval",
                "2",
                name=name,
                wait=False,
            )
            for name, blocks in PEERS.items()
        ]
        for p in procs:
            swarm.wait_ready(p, timeout=120)
        swarm.model_path = tiny_model_path
        swarm.chain, swarm.ledger, swarm.stores = chain, ledger, stores
        swarm.client_uris = [uri for uri, _ in client_keys]
        swarm.audit = MoneyAudit(ledger, {n: kp.ss58_address for n, (_, kp) in provider_keys.items()}, stores)
        swarm.billings = []  # every billed session of every fleet: the clients' co-signed receipts
        swarm.audited: set[bytes] = set()  # receipts already attributed to an earlier scenario's row
        swarm.settlement_failures = []  # clients' payments given up: must stay empty
        swarm.snapshots = []
        yield swarm
    finally:
        swarm.stop()
        if ledger is not None:
            ledger.close()
        chain.close()


def _peer(econ: ChaosSwarm, name: str):
    return next(p for p in econ.processes if p.name == name)


async def _fleet(econ: ChaosSwarm) -> ClientFleet:
    configs = [
        ClientConfig(
            request_timeout_s=5.0,
            ban_duration_s=3.0,
            refresh_interval_s=1.0,
            billing=BillingConfig(econ.chain.url, uri, sample_rate=0.0),
        )
        for uri in econ.client_uris
    ]
    fleet = ClientFleet(econ.model_path, econ.initial_peers, len(configs), configs=configs)
    await fleet.start()
    await fleet.make_reference(PARAMS)
    return fleet


async def _close(econ: ChaosSwarm, fleet: ClientFleet) -> None:
    clients = [c.billing for c in fleet.clients]
    await fleet.close()  # waits for the clients' background payments and submissions
    econ.billings += fleet.billings
    econ.settlement_failures += [f for c in clients for f in c.settlement_failures]
    econ.snapshots.append(ResourceSnapshot.take())


async def _settle_and_audit(econ: ChaosSwarm, report: ScenarioReport) -> None:
    """Waits for settlement, then fills the report's money columns with this scenario's new receipts."""
    assert econ.settlement_failures == []
    held = await asyncio.to_thread(econ.audit.wait_settled, econ.billings, SETTLE_TIMEOUT_S)
    result = await asyncio.to_thread(econ.audit.check, held)
    new = set(held) - econ.audited
    econ.audited |= set(held)
    assert new, "the scenario produced no co-signed receipt"
    report.lost_receipts = len(new & set(result.lost))
    report.paid_twice = len(new & set(result.paid_twice))
    assert result.lost == [] and result.paid_twice == [], f"{result}\n{_settlement_diagnosis(econ, held, result.lost)}"
    assert result.balance_mismatches == {}, result.balance_mismatches


def _settlement_diagnosis(econ: ChaosSwarm, held: dict, lost: list) -> str:
    """Who holds the unpaid receipts, and what each peer logged about settling (for a failure message)."""
    names = {account_id(ss58): name for name, ss58 in econ.audit.providers.items()}
    owners = Counter(names.get(held[rid].provider, "?") for rid in lost if rid in held)
    lines = [f"unpaid receipts by provider: {dict(owners)}"]
    for proc in econ.peers():
        relevant = [
            line
            for line in proc.log_tail(400).splitlines()
            if any(w in line.lower() for w in ("settl", "chain", "error", "traceback"))
        ]
        lines.append(f"--- {proc.name} (alive: {proc.alive}) ---\n" + "\n".join(relevant[-25:]))
    return "\n".join(lines)


async def test_sigkill_mid_session_then_restart_with_same_identity_and_receipts(econ, chaos_reports):
    report = ScenarioReport("economy: SIGKILL of a billing peer in use, restart with same identity + receipts")
    fleet = await _fleet(econ)
    try:
        run = asyncio.create_task(fleet.run(2, PARAMS))
        await fleet.wait_tokens(20)
        in_use = fleet.peers_in_use()
        victim = next(p for p in econ.peers() if p.info["peer_id"] in in_use)
        old_id = victim.info["peer_id"]
        victim.signal(signal.SIGKILL)
        report.outcomes += await run
        assert victim.popen.wait(5) == -signal.SIGKILL
        restarted = await asyncio.to_thread(econ.restart, victim)  # same --identity and --receipts
        assert restarted.info["peer_id"] == old_id
        report.outcomes += await fleet.run(1, PARAMS)
    finally:
        chaos_reports.append(report)
        await _close(econ, fleet)
    assert not report.violations, report.violations
    await _settle_and_audit(econ, report)


async def test_sigstop_of_a_billing_peer_in_use(econ, chaos_reports):
    report = ScenarioReport("economy: SIGSTOP (4 s) of a billing peer in use")
    fleet = await _fleet(econ)
    try:
        run = asyncio.create_task(fleet.run(2, PARAMS))
        await fleet.wait_tokens(20)
        victim = next(p for p in econ.peers() if p.info["peer_id"] in fleet.peers_in_use())
        await pause(victim, 4.0)
        report.outcomes += await run
    finally:
        chaos_reports.append(report)
        await _close(econ, fleet)
    assert not report.violations, report.violations
    await _settle_and_audit(econ, report)


async def test_dev_chain_restart_mid_run(econ, chaos_reports):
    """The chain goes away for a few seconds mid-run and comes back with its state: nothing is lost or paid twice."""
    report = ScenarioReport("economy: dev chain stopped and restarted mid-run (state kept)")
    fleet = await _fleet(econ)
    try:
        run = asyncio.create_task(fleet.run(3, PARAMS))
        await fleet.wait_tokens(20)
        head = await asyncio.to_thread(econ.ledger.substrate.get_block_number, None)
        await asyncio.to_thread(econ.chain.restart, 3.0)
        report.outcomes += await run
        assert await asyncio.to_thread(econ.ledger.substrate.get_block_number, None) >= head  # state kept
    finally:
        chaos_reports.append(report)
        await _close(econ, fleet)
    assert not report.violations, report.violations
    await _settle_and_audit(econ, report)


async def test_provider_replaying_settled_receipts_is_refused(econ, chaos_reports):
    """A hostile provider re-submits the stored settlement of every receipt it was already paid for, and
    has its client sign a fresh settlement of one: the runtime refuses each; nobody is paid twice."""
    report = ScenarioReport("economy: provider replays settled receipts/extrinsics")
    ledger = econ.ledger
    victim = max(econ.stores, key=lambda n: len(store_receipts(econ.stores[n])))
    store = ReceiptStore(econ.stores[victim])
    try:
        settled = sorted(store.settled_ids())
        assert settled, "an earlier scenario must have paid this provider"
        offers = [store.settlement_for(rid) for rid in settled]
        receipt = store.get(settled[0])
        receipt_client = store.client_of(settled[0])
    finally:
        store.close()
    provider = econ.audit.providers[victim]
    before = await asyncio.to_thread(total_balance, ledger, provider)
    history_before = len(await asyncio.to_thread(ledger.settlement_history))

    def replay() -> list[str]:
        outcomes = []
        for extrinsic in {o[1] for o in offers if o is not None}:
            try:
                ledger.submit_signed(extrinsic)
                outcomes.append("accepted")
            except ExtrinsicRejectedError as e:
                outcomes.append(f"refused: {e}")
        # A client tricked into signing a new settlement of a paid receipt: caught before signing ...
        client = _client_keypair(econ, receipt_client)
        payment = Payment.single(bytes.fromhex(settled[0].removeprefix("0x")), provider, receipt.signed.receipt.amount)
        try:
            ledger.build_settlement(client, [payment])
            outcomes.append("accepted")
        except DoubleSettlementError as e:
            outcomes.append(f"refused: {e}")
        # ... and by the runtime itself when that check is skipped: the marker already exists.
        real_check = ledger.settled_on_chain
        ledger.settled_on_chain = lambda *_: []
        try:
            call, _ = ledger.build_settlement(client, [payment])
        finally:
            ledger.settled_on_chain = real_check
        try:
            ledger.submitter.submit(client, call)
            outcomes.append("accepted")
        except DispatchError as e:
            outcomes.append(f"refused: {e}")
        return outcomes

    outcomes = await asyncio.to_thread(replay)
    for text in outcomes:
        report.outcomes.append(_replay_outcome(text))
    chaos_reports.append(report)
    assert outcomes and all(o.startswith("refused") for o in outcomes), outcomes
    assert await asyncio.to_thread(total_balance, ledger, provider) == before
    assert len(await asyncio.to_thread(ledger.settlement_history)) == history_before
    result = await asyncio.to_thread(econ.audit.check, econ.audit.held(econ.billings))
    report.lost_receipts, report.paid_twice = len(result.lost), len(result.paid_twice)
    assert result.lost == [] and result.paid_twice == [] and result.balance_mismatches == {}, result


def _client_keypair(econ: ChaosSwarm, client_ss58: str):
    from chain.account_derivation import account_id
    from economy.signing import load_keypair

    for uri in econ.client_uris:
        kp = load_keypair(uri, econ.ledger.ss58_format)
        if account_id(kp.ss58_address) == account_id(client_ss58):
            return kp
    raise AssertionError(f"no fleet client key for {client_ss58}")


def _replay_outcome(text: str):
    from tests.chaos.harness import RequestOutcome

    # A replay refused with a typed chain error is the expected, clear failure; accepted would be "wrong".
    return RequestOutcome(-1, "replay", "clear_error" if text.startswith("refused") else "wrong", 0.0, detail=text)


async def test_bootstrap_death_with_billing(econ, chaos_reports):
    """Runs after the other fleets: the bootstrap node stays dead; billing and settlement carry on."""
    report = ScenarioReport("economy: bootstrap node SIGKILLed mid-run")
    bootstrap = _peer(econ, "bootstrap")
    fleet = await _fleet(econ)
    try:
        run = asyncio.create_task(fleet.run(2, PARAMS))
        await fleet.wait_tokens(20)
        bootstrap.signal(signal.SIGKILL)
        report.outcomes += await run
        assert bootstrap.popen.wait(5) == -signal.SIGKILL
    finally:
        chaos_reports.append(report)
        await _close(econ, fleet)
    assert not report.violations, report.violations
    await _settle_and_audit(econ, report)


def test_all_receipts_paid_once_and_nothing_left_running(econ):
    """Over the whole module: every store fully settled, the audit clean, and stopping leaves no process or socket."""
    held = econ.audit.held(econ.billings)
    result = econ.audit.check(held)
    assert result.held >= 10 and result.lost == [] and result.paid_twice == [] and result.balance_mismatches == {}
    # The audit reads the chain; each provider's store marks its receipts at its next round (every 2 s).
    deadline = time.monotonic() + 30
    while any(set(store_states(path)) - {"settled"} for path in econ.stores.values()) and time.monotonic() < deadline:
        time.sleep(1.0)
    for name, path in econ.stores.items():
        assert set(store_states(path)) <= {"settled"}, (name, store_states(path))

    first, *later = econ.snapshots
    for snapshot in later:
        assert snapshot.children <= first.children, (
            f"client processes left behind: {snapshot.children - first.children}"
        )
        # Descriptors are not compared here: each billed fleet leaves ~3 pipe descriptors in this test process
        # (not chain restarts; source not identified yet, see docs/reliability.md). Sockets and processes are.
        assert snapshot.connections <= first.connections, (first, snapshot)
    groups = [os.getpgid(p.popen.pid) for p in econ.processes if p.alive]
    live_sockets = unix_sockets_of([p for p in econ.processes if p.alive])
    econ.stop()
    assert alive_in_groups(groups) == []
    assert [s for s in live_sockets if os.path.exists(s)] == []

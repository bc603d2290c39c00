"""Chaos on a live swarm (no chain): peers SIGKILLed, frozen, restarted, slowed; the bootstrap node killed.

One swarm serves the whole module (bootstrap; 0:4 twice; 4:8 twice, one of them slowed by a test-only
launcher) while fleets of concurrent clients generate. Each scenario asserts that every request either
returned exactly the reference greedy tokens or failed with a clear, typed error, and that nothing hung.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from swarm import protocol
from swarm.client import SwarmClient
from swarm.sampling import GenerationParams
from tests.chaos.harness import (
    ChaosSwarm,
    ClientFleet,
    ResourceSnapshot,
    ScenarioReport,
    alive_in_groups,
    pause,
    unix_sockets_of,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)

PARAMS = GenerationParams(max_new_tokens=32, ignore_eos=True)
SLOW_DELAY_S = 0.05


@pytest.fixture(scope="module")
def chaos(tiny_model_path, tmp_path_factory):
    swarm = ChaosSwarm(str(tiny_model_path), workdir=tmp_path_factory.mktemp("chaos"))
    try:
        swarm.start_bootstrap()
        procs = [
            swarm.start_peer_with("0:4", name="a", wait=False),
            swarm.start_peer_with("0:4", name="b", wait=False),
            swarm.start_peer_with("4:8", name="c", wait=False),
            swarm.start_peer_with(
                "4:8", name="slow", launcher=["tests.chaos.slow_peer", str(SLOW_DELAY_S)], wait=False
            ),
        ]
        for p in procs:
            swarm.wait_ready(p)
        swarm.model_path = tiny_model_path
        swarm.snapshots = []  # this process's resources after each fleet closed: must not grow
        swarm.leftover_files = []  # clients' socket files still on disk after they closed: must stay empty
        yield swarm
    finally:
        swarm.stop()


def _peer(chaos: ChaosSwarm, name: str):
    return next(p for p in chaos.processes if p.name == name)


async def _fleet(chaos: ChaosSwarm, size: int = 3) -> ClientFleet:
    fleet = ClientFleet(chaos.model_path, chaos.initial_peers, size)
    await fleet.start()
    await fleet.make_reference(PARAMS)
    return fleet


async def test_sigkill_mid_session_then_restart_with_same_identity(chaos, chaos_reports):
    report = ScenarioReport("SIGKILL of a peer in use, restart with same identity")
    fleet = await _fleet(chaos)
    try:
        run = asyncio.create_task(fleet.run(2, PARAMS))
        await fleet.wait_tokens(20)
        # kill a fast peer that some client's session is using right now
        in_use = fleet.peers_in_use()
        victim = next(p for p in chaos.peers() if p.info["peer_id"] in in_use and p.name != "slow")
        old_id = victim.info["peer_id"]
        victim.signal(signal.SIGKILL)
        report.outcomes += await run
        assert victim.popen.wait(5) == -signal.SIGKILL
        assert sum(o.failovers for o in report.outcomes) >= 1

        # the same identity comes back as the same peer id, re-announces, and serves again
        restarted = await asyncio.to_thread(chaos.restart, victim)
        assert restarted.info["peer_id"] == old_id
        client = fleet.clients[0]
        await wait_until(lambda: not client.bans.is_banned(old_id), 10, "the ban to expire")
        records = await client.records(refresh=True)
        assert any(r.peer_id == old_id for r in records)
        assert await client.is_alive(old_id)
        report.outcomes += await fleet.run(1, PARAMS)
    finally:
        chaos_reports.append(report)
        await fleet.close()
        chaos.snapshots.append(ResourceSnapshot.take())
        chaos.leftover_files += [f for f in fleet.socket_files if os.path.exists(f)]
    assert not report.violations, report.violations


async def test_sigstop_of_a_peer_in_use(chaos, chaos_reports):
    report = ScenarioReport("SIGSTOP (4 s) of a peer in use")
    fleet = await _fleet(chaos)
    try:
        run = asyncio.create_task(fleet.run(2, PARAMS))
        await fleet.wait_tokens(20)
        victim = next(p for p in chaos.peers() if p.info["peer_id"] in fleet.peers_in_use() and p.name != "slow")
        await pause(victim, 4.0)
        report.outcomes += await run
        # thawed, the peer serves again (its frozen sessions simply idle out)
        client = fleet.clients[0]
        await wait_until(lambda: not client.bans.is_banned(victim.info["peer_id"]), 10, "the ban to expire")
        assert victim.alive and await client.is_alive(victim.info["peer_id"])
    finally:
        chaos_reports.append(report)
        await fleet.close()
        chaos.snapshots.append(ResourceSnapshot.take())
        chaos.leftover_files += [f for f in fleet.socket_files if os.path.exists(f)]
    assert not report.violations, report.violations


async def test_slow_peer_while_its_alternative_is_frozen(chaos, chaos_reports):
    report = ScenarioReport(f"slow peer (+{SLOW_DELAY_S * 1000:.0f} ms/step), alternative frozen")
    fast, slow = _peer(chaos, "c"), _peer(chaos, "slow")
    fleet = await _fleet(chaos)
    try:
        served_before = await _requests_served(fleet.clients[0], slow.info["peer_id"])
        fast.signal(signal.SIGSTOP)
        try:
            report.outcomes += await fleet.run(2, PARAMS)
        finally:
            fast.signal(signal.SIGCONT)
        assert (
            await _requests_served(fleet.clients[0], slow.info["peer_id"])
            >= served_before + 3 * 2 * PARAMS.max_new_tokens
        )
    finally:
        chaos_reports.append(report)
        await fleet.close()
        chaos.snapshots.append(ResourceSnapshot.take())
        chaos.leftover_files += [f for f in fleet.socket_files if os.path.exists(f)]
    assert not report.violations, report.violations
    assert report.counts["correct"] == len(report.outcomes)  # slow is not broken: nothing may fail


async def _requests_served(client: SwarmClient, peer_id: str) -> int:
    from hivemind.proto import runtime_pb2

    reply = await client.call(peer_id, protocol.HANDLER_INFO, runtime_pb2.ExpertRequest())
    return protocol.unpack_metadata(reply.metadata)["requests_served"]


async def test_bootstrap_death_mid_run(chaos, chaos_reports):
    """Runs last in this module: the bootstrap node stays dead; peers and clients carry on without it."""
    report = ScenarioReport("bootstrap node SIGKILLed mid-run")
    bootstrap = _peer(chaos, "bootstrap")
    fleet = await _fleet(chaos)
    try:
        run = asyncio.create_task(fleet.run(2, PARAMS))
        await fleet.wait_tokens(20)
        bootstrap.signal(signal.SIGKILL)
        report.outcomes += await run
        assert bootstrap.popen.wait(5) == -signal.SIGKILL
        # a client that joins later through any peer's address finds the whole model
        late = ClientFleet(chaos.model_path, _peer(chaos, "a").info["maddrs"][:1], 1)
        await late.start()
        try:
            late.reference = fleet.reference
            assert len(await late.clients[0].plan(0, 8)) >= 2
            report.outcomes += await late.run(1, PARAMS)
        finally:
            await late.close()
    finally:
        chaos_reports.append(report)
        await fleet.close()
        chaos.snapshots.append(ResourceSnapshot.take())
        chaos.leftover_files += [f for f in fleet.socket_files if os.path.exists(f)]
    assert not report.violations, report.violations


def test_no_process_or_socket_left_after_stop(chaos):
    """Clients leave nothing behind, and stopping the swarm ends every process group and removes their sockets.

    The first fleet sets up per-process machinery once (multiprocessing's listener), so later fleets
    are compared with the state after the first. Sockets of a SIGKILLed p2pd cannot be removed by the
    dead process; only those of processes alive until the stop are checked.
    """
    assert chaos.leftover_files == []
    first, *later = chaos.snapshots
    assert later, "run the whole module: the fleet scenarios record the snapshots"
    for snapshot in later:
        assert snapshot.children <= first.children, (
            f"client processes left behind: {snapshot.children - first.children}"
        )
        new_fds = sorted(set(snapshot.fd_targets) - set(first.fd_targets))
        assert snapshot.connections <= first.connections and snapshot.fds <= first.fds, (first, snapshot, new_fds)

    groups = [os.getpgid(p.popen.pid) for p in chaos.processes if p.alive]
    live_sockets = unix_sockets_of([p for p in chaos.processes if p.alive])
    assert groups and live_sockets
    chaos.stop()
    assert alive_in_groups(groups) == []
    assert [s for s in live_sockets if os.path.exists(s)] == []

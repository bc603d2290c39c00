"""Averaging adapters among replicas: real hivemind DHT nodes and averagers in separate processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.timeout(240)

# Replicas read their plan and start matchmaking 3 s before t0: the lead leaves room for a loaded machine.
PLAN_LEAD_S = 8.0

ROOT = Path(__file__).resolve().parents[2]


class Replica:
    """A tests/peer/averaging_replica.py process in its own process group."""

    def __init__(self, name: str, out: Path, initial_peers: list[str], *extra: str):
        self.name = name
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.peer.averaging_replica",
                "--name",
                name,
                "--out",
                str(out),
                "--initial-peers",
                *initial_peers,
                *extra,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.events: list[dict] = []

    def next_event(self, timeout: float = 60.0) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                return None  # exited
            if line.startswith("{"):
                event = json.loads(line)
                self.events.append(event)
                return event
        raise TimeoutError(f"{self.name}: no event within {timeout} s")

    def wait_for(self, kind: str, timeout: float = 60.0) -> dict:
        while True:
            event = self.next_event(timeout)
            assert event is not None, f"{self.name} exited (rc={self.proc.wait()}) before '{kind}'"
            if event["event"] == kind:
                return event

    def send_plan(self, plan: dict) -> None:
        self.proc.stdin.write(json.dumps(plan) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.proc.pid, signal.SIGKILL)  # DHT, averager and p2pd children included
        self.proc.wait(timeout=10)


@pytest.fixture
def replicas(tmp_path):
    started: list[Replica] = []

    def start(name: str, *extra: str, bootstrap: Replica | None = None) -> Replica:
        peers = next(e for e in bootstrap.events if e["event"] == "ready")["maddrs"] if bootstrap else []
        replica = Replica(name, tmp_path, peers, *extra)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()


def _load(out: Path, name: str, k: int, what: str) -> torch.Tensor:
    state = torch.load(out / f"{name}_r{k}_{what}.pt")
    return torch.cat([state[n].reshape(-1) for n in sorted(state)])


def test_replicas_average_and_a_replica_killed_mid_round_never_leaves_a_partial_average(replicas, tmp_path):
    # rank 96 on every projection of 8 layers: 1.67M adapter values, large enough that killing a
    # member once all-reduce has started interrupts the transfer.
    size = ["--rank", "96", "--update-scale", "0.01"]
    a = replicas("a", *size)
    a.wait_for("ready")
    b = replicas("b", *size, bootstrap=a)
    victim = replicas("victim", *size, "--die-in-round", "1", bootstrap=a)
    b.wait_for("ready")
    victim.wait_for("ready")

    # period 10 s, declarations live 4 s: the victim's lapses before round 2 starts matchmaking
    period, t0 = 10.0, time.time() + PLAN_LEAD_S
    for replica in (a, b, victim):
        replica.send_plan({"t0": t0, "period": period, "rounds": [0, 1, 2]})

    # round 0: all three average; live moves by the exact sum of their updates (each feedback pass trains one
    # replica: the sum is what one peer serving them all would learn), the same everywhere
    outcomes = {r.name: r.wait_for("round") for r in (a, b, victim)}
    assert all(o["status"] == "averaged" and len(o["group"]) == 3 and o["version"] == 1 for o in outcomes.values()), (
        outcomes
    )
    sum0 = torch.stack([_load(tmp_path, n, 0, "update") for n in ("a", "b", "victim")]).sum(0)
    initial = _load(tmp_path, "a", 0, "live") - sum0  # live = v0 + sum(update)
    for name in ("a", "b", "victim"):
        assert torch.allclose(_load(tmp_path, name, 0, "live") - initial, sum0, atol=1e-5)
    assert torch.allclose(_load(tmp_path, "a", 0, "live"), _load(tmp_path, "b", 0, "live"), atol=1e-6)

    # round 1: the victim SIGKILLs itself (and its DHT, averager, p2pd) during all-reduce
    survivors = {r.name: r.wait_for("round") for r in (a, b)}
    assert victim.next_event(30) is None and victim.proc.wait(10) == -signal.SIGKILL
    updates1 = {n: _load(tmp_path, n, 1, "update") for n in ("a", "b", "victim")}
    for name, outcome in survivors.items():
        before1, live = _load(tmp_path, name, 0, "live"), _load(tmp_path, name, 1, "live")
        if outcome["status"] == "skipped":  # live version unchanged
            assert outcome["version"] == 1 and torch.equal(live, before1), outcome
        else:  # or a correct average of exactly the group that formed
            assert outcome["status"] == "averaged", outcome
            members = [
                "victim"
                if p not in {a.events[0]["peer_id"], b.events[0]["peer_id"]}
                else ("a" if p == a.events[0]["peer_id"] else "b")
                for p in outcome["group"]
            ]
            expected = torch.stack([updates1[m] for m in members]).sum(0)
            assert torch.allclose(live - before1, expected, atol=1e-5), outcome
    assert survivors["a"]["status"] == survivors["b"]["status"], survivors

    # round 2: the victim's declaration has expired; the survivors average between themselves
    final = {r.name: r.wait_for("round") for r in (a, b)}
    assert all(o["status"] == "averaged" and len(o["group"]) == 2 for o in final.values()), final
    live_a, live_b = _load(tmp_path, "a", 2, "live"), _load(tmp_path, "b", 2, "live")
    assert torch.allclose(live_a, live_b, atol=1e-6)
    # each survivor's round-2 update also carries its round-1 update if round 1 was skipped
    a.wait_for("done")
    b.wait_for("done")


def test_a_joining_replica_fetches_current_adapters_first(replicas, tmp_path):
    a = replicas("a", "--rank", "4")
    a.wait_for("ready")
    b = replicas("b", "--rank", "4", bootstrap=a)
    b.wait_for("ready")
    t0 = time.time() + PLAN_LEAD_S
    for replica in (a, b):
        replica.send_plan({"t0": t0, "period": 8.0, "rounds": [0]})
    assert a.wait_for("round")["status"] == "averaged"
    assert b.wait_for("round")["status"] == "averaged"
    late = replicas("late", "--rank", "4", "--fetch-state", bootstrap=a)
    fetched = late.wait_for("fetched", timeout=90)
    assert fetched == {"event": "fetched", "ok": True, "version": 1}


def test_a_replica_that_diverged_is_brought_back_to_the_group_state(replicas, tmp_path):
    """A replica promoted an update alone (cut off from its group): the next round finds the members'
    live adapters differ, skips, and the ones behind adopt the leading state; then rounds average again."""
    a = replicas("a", "--rank", "4")
    a.wait_for("ready")
    b = replicas("b", "--rank", "4", bootstrap=a)
    loner = replicas("loner", "--rank", "4", "--diverge-in-round", "0", bootstrap=a)
    b.wait_for("ready")
    loner.wait_for("ready")
    t0 = time.time() + PLAN_LEAD_S
    for replica in (a, b, loner):
        replica.send_plan({"t0": t0, "period": 10.0, "rounds": [0, 1, 2]})

    first = {r.name: r.wait_for("round") for r in (a, b, loner)}
    assert first["loner"]["status"] == "averaged" and first["loner"]["version"] == 1, first
    assert first["a"]["status"] == first["b"]["status"] == "skipped" and first["a"]["version"] == 0, first

    second = {r.name: r.wait_for("round") for r in (a, b, loner)}
    assert all(o["status"] == "skipped" and "different live adapters" in o["reason"] for o in second.values()), second
    for name in ("a", "b"):  # adopted the loner's v1, exactly
        assert second[name]["version"] == 1 and "caught up to v1" in second[name]["reason"], second
        assert torch.equal(_load(tmp_path, name, 1, "live"), _load(tmp_path, "loner", 0, "live"))

    third = {r.name: r.wait_for("round") for r in (a, b, loner)}
    assert all(o["status"] == "averaged" and len(o["group"]) == 3 and o["version"] == 2 for o in third.values()), third
    for name in ("a", "b"):  # all-reduce leaves replicas equal up to float rounding, not bit for bit
        assert torch.allclose(_load(tmp_path, name, 2, "live"), _load(tmp_path, "loner", 2, "live"), atol=1e-6)


def test_sketch_check_accepts_a_true_mean_and_catches_partial_averages():
    from peer.average_check import AverageSketcher, Sketch, SketchError

    torch.manual_seed(1)
    inputs = [torch.randn(100_000) for _ in range(3)]
    sketcher = AverageSketcher(100_000, blocks=256, seed=7)
    sketches = [sketcher.sketch(x) for x in inputs]
    mean = torch.stack(inputs).mean(0)
    assert sketcher.mismatch(sketcher.sketch(mean), sketches, [1, 1, 1]) <= 1.0
    # hivemind's failure modes: one part averaged without a sender, or a part left un-averaged
    missing_sender = mean.clone()
    missing_sender[20_000:30_000] = torch.stack(inputs[:2]).mean(0)[20_000:30_000]
    not_averaged = mean.clone()
    not_averaged[:512] = inputs[0][:512]
    for partial in (missing_sender, not_averaged):
        assert sketcher.mismatch(sketcher.sketch(partial), sketches, [1, 1, 1]) > 1.0
        assert sketcher.mismatch_of(partial, sketches, [1, 1, 1]) > 1.0
    assert sketcher.mismatch_of(mean, sketches, [1, 1, 1]) <= 1.0
    # weights count: the same result is wrong if a member's weight was different
    assert sketcher.mismatch(sketcher.sketch(mean), sketches, [2, 1, 1]) > 1.0
    # a vector given in parts (a version's tensors) has the sketch of its concatenation
    parts = [mean[:333].view(9, 37), mean[333:90_000], mean[90_000:]]
    by_parts, whole = sketcher.sketch_parts(parts), sketcher.sketch(mean)
    assert all(np.array_equal(getattr(by_parts, f), getattr(whole, f)) for f in ("sums", "signed_sums", "abs_sums"))
    with pytest.raises(SketchError):
        sketcher.sketch_parts(parts[:2])
    with pytest.raises(SketchError):
        Sketch.from_bytes(b"\x00" * 10, 256)

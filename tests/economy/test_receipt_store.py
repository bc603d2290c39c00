"""Receipt store and settler: states, replay refusal, and exactly-once payment across SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from economy.receipt_store import ReceiptState, ReceiptStore
from economy.receipts import ForgedReceiptError, ReplayedReceiptError, WrongSignerError
from economy.settlement import Settler

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("settle_worker.py")


class MemoryLedger:
    """In-process ledger for the non-crash tests (same contract as the worker's file ledger)."""

    def __init__(self, fail: bool = False):
        self.paid: list[str] = []
        self.fail = fail

    async def settle(self, batch):
        if self.fail:
            raise ConnectionError("chain unreachable")
        self.paid.extend(batch.receipt_ids)
        return "0xfeed"

    def is_settled(self, receipt_id: str) -> bool:
        return receipt_id in self.paid


def test_add_refuses_replays_and_bad_receipts(tmp_path, make_receipt, keys) -> None:
    with ReceiptStore(tmp_path / "r.db", network="dllm-dev", provider=keys["bob"].ss58_address) as store:
        signed = make_receipt()
        store.add(signed)
        with pytest.raises(ReplayedReceiptError, match="already stored"):
            store.add(signed)
        # same session segment, different content: still a replay of that segment
        with pytest.raises(ReplayedReceiptError):
            store.add(make_receipt(tokens=5))
        with pytest.raises(WrongSignerError):
            store.add(make_receipt(provider="charlie", session=b"other"))
        import dataclasses

        tampered = dataclasses.replace(signed, provider_signature=bytes(64))
        with pytest.raises(ForgedReceiptError):
            store.add(dataclasses.replace(tampered, receipt=dataclasses.replace(signed.receipt, sequence=9)))
        assert store.counts()[ReceiptState.UNSETTLED] == 1


async def test_settler_pays_once_and_survives_ledger_failure(tmp_path, make_receipt) -> None:
    store = ReceiptStore(tmp_path / "r.db")
    ids = [store.add(make_receipt(session=f"s{i}".encode(), client="alice" if i % 2 else "charlie")) for i in range(7)]
    failing = Settler(store, MemoryLedger(fail=True), batch_size=3)
    with pytest.raises(ConnectionError):
        await failing.settle_pending()
    assert store.counts()[ReceiptState.UNSETTLED] == 7  # the failed batch went back
    ledger = MemoryLedger()
    results = await Settler(store, ledger, batch_size=3).settle_pending()
    assert sorted(ledger.paid) == sorted(ids)
    assert sum(r.receipts for r in results) == 7 and len(results) == 3  # 4 charlie (2 batches) + 3 alice
    assert store.counts()[ReceiptState.SETTLED] == 7
    assert await Settler(store, ledger).settle_pending() == []
    assert store.get(ids[0]).tx_hash == "0xfeed"
    store.close()


def start_worker(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path / "store.db"), str(tmp_path / "ledger.db"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode} before {prefix!r}: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"worker did not print {prefix!r} in {timeout} s")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()


def finish(tmp_path: Path) -> dict:
    proc = start_worker(tmp_path)
    line = wait_for_line(proc, "DONE")
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    return json.loads(line[len("DONE ") :])


def payments_per_receipt(tmp_path: Path) -> dict[str, int]:
    db = sqlite3.connect(tmp_path / "ledger.db")
    try:
        return dict(db.execute("SELECT receipt_id, COUNT(*) FROM payments GROUP BY receipt_id").fetchall())
    finally:
        db.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point,confirmed", [("after-store", 0), ("before-pay", 0), ("after-pay", 4)])
def test_sigkill_then_restart_settles_exactly_once(tmp_path, point: str, confirmed: int) -> None:
    proc = start_worker(tmp_path, "--receipts", "12", "--batch-size", "4", "--pause-at", point)
    wait_for_line(proc, f"PAUSED {point}")
    kill(proc)
    done = finish(tmp_path)
    assert done["confirmed"] == confirmed
    assert done["settled"] == 12 and done["settling"] == 0 and done["unsettled"] == 0
    paid = payments_per_receipt(tmp_path)
    assert len(paid) == 12 and set(paid.values()) == {1}


@pytest.mark.timeout(180)
def test_random_sigkills_during_settlement_pay_each_receipt_once(tmp_path) -> None:
    rng = random.Random(1234)
    # 40 batches of >= 50 ms each outlast the <= 1.5 s the process is left running in total,
    # so the last kill always lands before settlement is complete.
    proc = start_worker(tmp_path, "--receipts", "120", "--batch-size", "3", "--delay", "0.05")
    wait_for_line(proc, "SETTLING")
    for _ in range(4):
        time.sleep(rng.uniform(0.05, 0.3))
        kill(proc)
        proc = start_worker(tmp_path, "--batch-size", "3", "--delay", "0.05")
        wait_for_line(proc, "SETTLING")
    time.sleep(rng.uniform(0.05, 0.3))
    kill(proc)
    partial = payments_per_receipt(tmp_path)
    assert len(partial) < 120, "the kills should have landed mid-settlement"
    done = finish(tmp_path)
    assert done["settled"] == 120
    paid = payments_per_receipt(tmp_path)
    assert len(paid) == 120 and set(paid.values()) == {1}

"""`dllm demo --model tiny` end to end as a subprocess (the fast path: the tiny model completes prompts; the default
real model answers questions through its chat template, too slow here): real receipts paid on chain, its table in
80 columns, and that nothing it started outlives it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import psutil
import pytest

from chain.devchain.launcher import dev_chain_available
from dllm.demo import TABLE_WIDTH, TINY_PROMPTS

pytestmark = pytest.mark.timeout(420)


def _watch(proc: subprocess.Popen, seen: dict[tuple[int, float], str], sockets: set[str]) -> None:
    """Record every descendant of the demo (pid + start time, so a reused pid is not confused)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        try:
            key = (child.pid, child.create_time())
            if key not in seen:
                cmdline = child.cmdline()
                seen[key] = " ".join(cmdline)
                sockets.update(a[len("-listen=/unix") :] for a in cmdline if a.startswith("-listen=/unix/"))
        except psutil.Error:
            continue


def _survivors(seen: dict[tuple[int, float], str]) -> list[str]:
    alive = []
    for (pid, created), cmd in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {cmd}")
        except psutil.NoSuchProcess:
            continue
    return alive


def test_demo_pays_real_receipts_prints_the_chain_table_and_leaves_nothing(tmp_path):
    missing = dev_chain_available()
    if missing:
        pytest.skip(f"dev chain unavailable: {missing}")
    seen: dict[tuple[int, float], str] = {}
    sockets: set[str] = set()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": str(TABLE_WIDTH)}
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dllm.cli", "demo", "--model", "tiny", "--queries", "2", "--max-tokens", "8"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        while proc.poll() is None:
            _watch(proc, seen, sockets)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    out = log_path.read_text()
    assert proc.returncode == 0, out

    # Everything the demo started (chain, bootstrap, 3 peers, a verifier, 3 council members, their DHT, p2pd and
    # gossip processes).
    assert sum("chopsticks" in cmd for cmd in seen.values()) == 1, seen
    # (a peer's forked DHT process shows the same command line: count distinct provider keys)
    providers = {m for cmd in seen.values() for m in re.findall(r"//dllm-demo-provider-\d+", cmd)}
    assert len(providers) == 3, seen
    assert any("dllm.cli verify" in cmd for cmd in seen.values()), seen
    # Three council members, each its own process holding one key; no process holds two.
    members = {m for cmd in seen.values() if "dllm.cli council" in cmd for m in re.findall(r"--chain-key (//\w+)", cmd)}
    assert members == {"//Alice", "//Bob", "//Charlie"}, seen
    assert not any("--council-key" in cmd for cmd in seen.values()), seen
    assert any("economy.gossip_node" in cmd for cmd in seen.values()), seen  # peers gossip their price asks
    assert any("p2pd" in cmd for cmd in seen.values()), seen
    deadline = time.monotonic() + 15
    while _survivors(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _survivors(seen), f"the demo left processes behind:\n{_survivors(seen)}"
    assert sockets and not [s for s in sockets if Path(s).exists()], "p2pd sockets left in /tmp"
    assert "shut down cleanly" in out

    # Prompts completed (the tiny model's fast path; a real model answers questions through its chat template),
    # streamed, each hop's receipt co-signed by the client, paid on chain, spot-checked.
    flat = " ".join(out.split())  # the terminal is 80 columns: long lines wrap
    for number, prompt in enumerate(TINY_PROMPTS[:2], start=1):
        assert f"Prompt {number}: {prompt}" in out, out
    assert flat.count("3 receipts co-signed") == 2, out
    assert "6 receipts paid on chain" in flat and "spot checks: 6/6 passed" in flat, out
    assert "billing problem" not in out and "spot check not done" not in out, out
    # The table fits 80 columns, every number whole: each provider served its blocks, is staked, was checked, and
    # was paid on chain exactly what the receipts it co-signed with the client charge; the client paid the sum.
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "Who served what, who was paid what" in line)
    last = next(i for i, line in enumerate(lines) if "signed verdicts" in line)
    assert max(len(line) for line in lines[first : last + 1]) <= TABLE_WIDTH, "\n".join(lines[first : last + 1])
    rows = re.findall(
        r"^(\S{6})\s+(\d+:\d+)\s+(\S+…)\s+(\d+)\s+(\d+)\s+(\d+/\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", out, re.M
    )
    assert [r[1] for r in rows] == ["0:3", "3:5", "5:8"], out
    for _peer, _blocks, _account, receipts, tokens, checks, stake, billed, paid in rows:
        assert int(receipts) == 2 and int(tokens) > 0 and checks == "2/2", out  # two queries, one receipt per hop
        assert Decimal(stake) == Decimal("10"), out  # bonded through `dllm peer join --stake`
        assert Decimal(paid) == Decimal(billed) > 0, out
    paid = [Decimal(r[8].replace(",", "")) for r in rows]
    # Same token counts on every hop, so pay follows blocks x rate: 3x1.0 : 2x1.5 : 3x2.0.
    assert abs(paid[0] - paid[1]) <= Decimal("0.000002") and abs(paid[2] - 2 * paid[0]) <= Decimal("0.000004")
    client = re.search(r"^client\s+\S+…\s+6\s+[\d.]+\s+-([\d.]+)\s*$", out, re.M)
    assert client and abs(Decimal(client.group(1)) - sum(paid)) <= Decimal("0.000003"), out  # (6-decimal display)


def test_the_table_fits_80_columns_with_every_number_whole():
    """Wide amounts (a real model's bills) still fit: only the account column gives way."""
    from io import StringIO

    from rich.console import Console

    from chain.units import PLANCK_PER_TOKEN
    from dllm.demo import DemoReport, ProviderRow, roc, summary_table

    big = 123 * PLANCK_PER_TOKEN + 456_789_012_345  # 123.456789012345 ROC
    report = DemoReport(client="5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY", settled_receipts=90)
    for i, blocks in enumerate(("0:10", "10:20", "20:30")):
        account = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
        report.providers.append(
            ProviderRow(
                f"12D3KooWpeer{i}",
                blocks,
                account,
                receipts=30,
                tokens=12_345,
                billed=big,
                stake=10 * PLANCK_PER_TOKEN,
                paid=big,
                checks_passed=30,
                checks=30,
            )
        )
    report.client_spent = 3 * big
    console = Console(file=StringIO(), width=TABLE_WIDTH, color_system=None)
    console.print(summary_table(report))
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= TABLE_WIDTH, text
    assert text.count(roc(big)) == 6 and "-" + roc(3 * big) in text and "12345" in text and "30/30" in text, text
    assert all(blocks in text for blocks in ("0:10", "10:20", "20:30")), text

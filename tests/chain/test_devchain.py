"""The dev chain itself: real runtime, funded dev accounts, persistence, the CLI, clean stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from chain.account_derivation import BURN_ACCOUNT
from chain.devchain.dev_accounts import DEV_ACCOUNT_NAMES, dev_keypair
from chain.devchain.genesis import DEV_ENDOWMENT
from chain.devchain.launcher import DevChain, DevChainConfig, dev_chain_available
from chain.errors import DevChainStartError
from chain.ledger import ComputeLedger
from tests.chain.ledger_helpers import UNIT
from tests.conftest import free_tcp_port

pytestmark = [pytest.mark.timeout(300)]


def test_genesis_runs_the_asset_hub_runtime_with_funded_dev_accounts(dev_chain):
    with ComputeLedger(dev_chain.url) as ledger:
        version = ledger.substrate.runtime_version
        assert ledger.substrate.rpc_request("state_getRuntimeVersion", [])["result"]["specName"] == "statemine"
        assert version == 900
        for name in DEV_ACCOUNT_NAMES:
            assert ledger.balance(dev_keypair(name).ss58_address) > DEV_ENDOWMENT // 2
        assert ledger.balance(ledger.address(BURN_ACCOUNT)) > 0
        pallets = {p.name for p in ledger.substrate.metadata.pallets}
        assert {"System", "Balances", "Assets", "Utility", "Multisig", "Proxy"} <= pallets


def test_state_survives_a_restart(tmp_path):
    if dev_chain_available():
        pytest.skip(dev_chain_available())
    port = free_tcp_port()
    config = DevChainConfig(port=port, state_dir=tmp_path / "state")
    receiver = dev_keypair("Eve").ss58_address

    async def first_run() -> int:
        async with DevChain(config) as chain:
            with ComputeLedger(chain.url) as ledger:
                call = ledger.substrate.compose_call(
                    "Balances", "transfer_keep_alive", {"dest": receiver, "value": 5 * UNIT}
                )
                ledger.submitter.submit(dev_keypair("Bob"), call)
                return ledger.balance(receiver)

    async def second_run() -> tuple[int, int]:
        async with DevChain(DevChainConfig(port=port, state_dir=tmp_path / "state")) as chain:
            with ComputeLedger(chain.url) as ledger:
                return ledger.balance(receiver), ledger.substrate.get_block_number(None)

    balance = asyncio.run(first_run())
    assert balance == DEV_ENDOWMENT + 5 * UNIT
    after, head = asyncio.run(second_run())
    assert after == balance and head >= 2


def test_busy_port_gives_a_clear_error(dev_chain):
    port = int(dev_chain.url.rsplit(":", 1)[1])
    with pytest.raises(DevChainStartError, match="already in use"):
        asyncio.run(DevChain(DevChainConfig(port=port, state_dir=None)).start())


def test_cli_starts_prints_endpoint_and_accounts_and_stops_on_ctrl_c(tmp_path):
    if dev_chain_available():
        pytest.skip(dev_chain_available())
    port = free_tcp_port()
    dllm = Path(sys.executable).with_name("dllm")
    proc = subprocess.Popen(
        [str(dllm), "chain", "dev", "--port", str(port), "--state-dir", str(tmp_path / "cli-state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    output = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(output)
        assert f"ws://127.0.0.1:{port}" in text, text
        for name in DEV_ACCOUNT_NAMES:
            assert dev_keypair(name).ss58_address in text
        chopsticks = psutil.Process(proc.pid).children(recursive=True)
        assert chopsticks, "no chopsticks process under `dllm chain dev`"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # not communicate(): it would skip what readline() has buffered
        rest = proc.stdout.read()
        assert proc.returncode == 0, text + rest
        assert "stopped" in rest
        _, leftovers = psutil.wait_procs(chopsticks, timeout=10)
        assert not leftovers, f"`dllm chain dev` left processes behind: {leftovers}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "cli-state" / "chain.sqlite").exists()

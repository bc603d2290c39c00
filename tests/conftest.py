"""Shared fixtures: the embedded tiny model, a running local swarm, a running dev chain and a ledger client."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from dllm import default_model_path
from dllm.processes import LocalSwarm

logging.getLogger("hivemind").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The embedded 8-layer Llama (dllm-tiny-llama), loaded through the same from-disk path as any model."""
    return default_model_path()


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """SmolLM2-135M-Instruct as scripts/setup converted it (`--model smollm2`). If it is missing the test fails,
    naming scripts/setup, unless DLLM_SKIP_REAL_MODEL is set (then it skips)."""
    import os

    from dllm.model_choice import ModelNotInstalledError, installed_smollm2

    try:
        return installed_smollm2()
    except ModelNotInstalledError as error:
        if os.environ.get("DLLM_SKIP_REAL_MODEL"):
            pytest.skip(str(error))
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def swarm(tiny_model_path, tmp_path_factory):
    """A bootstrap DHT node and 2 peers serving blocks 0:4 and 4:8 on 127.0.0.1, shared by a test session.

    Tests must not kill these peers; tests that inject faults start their own LocalSwarm.
    """
    local = LocalSwarm(str(tiny_model_path), workdir=tmp_path_factory.mktemp("swarm"))
    try:
        local.start_bootstrap()
        first = local.start_peer("0:4", wait=False)
        second = local.start_peer("4:8", wait=False)
        local.wait_ready(first)
        local.wait_ready(second)
        local.model = first.info["model"]
        local.model_path = tiny_model_path
        yield local
    finally:
        local.stop()


@pytest.fixture
def local_swarm(tiny_model_path, tmp_path):
    """An empty LocalSwarm (bootstrap started) for tests that start, kill and restart their own peers."""
    local = LocalSwarm(str(tiny_model_path), workdir=tmp_path)
    try:
        local.start_bootstrap()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def distributed_model(swarm):
    """A DistributedModel client of the shared swarm."""
    from swarm.client import DistributedModel

    model = DistributedModel.from_pretrained(str(swarm.model_path), swarm.initial_peers)
    yield model
    model.close()


# ------------------------------------------------------------------------------------------- dev chain
class RunningDevChain:
    """A dev chain started for the test session: `.url` (ws), `.http_url`, `.new_blocks(n)`."""

    def __init__(self, chain, loop) -> None:
        self.chain = chain
        self._loop = loop
        self.url = chain.url
        self.http_url = chain.http_url

    def new_blocks(self, count: int = 1) -> None:
        self._loop.run_until_complete(self.chain.new_blocks(count))


def free_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_dev_chain() -> Iterator[RunningDevChain]:
    """A dev chain (chopsticks running the real Rococo Asset Hub runtime) on a free 127.0.0.1 port, in memory."""
    import asyncio

    from chain.devchain.launcher import DevChain, DevChainConfig, dev_chain_available

    missing = dev_chain_available()
    if missing:
        pytest.skip(f"dev chain unavailable: {missing}")
    loop = asyncio.new_event_loop()
    chain = DevChain(DevChainConfig(port=free_tcp_port(), state_dir=None))
    try:
        loop.run_until_complete(chain.start())
        yield RunningDevChain(chain, loop)
    finally:
        loop.run_until_complete(chain.stop())
        loop.close()


@pytest.fixture(scope="session")
def dev_chain():
    """One dev chain for the test session. State is in memory: tests share it, so each test uses its own
    accounts or measures deltas."""
    with running_dev_chain() as chain:
        yield chain


@pytest.fixture
def own_dev_chain():
    """A dev chain of this test alone, for tests that read every record on chain (lineage, data export)."""
    with running_dev_chain() as chain:
        yield chain


@pytest.fixture(scope="module")
def ledger(dev_chain):
    """One ledger client on the session's dev chain, per test module (chain and economy tests)."""
    from chain.ledger import ComputeLedger

    client = ComputeLedger(dev_chain.url)
    yield client
    client.close()

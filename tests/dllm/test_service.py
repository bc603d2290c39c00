"""`serve_until_signal` in a real subprocess: a signal (after or during start-up) ends the service through
its stop(), an ending of the service's own is an error, a child process a service forgot is killed;
and every long-running process of the project is a `Service`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from dllm.service import Service

pytestmark = pytest.mark.timeout(60)

# A service owning one child process (`sleep`); MODE says how it behaves.
SERVICE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from dllm.service import serve_until_signal

    MODE = sys.argv[1]

    class SleeperService:
        def __init__(self):
            self.child = None
            self.stops = 0

        async def start(self):
            self.child = await asyncio.create_subprocess_exec("sleep", "600")
            print(f"child {self.child.pid}", flush=True)

        async def wait_ready(self):
            if MODE == "slow_start":
                await asyncio.sleep(600)

        async def wait_stopped(self):
            if MODE == "ends":
                return
            await asyncio.sleep(600)

        async def stop(self):
            self.stops += 1
            if MODE != "leaks" and self.child.returncode is None:
                self.child.terminate()
                await self.child.wait()
            print(f"stopped {self.stops}", flush=True)

    serve_until_signal(SleeperService(), on_ready=lambda: print("ready", flush=True))
    """
)


def run_service(mode: str, wait_for: str, sig: int | None = signal.SIGTERM) -> tuple[int, str, int]:
    """Runs the script until `wait_for` is printed, sends `sig`; returns (exit code, output, child pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVICE_SCRIPT, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(wait_for):
                break
        if sig is not None:
            time.sleep(0.2)  # handlers go in right after start(): let the loop get there
            proc.send_signal(sig)
        # Not communicate(): with a timeout it reads the raw pipe and loses what the loop above had buffered
        # (a loaded test process can read "ready" and "stopped 1" in one chunk). The output fits the pipe.
        proc.wait(timeout=30)
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines) + rest
    child = int(next(line.split()[1] for line in output.splitlines() if line.startswith("child ")))
    return proc.returncode, output, child


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_serving_service_cleanly(sig):
    code, output, child = run_service("serves", "ready", sig)
    assert code == 0, output
    assert "stopped 1" in output and "stopped 2" not in output, output
    assert gone(child)


def test_a_signal_during_start_up_still_runs_stop():
    code, output, child = run_service("slow_start", "child")
    assert code == 0, output
    assert "ready" not in output and "stopped 1" in output, output
    assert gone(child)


def test_a_service_that_ends_on_its_own_is_an_error_and_still_stopped():
    code, output, child = run_service("ends", "ready", sig=None)
    assert code != 0 and "ServiceEndedError" in output, output
    assert "stopped 1" in output
    assert gone(child)


def test_a_child_the_service_forgot_is_terminated_with_a_warning():
    code, output, child = run_service("leaks", "ready")
    assert code == 0, output
    assert f"left process {child} (sleep) running" in output, output
    assert gone(child)


def test_every_long_running_process_is_a_service():
    from chain.devchain.launcher import DevChain
    from dllm.bootstrap import BootstrapConfig, BootstrapService
    from dllm.council import CouncilConfig, CouncilService
    from dllm.verifier import VerifierConfig, VerifierService
    from economy.gossip import GossipBus
    from economy.signing import load_keypair
    from peer.config import PeerConfig
    from peer.server import PeerService
    from swarm.api import ApiService
    from swarm.dashboard import DashboardConfig, DashboardService

    services = [
        PeerService(PeerConfig(model="m", initial_peers=[])),
        VerifierService(VerifierConfig(model="m", key="//Alice", initial_peers=[])),
        CouncilService(CouncilConfig(model="m", key="//Bob", initial_peers=[], chain_url="ws://127.0.0.1:1")),
        BootstrapService(BootstrapConfig()),
        ApiService(Path("m"), []),
        DashboardService(DashboardConfig(initial_peers=[])),
        DevChain(),
        GossipBus(load_keypair("//Alice")),
    ]
    for service in services:
        assert isinstance(service, Service), type(service).__name__

"""Running a whole local swarm as real processes: a bootstrap node and peers, cleanly stopped.

Used by the demo, the benchmarks and the tests. Every process gets its own process group, so
stopping it also stops the hivemind DHT daemon process and p2pd it forked; nothing is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from chain.errors import UnavailableError
from dllm.service import DEFAULT_GRACE_S

logger = logging.getLogger(__name__)

_READY = re.compile(r"DLLM peer ready: peer_id=(\S+) model=(\S+) blocks=(\d+):(\d+) maddrs=(.*)")
_VERIFIER_READY = re.compile(r"DLLM verifier ready: account=(\S+) peer_id=(\S+) role=(\S+) gossip=(.*)")
_COUNCIL_READY = re.compile(r"DLLM council member ready: account=(\S+) peer_id=(\S+) gossip=(.*)")


class ProcessStartError(UnavailableError, RuntimeError):
    """A swarm process exited or did not become ready in time; carries its log tail."""


def _dllm_command() -> list[str]:
    return [sys.executable, "-m", "dllm.cli"]


@dataclass
class ManagedProcess:
    """A child process with its output captured to a log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    info: dict = field(default_factory=dict)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Sends `sig` to the whole process group (the peer and its DHT daemon and p2pd), as a machine crash would."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.killpg(os.getpgid(self.popen.pid), sig)

    def stop(self, timeout: float = DEFAULT_GRACE_S + 5.0) -> None:
        """SIGTERM (SIGCONT first if stopped), then SIGKILL of the whole process group.

        The default waits out the process's own bounded stop (its service's grace period): killing it sooner
        leaves the sockets of a clean shutdown behind on a loaded machine.
        """
        try:
            pgid = os.getpgid(self.popen.pid)
        except ProcessLookupError:
            pgid = self.popen.pid
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError):  # the group is gone already
                os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed below
            self.popen.wait(timeout)
        # The DHT child and p2pd may still be removing their sockets after the main process exited: a kill now
        # would leave those files behind, so the group gets the rest of the grace period (at least a few seconds).
        if not _wait_group_gone(pgid, max(deadline - time.monotonic(), _GROUP_EXIT_S)):
            # Only a group still running is killed: once it is gone, its number may name a new process's group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)  # whatever is left of the group: DHT children, p2pd
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            logger.error("process %s (pid %d) did not exit", self.name, self.popen.pid)


_GROUP_EXIT_S = 5.0


def _group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs; zombies do not count (init reaps them on its own time)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # exited while listing
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Waits until no process of group `pgid` runs (returns True), or `timeout` passes (returns False)."""
    deadline = time.monotonic() + timeout
    while _group_running(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class LocalSwarm:
    """A bootstrap node and any number of peers for one model, all on 127.0.0.1."""

    def __init__(self, model: str, workdir: Path | None = None, env: dict | None = None):
        self.model = model
        self._owns_workdir = workdir is None  # a folder it made for the logs is removed by stop()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dllm-swarm-"))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.processes: list[ManagedProcess] = []
        self.initial_peers: list[str] = []
        self._counter = 0

    def _spawn(self, name: str, args: list[str]) -> ManagedProcess:
        self._counter += 1
        self.workdir.mkdir(parents=True, exist_ok=True)  # stop() removes a folder it made
        log_path = self.workdir / f"{self._counter:02d}-{name}.log"
        with open(log_path, "w") as log:  # the child holds its own descriptor
            popen = subprocess.Popen(
                _dllm_command() + args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                cwd=self.workdir,
            )
        proc = ManagedProcess(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def _wait_for(self, proc: ManagedProcess, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(proc.log_path.read_text(errors="replace"))
            if match:
                return match
            if not proc.alive:
                raise ProcessStartError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}")
            time.sleep(0.05)
        raise ProcessStartError(f"{proc.name} was not ready after {timeout:.0f} s:\n{proc.log_tail()}")

    def start_bootstrap(self, timeout: float = 30.0) -> ManagedProcess:
        proc = self._spawn("bootstrap", ["swarm", "bootstrap", "--port", "0"])
        match = self._wait_for(proc, re.compile(r"INITIAL_PEER (\S+)"), timeout)
        self.initial_peers = [match.group(1)]
        proc.info["maddr"] = match.group(1)
        return proc

    def start_peer(
        self,
        blocks: str | None = "auto",
        *extra: str,
        name: str | None = None,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> ManagedProcess:
        """Starts `dllm peer join` on this swarm; with `wait`, returns once it serves."""
        if not self.initial_peers:
            raise ProcessStartError("start the bootstrap node first")
        args = ["peer", "join", "--model", self.model, "--initial-peers", *self.initial_peers]
        if blocks:
            args += ["--blocks", blocks]
        name = name or f"peer-{blocks or 'auto'}".replace(":", "-")
        if "--data-dir" not in extra:  # the feedback each peer publishes stays in the swarm's workdir
            args += ["--data-dir", str(self.workdir / f"data-{name}")]
        proc = self._spawn(name, args + list(extra))
        proc.info["started_at"] = time.monotonic()
        if wait:
            self.wait_ready(proc, timeout)
        return proc

    def start_verifier(
        self, chain_key: str, *extra: str, name: str | None = None, wait: bool = True, timeout: float = 120.0
    ) -> ManagedProcess:
        """Starts `dllm verify` (the verifier process) signing with `chain_key`; with `wait`, returns once it serves
        (`.info` then has account, peer_id, role, gossip)."""
        if not self.initial_peers:
            raise ProcessStartError("start the bootstrap node first")
        args = ["verify", "--model", self.model, "--initial-peers", *self.initial_peers, "--chain-key", chain_key]
        name = name or f"verifier{len(self.processes)}"
        if "--evidence-db" not in extra:  # each verifier of this swarm keeps its evidence in the swarm's workdir
            args += ["--evidence-db", str(self.workdir / f"evidence-{name}.sqlite3")]
        proc = self._spawn(name, args + list(extra))
        if wait:
            self.wait_verifier_ready(proc, timeout)
        return proc

    def start_council_member(
        self, chain_key: str, chain_url: str, *extra: str, name: str | None = None, wait: bool = True
    ) -> ManagedProcess:
        """Starts `dllm council` (one council member, holding only `chain_key`); with `wait`, returns once it
        serves (`.info` then has account, peer_id, gossip)."""
        if not self.initial_peers:
            raise ProcessStartError("start the bootstrap node first")
        name = name or f"council{len(self.processes)}"
        args = ["council", "--model", self.model, "--initial-peers", *self.initial_peers]
        args += ["--chain-key", chain_key, "--chain-url", chain_url]
        if "--evidence-db" not in extra:
            args += ["--evidence-db", str(self.workdir / f"council-{name}.sqlite3")]
        proc = self._spawn(name, args + list(extra))
        if wait:
            self.wait_council_ready(proc)
        return proc

    def wait_council_ready(self, proc: ManagedProcess, timeout: float = 120.0) -> ManagedProcess:
        match = self._wait_for(proc, _COUNCIL_READY, timeout)
        proc.info.update(account=match.group(1), peer_id=match.group(2), gossip=match.group(3).split())
        return proc

    def wait_verifier_ready(self, proc: ManagedProcess, timeout: float = 120.0) -> ManagedProcess:
        match = self._wait_for(proc, _VERIFIER_READY, timeout)
        proc.info.update(
            account=match.group(1), peer_id=match.group(2), role=match.group(3), gossip=match.group(4).split()
        )
        return proc

    def wait_ready(self, proc: ManagedProcess, timeout: float = 60.0) -> ManagedProcess:
        match = self._wait_for(proc, _READY, timeout)
        proc.info.update(
            peer_id=match.group(1),
            model=match.group(2),
            start=int(match.group(3)),
            end=int(match.group(4)),
            maddrs=match.group(5).split(),
            ready_s=time.monotonic() - proc.info.get("started_at", time.monotonic()),
        )
        return proc

    def peers(self) -> list[ManagedProcess]:
        return [p for p in self.processes if "peer_id" in p.info]

    def stop(self) -> None:
        """Stops every process concurrently (each stop may wait for a graceful exit)."""
        threads = [threading.Thread(target=p.stop) for p in self.processes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.processes.clear()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

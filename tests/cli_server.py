"""Running a long-lived `dllm` command (api, dashboard, bootstrap, peer, verifier) as a real process for a test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil


@contextmanager
def running_dllm(args: list[str], ready: re.Pattern, workdir: Path, timeout: float = 90.0) -> Iterator[re.Match]:
    """Starts `dllm ARGS`, yields the match of `ready` in its output, then stops it with SIGTERM and
    checks that it exited cleanly and left none of its child processes and hivemind sockets behind."""
    name = args[0]
    log_path = workdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dllm.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    children: list[psutil.Process] = []
    try:
        match = None
        deadline = time.monotonic() + timeout
        while match is None and time.monotonic() < deadline:
            assert proc.poll() is None, f"dllm {name} exited early:\n{log_path.read_text()}"
            match = ready.search(log_path.read_text())
            time.sleep(0.1)
        assert match, f"dllm {name} did not start:\n{log_path.read_text()}"
        children = psutil.Process(proc.pid).children(recursive=True)
        sockets = hivemind_sockets(proc.pid, children)
        yield match
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, log_path.read_text()
    # torch's shared-memory manager lingers a moment after its last client; give helpers time to exit.
    _, leftovers = psutil.wait_procs(children, timeout=15)
    assert not leftovers, f"dllm {name} left processes behind: {leftovers}"
    assert not [path for path in sockets if os.path.exists(path)], f"dllm {name} left sockets in /tmp: {sockets}"


def hivemind_sockets(pid: int, children: list[psutil.Process]) -> set[str]:
    """The unix socket files of a process's hivemind P2P: its p2pd daemons' and its own replicas' (in /tmp)."""
    paths: set[str] = set()
    for process in [psutil.Process(pid), *children]:
        try:
            paths.update(arg[len("-listen=/unix") :] for arg in process.cmdline() if arg.startswith("-listen=/unix/"))
            paths.update(
                c.laddr
                for c in process.net_connections(kind="unix")
                if isinstance(c.laddr, str) and "hivemind" in c.laddr
            )
        except psutil.Error:
            continue
    return paths

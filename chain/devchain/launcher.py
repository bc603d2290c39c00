"""Start and stop the local dev chain (chopsticks running the Rococo Asset Hub runtime)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chain.config_bounds import bounded, check_bounds
from chain.devchain.genesis import BUILD_DIR, NODE_MODULES, ensure_dev_spec
from chain.errors import DevChainStartError, DevChainUnavailableError

logger = logging.getLogger(__name__)

CHOPSTICKS_BIN = NODE_MODULES / "@acala-network" / "chopsticks" / "chopsticks.cjs"
DEFAULT_STATE_DIR = Path(".dllm") / "devchain"


def _die_with_parent() -> None:
    """Runs in the child before exec: if the Python parent dies (even SIGKILL), Linux sends
    SIGTERM to chopsticks, so a crashed test run never leaves a chain behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like Node's listener: a port in TIME_WAIT after a stop is free; a live listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def dev_chain_available() -> str | None:
    """None when the dev chain can run here, else the reason it cannot."""
    if shutil.which("node") is None:
        return "Node.js is not installed"
    if not CHOPSTICKS_BIN.exists():
        return f"chopsticks is not installed in {NODE_MODULES} (run scripts/setup)"
    return None


@dataclass
class DevChainConfig:
    """Everything one dev chain process needs."""

    port: int = bounded(9944, ge=1, le=65535)
    host: str = "127.0.0.1"
    # Where chopsticks keeps its SQLite database; None keeps state in memory only.
    state_dir: Path | None = DEFAULT_STATE_DIR
    build_dir: Path = BUILD_DIR
    start_timeout_s: float = 120.0
    build_block_mode: str = "Instant"
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_bounds(self)


class DevChain:
    """One chopsticks process serving the dev chain on 127.0.0.1; a service in the sense of dllm/service.py.

    Usage: `chain = DevChain(DevChainConfig(port=9944)); await chain.start(); ...; await chain.stop()`
    or `async with DevChain(...) as chain:`. stop() is idempotent and bounded: it saves the head
    (at most 15 s), asks chopsticks to exit (SIGINT to its process group), kills it after 15 s more.
    """

    def __init__(self, config: DevChainConfig | None = None) -> None:
        self.config = config or DevChainConfig()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """WebSocket endpoint (what substrate-interface and @polkadot/api connect to)."""
        return f"ws://{self.config.host}:{self.config.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def log_path(self) -> Path:
        base = self.config.state_dir or self.config.build_dir
        return base / f"chopsticks-{self.config.port}.log"

    def _command(self, spec: Path) -> list[str]:
        cfg = self.config
        cmd = [
            "node",
            str(CHOPSTICKS_BIN),
            f"--genesis={spec}",
            "--host",
            cfg.host,
            "--port",
            str(cfg.port),
            "--build-block-mode",
            cfg.build_block_mode,
        ]
        if cfg.state_dir is not None:
            db = cfg.state_dir / "chain.sqlite"
            # Resume only when a previous run left blocks behind; a fresh db starts at genesis.
            cmd += ["--db", str(db)]
            if db.exists():
                # The CLI parses `--resume true` as a string; only a config file yields a boolean.
                resume = cfg.state_dir / "resume.yml"
                resume.write_text("resume: true\n")
                cmd += ["--config", str(resume)]
        return cmd + list(cfg.extra_args)

    async def start(self) -> None:
        """Build the spec if needed, spawn chopsticks, and wait until its RPC answers."""
        reason = dev_chain_available()
        if reason:
            raise DevChainUnavailableError(reason)
        if self._process is not None:
            raise DevChainStartError("this dev chain is already running")
        if not _port_free(self.config.host, self.config.port):
            raise DevChainStartError(
                f"port {self.config.port} on {self.config.host} is already in use (another dev chain?); "
                "stop it or pick another --port"
            )
        spec = await asyncio.to_thread(ensure_dev_spec, self.config.build_dir)
        if self.config.state_dir is not None:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self._command(spec)
        logger.info("starting dev chain: %s", " ".join(cmd))
        with open(self.log_path, "ab") as log_file:  # the node writes through its own descriptor
            self._process = await asyncio.create_subprocess_exec(
                *cmd,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env={**os.environ, "LOG_LEVEL": os.environ.get("CHOPSTICKS_LOG_LEVEL", "info")},
            )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        logger.info("dev chain ready at %s", self.url)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        payload = {"jsonrpc": "2.0", "id": 1, "method": "chain_getHeader", "params": []}
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.returncode is not None:
                    raise DevChainStartError(
                        f"chopsticks exited with code {self._process.returncode}; see {self.log_path}:\n"
                        + self._log_tail()
                    )
                with contextlib.suppress(httpx.HTTPError):
                    reply = await http.post(self.http_url, json=payload)
                    if reply.status_code == 200 and "result" in reply.json():
                        return
                await asyncio.sleep(0.25)
        raise DevChainStartError(
            f"dev chain did not answer on {self.http_url} within {self.config.start_timeout_s:.0f} s; "
            f"see {self.log_path}:\n" + self._log_tail()
        )

    def _log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def rpc(self, method: str, params: list[Any] | None = None) -> object:
        """One JSON-RPC call over HTTP (e.g. `dev_newBlock`)."""
        payload = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}
        async with httpx.AsyncClient(timeout=60.0) as http:
            reply = (await http.post(self.http_url, json=payload)).json()
        if "error" in reply:
            raise DevChainStartError(f"{method} failed: {reply['error']}")
        return reply.get("result")

    async def new_blocks(self, count: int = 1) -> None:
        """Build `count` empty blocks (advances time-based delays such as the unbond delay)."""
        await self.rpc("dev_newBlock", [{"count": count}])

    async def wait_ready(self) -> None:
        """start() returns once the RPC answers: this only checks that chopsticks still runs."""
        if self._process is None or self._process.returncode is not None:
            raise DevChainStartError("the dev chain is not running")

    async def wait_stopped(self) -> None:
        """Returns once chopsticks has exited (after stop(), or on its own)."""
        process = self._process
        if process is not None:
            await process.wait()

    async def wait_exit(self) -> int:
        """Wait until the chopsticks process exits on its own; returns its exit code."""
        if self._process is None:
            raise DevChainStartError("the dev chain is not running")
        return await self._process.wait()

    async def _wait_head_saved(self, timeout_s: float = 15.0) -> None:
        """Chopsticks writes blocks to its database asynchronously and a stop can lose the newest
        ones: wait until the current head is stored (the database is what a restart resumes from)."""
        if self.config.state_dir is None:
            return
        db = self.config.state_dir / "chain.sqlite"
        try:
            head = await self.rpc("chain_getBlockHash")
        except (httpx.HTTPError, DevChainStartError) as exc:
            logger.warning("could not read the head before stopping: %s", exc)
            return

        def stored() -> bool:
            try:
                with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
                    return conn.execute("SELECT 1 FROM block WHERE hash = ?", (head,)).fetchone() is not None
            except sqlite3.Error:
                return False

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(stored):
                return
            await asyncio.sleep(0.2)
        logger.warning("head block %s not in %s after %.0f s; the newest state may be lost", head, db, timeout_s)

    async def _stop_building(self) -> None:
        """Stops block production, so no block is built between saving the head and exiting.

        Without this, a block built (Instant mode: on every submission) after the head was saved was
        lost by the restart while clients had seen it included: the chain rolled back settlements."""
        if self.config.state_dir is None:
            return
        try:
            await self.rpc("dev_setBlockBuildMode", ["Manual"])
        except (httpx.HTTPError, DevChainStartError) as exc:
            logger.warning("could not stop block production before stopping: %s", exc)

    async def stop(self) -> None:
        """Stop chopsticks after its database holds the head (SIGINT, then SIGKILL if it hangs)."""
        if self._process is not None and self._process.returncode is None:
            await self._stop_building()
            await self._wait_head_saved()
        proc, self._process = self._process, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), timeout=15)
            except TimeoutError:
                logger.warning("dev chain did not stop on SIGINT; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()

    async def __aenter__(self) -> DevChain:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

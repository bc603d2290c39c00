"""The chaos harness: a local swarm of real processes, a fleet of concurrent clients, fault injection,
and the bookkeeping that checks every request's fate.

Every request ends in exactly one outcome: `correct` (greedy tokens equal to a reference run made
before any fault), `clear_error` (one of the documented, typed client errors with a message),
or a violation: `wrong` (completed with different tokens), `unclear_error` (any other exception) or
`hung` (no answer within the per-request deadline). Scenarios assert there are no violations.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

from dllm.processes import LocalSwarm, ManagedProcess
from swarm.client import ClientConfig, SwarmClient, TokenStream
from swarm.dht import BootstrapError
from swarm.protocol import ProtocolError, RemotePeerError
from swarm.routing import NoRouteError
from swarm.sampling import GenerationParams
from swarm.session import SessionFailedError

logger = logging.getLogger(__name__)

# Errors a client may legitimately end a request with: each names what failed and what to do.
CLEAR_ERRORS = (SessionFailedError, NoRouteError, RemotePeerError, BootstrapError, ProtocolError)

Status = Literal["correct", "clear_error", "wrong", "unclear_error", "hung"]
VIOLATIONS: tuple[Status, ...] = ("wrong", "unclear_error", "hung")

PROMPTS = ("The module", "def parse(", "Return the", "class Config")


@dataclass
class RequestOutcome:
    """What happened to one client request."""

    client: int
    prompt: str
    status: Status
    seconds: float
    failovers: int = 0
    detail: str = ""


@dataclass
class ScenarioReport:
    """Per-scenario totals, printed as the closing table's row."""

    scenario: str
    outcomes: list[RequestOutcome] = field(default_factory=list)
    lost_receipts: int | None = None  # None: this scenario has no payments
    paid_twice: int | None = None

    @property
    def counts(self) -> Counter:
        return Counter(o.status for o in self.outcomes)

    @property
    def violations(self) -> list[RequestOutcome]:
        return [o for o in self.outcomes if o.status in VIOLATIONS]

    def row(self) -> str:
        c = self.counts
        money = lambda v: "-" if v is None else str(v)  # noqa: E731
        return (
            f"| {self.scenario} | {len(self.outcomes)} | {c['correct']} | {c['clear_error']} | "
            f"{sum(c[v] for v in VIOLATIONS)} | {money(self.lost_receipts)} | {money(self.paid_twice)} |"
        )


def report_table(reports: Sequence[ScenarioReport]) -> str:
    header = (
        "| scenario | requests | completed correctly | failed with a clear error | wrong/hung/unclear | "
        "receipts lost | paid twice |\n|---|---|---|---|---|---|---|"
    )
    return "\n".join([header, *(r.row() for r in reports)])


class ChaosSwarm(LocalSwarm):
    """A LocalSwarm whose peers keep a persistent identity and may run through a test-only launcher.

    `launcher` is a module run as `python -m <launcher> <launcher args> <dllm CLI args>`; it patches
    the peer (adds latency, lies, ...) and then runs the real `dllm` entry point.
    """

    def start_peer_with(
        self,
        blocks: str,
        *extra: str,
        name: str,
        launcher: Sequence[str] = (),
        identity: bool = True,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> ManagedProcess:
        args = [
            "peer",
            "join",
            "--model",
            self.model,
            "--initial-peers",
            *self.initial_peers,
            "--blocks",
            blocks,
            *extra,
        ]
        if identity:
            args += ["--identity", str(self.identity_path(name))]
        prefix = [sys.executable, "-m", *launcher] if launcher else [sys.executable, "-m", "dllm.cli"]
        self._counter += 1
        log_path = self.workdir / f"{self._counter:02d}-{name}.log"
        with open(log_path, "w") as log:
            popen = subprocess.Popen(
                prefix + args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        proc = ManagedProcess(
            name,
            popen,
            log_path,
            info={"started_at": time.monotonic(), "blocks": blocks, "extra": list(extra), "launcher": list(launcher)},
        )
        self.processes.append(proc)
        if wait:
            self.wait_ready(proc, timeout)
        return proc

    def identity_path(self, name: str) -> Path:
        return self.workdir / "identities" / f"{name}.key"

    def restart(self, proc: ManagedProcess, wait: bool = True) -> ManagedProcess:
        """Starts `proc` again under the same name, identity and launcher (after it died or was killed)."""
        proc.stop()
        self.processes.remove(proc)
        return self.start_peer_with(
            proc.info["blocks"], *proc.info["extra"], name=proc.name, launcher=proc.info["launcher"], wait=wait
        )


# ------------------------------------------------------------------------------------------ clients
class ClientFleet:
    """`size` independent SwarmClients (each its own DHT node) issuing greedy requests concurrently."""

    def __init__(
        self,
        model_dir: Path,
        initial_peers: Sequence[str],
        size: int,
        config: ClientConfig | None = None,
        configs: Sequence[ClientConfig] | None = None,
    ):
        """`configs` gives each client its own config (e.g. its own paying key); else all share `config`."""
        self.model_dir, self.initial_peers, self.size = model_dir, list(initial_peers), size
        self.config = config or ClientConfig(request_timeout_s=5.0, ban_duration_s=3.0, refresh_interval_s=1.0)
        self.configs = list(configs) if configs is not None else [self.config] * size
        if len(self.configs) != size:
            raise ValueError(f"{len(self.configs)} client configs for a fleet of {size}")
        self.clients: list[SwarmClient] = []
        self.billings: list = []  # every billed session's SessionBilling (its co-signed receipts), in order
        # Each client's current (or last) request: one client issues its requests one after another.
        self.requests: dict[SwarmClient, TokenStream] = {}
        self.reference: dict[str, list[int]] = {}
        self.tokens_done = 0  # across all clients, for timing fault injection mid-session

    async def start(self) -> None:
        self.clients = [SwarmClient(self.model_dir, self.initial_peers, c) for c in self.configs]
        if any(c.billing is not None for c in self.configs):
            # One at a time: substrate-interface connections created concurrently in one process
            # race in scalecodec's type loading ("Decoder class for Compact<u32> not found").
            for client in self.clients:
                await client.start()
        else:
            await asyncio.gather(*(c.start() for c in self.clients))
        self.socket_files = own_hivemind_sockets()  # must all be gone once the fleet is closed

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        self.clients = []
        self.requests = {}

    async def _generate(self, client: SwarmClient, prompt: str, params: GenerationParams) -> list[int]:
        ids = []
        tokens = self.requests[client] = client.generate_tokens(_tokenize(self.model_dir, prompt), params, set())
        try:
            async for token in tokens:
                ids.append(token)
                self.tokens_done += 1
        finally:
            if tokens.billing is not None:  # set when the session began
                self.billings.append(tokens.billing)
        return ids

    async def make_reference(self, params: GenerationParams) -> None:
        """Greedy tokens of every prompt, from a healthy swarm: the oracle for later requests."""
        for prompt in PROMPTS:
            self.reference[prompt] = await self._generate(self.clients[0], prompt, params)

    async def request(self, index: int, prompt: str, params: GenerationParams, deadline: float) -> RequestOutcome:
        client = self.clients[index]
        started = time.perf_counter()
        try:
            ids = await asyncio.wait_for(self._generate(client, prompt, params), deadline)
            status: Status = "correct" if ids == self.reference[prompt] else "wrong"
            detail = "" if status == "correct" else f"got {ids[:8]}..., expected {self.reference[prompt][:8]}..."
        except TimeoutError:
            status, detail = "hung", f"no result after {deadline:.0f} s"
        except CLEAR_ERRORS as e:
            status, detail = ("clear_error", f"{type(e).__name__}: {e}") if str(e) else ("unclear_error", repr(e))
        except Exception as e:  # anything else is a bug the scenario reports
            status, detail = "unclear_error", f"{type(e).__name__}: {e}"
        session = self.requests[client].session if client in self.requests else None
        outcome = RequestOutcome(
            index, prompt, status, time.perf_counter() - started, session.failovers if session else 0, detail
        )
        if status != "correct":
            logger.warning("client %d request %r: %s %s", index, prompt, status, detail)
        return outcome

    async def run(
        self, requests_per_client: int, params: GenerationParams, deadline: float = 60.0
    ) -> list[RequestOutcome]:
        """Every client issues `requests_per_client` requests back to back; all clients run at once."""

        async def one_client(index: int) -> list[RequestOutcome]:
            return [
                await self.request(index, PROMPTS[(index + k) % len(PROMPTS)], params, deadline)
                for k in range(requests_per_client)
            ]

        results = await asyncio.gather(*(one_client(i) for i in range(self.size)))
        return [o for r in results for o in r]

    def peers_in_use(self) -> set[str]:
        """Peer ids on the routes of the clients' current (or last) sessions."""
        sessions = [r.session for r in self.requests.values() if r.session is not None]
        return {h.hop.peer_id for session in sessions for h in session.hops}

    async def wait_tokens(self, count: int, timeout: float = 60.0) -> None:
        """Waits until the fleet has produced `count` more tokens (to inject a fault mid-session)."""
        target, deadline = self.tokens_done + count, time.monotonic() + timeout
        while self.tokens_done < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fleet produced {self.tokens_done} tokens, waited for {target}")
            await asyncio.sleep(0.01)


_TOKENIZERS: dict[Path, object] = {}


def _tokenize(model_dir: Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    if model_dir not in _TOKENIZERS:
        _TOKENIZERS[model_dir] = AutoTokenizer.from_pretrained(model_dir)
    return _TOKENIZERS[model_dir](prompt)["input_ids"]


# --------------------------------------------------------------------------------------- faults
async def pause(proc: ManagedProcess, seconds: float) -> None:
    """Freezes a whole peer (process group) for `seconds`, like a VM stall or a GC pause."""
    proc.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        proc.signal(signal.SIGCONT)


# ---------------------------------------------------------------------------------------- leaks
@dataclass
class ResourceSnapshot:
    """This test process's children and open descriptors, to compare before and after a scenario."""

    children: set[int]
    fds: int
    connections: int
    fd_targets: list[str] = field(default_factory=list, repr=False)  # what the descriptors point at, for the message

    @classmethod
    def take(cls) -> ResourceSnapshot:
        """Children in this process's own group: the clients' DHT daemons and p2pd (swarm processes have their own)."""
        gc.collect()  # descriptors owned by unreachable objects are not leaks: let them close first
        me = psutil.Process()
        group = os.getpgid(0)
        children = set()
        for p in me.children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == group:
                    children.add(p.pid)
            except (psutil.Error, ProcessLookupError):
                continue
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue
        return cls(children, me.num_fds(), len(me.net_connections(kind="all")), sorted(targets))


def unix_sockets_of(procs: Sequence[ManagedProcess]) -> set[str]:
    """Paths of the unix sockets the given process groups are listening on (hivemind's p2pd control sockets)."""
    paths: set[str] = set()
    for proc in procs:
        try:
            pgid = os.getpgid(proc.popen.pid)
        except ProcessLookupError:
            continue
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) != pgid:
                    continue
                paths.update(c.laddr for c in p.net_connections(kind="unix") if isinstance(c.laddr, str) and c.laddr)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
    return paths


def own_hivemind_sockets() -> set[str]:
    """Unix socket files this process listens on for hivemind (the clients' P2P replicas)."""
    return {
        c.laddr
        for c in psutil.Process().net_connections(kind="unix")
        if isinstance(c.laddr, str) and "hivemind" in c.laddr
    }


def alive_in_groups(pgids: Sequence[int]) -> list[int]:
    """Pids still alive in the given process groups."""
    alive = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) in pgids:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)

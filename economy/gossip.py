"""The economy gossip bus for asyncio code: signed price quotes and verdicts over GossipSub.

py-libp2p runs in a child process (economy/gossip_node.py) because it cannot share a process with
hivemind; this class owns that process and talks to it in JSON lines over its stdin/stdout. It is a
service in the sense of dllm/service.py (start, wait_ready, wait_stopped, stop): close() always ends
the node process, politely first, killed after 5 s.
Outgoing payloads are sealed here with the caller's chain key; incoming ones were authenticated
and rate-limited by the node and are re-authenticated here before being handed out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from substrateinterface import Keypair

from chain.errors import UnavailableError
from economy.envelope import EnvelopeError, SignedEnvelope, open_envelope, seal
from economy.gossip_topics import QUOTES_TOPIC, TOPICS, VERDICTS_TOPIC
from economy.price_announcement import PriceAnnouncement
from economy.verification import SignedVerdict

logger = logging.getLogger(__name__)

__all__ = ["GossipBus", "GossipConfig", "GossipError", "GossipMessage", "QUOTES_TOPIC", "VERDICTS_TOPIC"]


class GossipError(UnavailableError, RuntimeError):
    """The gossip process failed to start, refused a command, or died."""


@dataclass(frozen=True)
class GossipConfig:
    """Settings of a gossip bus (and of the node process it starts)."""

    host: str = "127.0.0.1"
    port: int = 0
    rate: float = 5.0
    """Messages per second accepted from each sender account / originating peer."""
    burst: int = 20
    start_timeout_s: float = 30.0
    command_timeout_s: float = 15.0
    max_queued_messages: int = 10_000


@dataclass(frozen=True)
class GossipMessage:
    """An authenticated message received from another peer."""

    topic: str
    sender: str
    """Chain account (ss58) that signed it."""
    from_peer: str
    """libp2p peer id it originated from."""
    envelope: SignedEnvelope


class GossipBus:
    """A running gossip node; use `async with GossipBus(keypair) as bus:`."""

    def __init__(self, keypair: Keypair, config: GossipConfig | None = None):
        self.keypair = keypair
        self.config = config or GossipConfig()
        self.peer_id: str = ""
        self.addrs: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._messages: asyncio.Queue[GossipMessage] = asyncio.Queue(self.config.max_queued_messages)
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> GossipBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Starts the node process and waits until it listens (raises GossipError on failure)."""
        c = self.config
        self._proc = await asyncio.create_subprocess_exec(
            *self._node_argv(),
            "--host",
            c.host,
            "--port",
            str(c.port),
            "--rate",
            str(c.rate),
            "--burst",
            str(c.burst),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=4 * 1024 * 1024,
        )
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_events())
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready), c.start_timeout_s)
        except (TimeoutError, GossipError) as e:
            await self.close()
            raise GossipError(f"gossip node did not start within {c.start_timeout_s} s: {e}") from None
        self.peer_id, self.addrs = ready["peer_id"], list(ready["addrs"])

    def _node_argv(self) -> list[str]:
        """Command that starts the node process (before its --host/--port/--rate/--burst options)."""
        return [sys.executable, "-m", "economy.gossip_node"]

    async def _read_events(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            async for line in self._proc.stdout:
                try:
                    event = json.loads(line)
                    self._dispatch(event)
                except Exception:  # the reader loop: one bad event or failing handler must not deafen the bus
                    logger.exception("bad event from the gossip node: %.200r", line)
        finally:
            error = GossipError("gossip node exited")
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(error)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(error)
            self._pending.clear()

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(event)
        elif kind == "reply":
            request_id = event.get("id")
            fut = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if fut is not None and not fut.done():
                fut.set_result(event)
        elif kind == "message":
            try:
                envelope = open_envelope(base64.b64decode(event["data"]), event["topic"])
            except (EnvelopeError, KeyError, ValueError) as e:
                logger.warning("dropping a message the node passed but that fails here: %s", e)
                return
            message = GossipMessage(event["topic"], envelope.sender, str(event.get("from_peer", "")), envelope)
            try:
                self._messages.put_nowait(message)
            except asyncio.QueueFull:
                logger.warning("gossip inbox full; dropping a message from %s", envelope.sender)

    async def _command(self, op: str, **fields: Any) -> dict[str, Any]:
        if self._proc is None or self._proc.stdin is None or self._proc.returncode is not None:
            raise GossipError("gossip node is not running")
        command_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = fut
        self._proc.stdin.write((json.dumps({"op": op, "id": command_id, **fields}) + "\n").encode())
        await self._proc.stdin.drain()
        try:
            reply = await asyncio.wait_for(fut, self.config.command_timeout_s)
        except TimeoutError:
            self._pending.pop(command_id, None)
            raise GossipError(f"gossip node did not answer {op!r} within {self.config.command_timeout_s} s") from None
        if not reply.get("ok"):
            raise GossipError(f"gossip node refused {op!r}: {reply.get('error')}")
        return reply

    async def connect(self, addr: str) -> None:
        """Dials another gossip node by its multiaddr (…/p2p/<peer id>)."""
        await self._command("connect", addr=addr)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Seals `payload` with this bus's key and publishes it on `topic`."""
        if topic not in TOPICS:
            raise GossipError(f"unknown topic {topic!r}; topics are {', '.join(TOPICS)}")
        envelope = seal(self.keypair, topic, payload)
        await self._command("publish", topic=topic, data=base64.b64encode(envelope.encode()).decode())

    async def publish_quote(self, announcement: PriceAnnouncement) -> None:
        await self.publish(QUOTES_TOPIC, announcement.encode())

    async def publish_verdict(self, verdict: SignedVerdict) -> None:
        await self.publish(VERDICTS_TOPIC, verdict.encode())

    async def next_message(self, timeout: float | None = None) -> GossipMessage:
        """The next received message (raises asyncio.TimeoutError after `timeout` seconds)."""
        return await asyncio.wait_for(self._messages.get(), timeout)

    async def stats(self) -> dict[str, Any]:
        """Node counters (delivered, published, dropped_forged, dropped_rate_limited, ...), peers, mesh."""
        reply = await self._command("stats")
        return {"counters": reply["counters"], "peers": reply["peers"], "mesh": reply["mesh"]}

    async def wait_for_mesh(self, peers: int, timeout: float = 20.0) -> None:
        """Waits until every topic's mesh holds at least `peers` peers (GossipSub grafts each heartbeat)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            mesh = (await self.stats())["mesh"]
            if all(n >= peers for n in mesh.values()):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise GossipError(f"mesh did not reach {peers} peers in {timeout} s: {mesh}")
            await asyncio.sleep(0.2)

    async def wait_ready(self) -> None:
        """start() returns once the node listens: this only checks that it still runs."""
        if self._proc is None or self._proc.returncode is not None:
            raise GossipError("gossip node is not running")

    async def wait_stopped(self) -> None:
        """Returns once the node process has exited (after close(), or if it died)."""
        proc = self._proc
        if proc is not None:
            await proc.wait()

    async def stop(self) -> None:
        """close() under the service name of dllm/service.py (a bus is a service: it owns a process)."""
        await self.close()

    async def close(self) -> None:
        """Stops the node process (asks first, kills if it lingers); idempotent, bounded by 5 s then a kill."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "stop"}\n')
                await proc.stdin.drain()
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

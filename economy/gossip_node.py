"""The gossip process: a py-libp2p GossipSub node for the economy topics, driven over stdin/stdout.

Runs in its own process because py-libp2p cannot be imported beside hivemind. The parent (see
economy/gossip.py) writes one JSON command per line to stdin and reads one JSON event per line
from stdout; logs go to stderr.

Commands: {"op": "connect", "id": N, "addr": MULTIADDR}, {"op": "publish", "id": N, "topic": T,
"data": BASE64}, {"op": "stats", "id": N}, {"op": "stop"}.
Events: {"event": "ready", "peer_id", "addrs"}, {"event": "reply", "id", "ok", ...},
{"event": "message", "topic", "sender", "from_peer", "data"}.

Security: Noise only (py-libp2p would otherwise accept plaintext). Every message must be a
SignedEnvelope for its topic with a valid sr25519 signature and a fresh timestamp; anything else
is dropped, counted, and never forwarded (the topic validator runs before GossipSub relays).
Each sender account and each originating peer has a token bucket, so a flooder is contained.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from economy.envelope import (
    EnvelopeError,
    ForgedEnvelopeError,
    MalformedEnvelopeError,
    StaleEnvelopeError,
    open_envelope,
)
from economy.gossip_topics import TOPICS
from economy.rate_limit import SenderRateLimiter

logger = logging.getLogger("dllm.gossip")

GOSSIPSUB_PROTOCOL = TProtocol("/meshsub/1.0.0")
MAX_COMMAND_BYTES = 1024 * 1024


@dataclass(frozen=True)
class GossipNodeConfig:
    """Settings of one gossip process."""

    host: str = "127.0.0.1"
    port: int = 0
    rate: float = 5.0
    """Messages per second allowed per sender account and per originating peer."""
    burst: int = 20
    heartbeat_s: int = 1


class GossipNode:
    """One libp2p host with GossipSub on the economy topics, plus the stdin/stdout channel."""

    def __init__(self, config: GossipNodeConfig):
        self.config = config
        key_pair = create_new_key_pair()
        noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
        self.host = new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise})
        self.router = GossipSub(
            protocols=[GOSSIPSUB_PROTOCOL],
            degree=6,
            degree_low=2,
            degree_high=12,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=config.heartbeat_s,
            # Our validator already limits each sender; this router limit is per forwarding peer
            # and would otherwise cut honest relays of many senders' messages.
            max_messages_per_topic_per_second=100.0,
        )
        self.pubsub = Pubsub(self.host, self.router)
        self.by_sender = SenderRateLimiter(config.rate, config.burst)
        self.by_peer = SenderRateLimiter(config.rate, config.burst)
        self.counters: Counter[str] = Counter()
        self._write_lock = trio.Lock()
        self._stop = trio.Event()

    # ------------------------------------------------------------------ validation (runs before relay)

    def validate(self, forwarder: ID, msg: object) -> bool:
        """GossipSub topic validator: True only for authentic, fresh, within-rate messages."""
        try:
            topics = list(msg.topicIDs)  # type: ignore[attr-defined]
            if len(topics) != 1 or topics[0] not in TOPICS:
                self.counters["dropped_malformed"] += 1
                return False
            envelope = open_envelope(bytes(msg.data), topics[0])  # type: ignore[attr-defined]
            if ID(msg.from_id) == self.host.get_id():  # type: ignore[attr-defined]
                return True  # our own publications are limited by the parent, not here
            origin = ID(msg.from_id).to_base58()  # type: ignore[attr-defined]
            if not self.by_sender.allow(envelope.sender) or not self.by_peer.allow(origin):
                self.counters["dropped_rate_limited"] += 1
                return False
            return True
        except ForgedEnvelopeError:
            self.counters["dropped_forged"] += 1
        except StaleEnvelopeError:
            self.counters["dropped_stale"] += 1
        except (MalformedEnvelopeError, EnvelopeError):
            self.counters["dropped_malformed"] += 1
        except Exception:  # an exception must never escape into the pubsub machinery
            logger.exception("validator failed; dropping message")
            self.counters["dropped_malformed"] += 1
        return False

    # ------------------------------------------------------------------ channel to the parent

    async def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":")) + "\n"
        async with self._write_lock:
            await trio.to_thread.run_sync(_write_stdout, line)

    async def deliver(self, topic: str, subscription: object) -> None:
        """Forwards validated messages of one topic to the parent."""
        me = self.host.get_id()
        while True:
            msg = await subscription.get()  # type: ignore[attr-defined]
            try:
                if ID(msg.from_id) == me:
                    continue
                envelope = open_envelope(bytes(msg.data), topic)
                self.counters["delivered"] += 1
                await self.emit(
                    {
                        "event": "message",
                        "topic": topic,
                        "sender": envelope.sender,
                        "from_peer": ID(msg.from_id).to_base58(),
                        "data": base64.b64encode(bytes(msg.data)).decode(),
                    }
                )
            except EnvelopeError:
                # validated on arrival, so only a clock edge case gets here
                self.counters["dropped_stale"] += 1
            except Exception:  # a per-topic delivery loop: one failed message must not end the subscription
                logger.exception("failed to deliver a message to the parent")

    async def handle(self, command: dict[str, Any]) -> dict[str, Any] | None:
        """Runs one command; returns the reply (None for stop)."""
        op = command.get("op")
        if op == "connect":
            info = info_from_p2p_addr(multiaddr.Multiaddr(str(command["addr"])))
            await self.host.connect(info)
            return {"ok": True}
        if op == "publish":
            topic = command["topic"]
            if topic not in TOPICS:
                raise ValueError(f"unknown topic {topic!r}; topics are {', '.join(TOPICS)}")
            data = base64.b64decode(command["data"], validate=True)
            open_envelope(data, topic)  # refuse to publish what peers would drop
            await self.pubsub.publish(topic, data)
            self.counters["published"] += 1
            return {"ok": True}
        if op == "stats":
            mesh = {t: len(self.router.mesh.get(t, ())) for t in TOPICS}
            return {"ok": True, "counters": dict(self.counters), "peers": len(self.pubsub.peers), "mesh": mesh}
        if op == "stop":
            self._stop.set()
            return None
        raise ValueError(f"unknown command {op!r}")

    async def read_commands(self) -> None:
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        buffer = b""
        while not self._stop.is_set():
            chunk = await stdin.receive_some(65536)
            if not chunk:  # parent went away: stop rather than linger as an orphan
                self._stop.set()
                return
            buffer += chunk
            if len(buffer) > MAX_COMMAND_BYTES and b"\n" not in buffer:
                logger.error("dropping an oversized command")
                buffer = b""
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                await self.run_command(line)

    async def run_command(self, line: bytes) -> None:
        command_id = None
        try:
            command = json.loads(line)
            if not isinstance(command, dict):
                raise ValueError("a command must be a JSON object")
            command_id = command.get("id")
            reply = await self.handle(command)
        except Exception as e:  # one bad command must not stop the node
            self.counters["bad_commands"] += 1
            await self.emit({"event": "reply", "id": command_id, "ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        if reply is not None:
            await self.emit({"event": "reply", "id": command_id, **reply})

    async def run(self) -> None:
        listen = multiaddr.Multiaddr(f"/ip4/{self.config.host}/tcp/{self.config.port}")
        async with (
            self.host.run(listen_addrs=[listen]),
            trio.open_nursery() as nursery,
            background_trio_service(self.pubsub),
            background_trio_service(self.router),
        ):
            await self.pubsub.wait_until_ready()
            for topic in TOPICS:
                self.pubsub.set_topic_validator(topic, self.validate, False)
                subscription = await self.pubsub.subscribe(topic)
                nursery.start_soon(self.deliver, topic, subscription)
            peer_id = self.host.get_id().to_base58()
            addrs = [f"{a}" if "/p2p/" in str(a) else f"{a}/p2p/{peer_id}" for a in self.host.get_addrs()]
            await self.emit({"event": "ready", "peer_id": peer_id, "addrs": addrs})
            nursery.start_soon(self.read_commands)
            await self._stop.wait()
            nursery.cancel_scope.cancel()


def _write_stdout(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def main(argv: list[str] | None = None, node_class: type[GossipNode] = GossipNode) -> None:
    """Entry point: `python -m economy.gossip_node --port 0 --rate 5 --burst 20`."""
    parser = argparse.ArgumentParser(description="DLLM economy gossip node (JSON lines on stdin/stdout)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--heartbeat", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(asctime)s gossip %(levelname)s %(message)s")
    config = GossipNodeConfig(args.host, args.port, args.rate, args.burst, args.heartbeat)
    trio.run(node_class(config).run)


if __name__ == "__main__":
    main()

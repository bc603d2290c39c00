"""Gossip bus: real py-libp2p processes on 127.0.0.1 exchange signed quotes and verdicts;
forged messages are dropped; a flooder is rate-limited while honest messages still arrive."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import sys
import time
from pathlib import Path

import pytest

from economy.envelope import seal
from economy.gossip import QUOTES_TOPIC, VERDICTS_TOPIC, GossipBus, GossipConfig, GossipError
from economy.price_announcement import PriceAnnouncement
from economy.verification import SignedVerdict, Verdict, validate_verdict

ROGUE = Path(__file__).with_name("rogue_gossip_node.py")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


class RogueBus(GossipBus):
    def _node_argv(self) -> list[str]:
        os.environ.setdefault("PYTHONPATH", str(REPO))
        return [sys.executable, str(ROGUE)]

    async def raw(self, op: str, **fields) -> dict:
        return await self._command(op, **fields)


async def drain(bus: GossipBus, seconds: float) -> list:
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(await bus.next_message(timeout=left))
        except TimeoutError:
            break
    return out


async def test_quotes_and_verdicts_cross_a_three_node_line(keys) -> None:
    a, b, c = GossipBus(keys["alice"]), GossipBus(keys["bob"]), GossipBus(keys["charlie"])
    try:
        await asyncio.gather(a.start(), b.start(), c.start())
        assert all(addr.startswith("/ip4/127.0.0.1/") for addr in a.addrs + b.addrs + c.addrs)
        # a line a - b - c: a's messages reach c only if b relays them
        await b.connect(a.addrs[0])
        await c.connect(b.addrs[0])
        await asyncio.gather(a.wait_for_mesh(1), b.wait_for_mesh(2), c.wait_for_mesh(1))
        ask = PriceAnnouncement(
            "ask", keys["alice"].ss58_address, a.peer_id, "tiny", 0, 4, 800_000, 250, 1000, 0, int(time.time()) + 600
        )
        await a.publish_quote(ask)
        for bus in (b, c):
            message = await bus.next_message(timeout=10)
            assert message.topic == QUOTES_TOPIC and message.sender == keys["alice"].ss58_address
            assert message.from_peer == a.peer_id
            assert PriceAnnouncement.from_envelope(message.envelope) == ask
        verdict = Verdict(
            keys["charlie"].ss58_address,
            keys["dave"].ss58_address,
            "tiny",
            0,
            4,
            bytes(32),
            bytes(32),
            False,
            370_000,
            int(time.time()),
        )
        await c.publish_verdict(SignedVerdict.sign(verdict, keys["charlie"]))
        message = await a.next_message(timeout=10)
        assert message.topic == VERDICTS_TOPIC
        got = validate_verdict(SignedVerdict.decode(message.envelope.payload), {keys["charlie"].ss58_address})
        assert got == verdict
        with pytest.raises(GossipError, match="unknown topic"):
            await a.publish("dllm/other/1", b"x")
        stats = await c.stats()
        assert stats["counters"]["delivered"] == 1 and stats["counters"].get("dropped_forged", 0) == 0
    finally:
        await asyncio.gather(a.close(), b.close(), c.close())


async def test_forged_dropped_and_flooder_contained(keys) -> None:
    config = GossipConfig(rate=5.0, burst=10)
    honest, relay, receiver = (
        GossipBus(keys["alice"], config),
        GossipBus(keys["bob"], config),
        GossipBus(keys["charlie"], config),
    )
    rogue = RogueBus(keys["eve"], config)
    try:
        await asyncio.gather(honest.start(), relay.start(), receiver.start(), rogue.start())
        for bus in (honest, receiver, rogue):
            await bus.connect(relay.addrs[0])
        await asyncio.gather(relay.wait_for_mesh(3), receiver.wait_for_mesh(1), rogue.wait_for_mesh(1))

        # forged: Eve's valid envelope relabelled as Alice's; and plain garbage
        eve = seal(keys["eve"], QUOTES_TOPIC, b"price 0")
        as_alice = dataclasses.replace(eve, sender=keys["alice"].ss58_address)
        for data in (as_alice.encode(), b"not an envelope", seal(keys["eve"], VERDICTS_TOPIC, b"x").encode()):
            await rogue.raw("publish_raw", topic=QUOTES_TOPIC, data=base64.b64encode(data).decode())
        assert await drain(receiver, 2.0) == []
        deadline = time.monotonic() + 10  # a loaded relay may count them after the drain
        while True:
            relay_counters = (await relay.stats())["counters"]
            counted = relay_counters.get("dropped_forged", 0) + relay_counters.get("dropped_malformed", 0)
            if counted >= 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert relay_counters.get("dropped_forged", 0) == 1
        assert relay_counters.get("dropped_malformed", 0) == 2

        # flood: 150 validly signed messages at 75/s, while Alice sends 10 at 5/s
        started = time.monotonic()  # the flooder's bucket refills from here on
        flood = asyncio.create_task(rogue.raw("flood", topic=QUOTES_TOPIC, uri="//Eve", count=150, rate=75))
        await asyncio.sleep(0.2)
        for i in range(10):
            await honest.publish(QUOTES_TOPIC, f"honest {i}".encode())
            await asyncio.sleep(0.2)
        await asyncio.wait_for(flood, 30)
        received = await drain(receiver, 3.0)
        elapsed = time.monotonic() - started
        from_alice = [m for m in received if m.sender == keys["alice"].ss58_address]
        from_eve = [m for m in received if m.sender == keys["eve"].ss58_address]
        assert sorted(m.envelope.payload for m in from_alice) == sorted(f"honest {i}".encode() for i in range(10))
        # the flooder gets at most its burst plus the refill over the flood, far below 150
        assert len(from_eve) <= config.burst + config.rate * elapsed + 5, len(from_eve)
        assert len(from_eve) < 75
        relay_counters = (await relay.stats())["counters"]
        print("flood", len(from_eve), "of 150 from eve reached the receiver; relay counters", relay_counters)
        assert relay_counters.get("dropped_rate_limited", 0) >= 150 - len(from_eve) - 40
    finally:
        await asyncio.gather(honest.close(), relay.close(), receiver.close(), rogue.close())


async def test_stopping_a_bus_ends_its_node_process_and_is_idempotent(keys) -> None:
    import psutil

    bus = GossipBus(keys["alice"])
    await bus.start()
    await bus.wait_ready()
    assert bus._proc is not None
    node = psutil.Process(bus._proc.pid)
    await bus.stop()
    await bus.stop()
    await asyncio.wait_for(bus.wait_stopped(), 5)
    assert not node.is_running() or node.status() == psutil.STATUS_ZOMBIE
    with pytest.raises(GossipError):
        await bus.wait_ready()

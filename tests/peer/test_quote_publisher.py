"""A provider with a chain key gossips its signed price ask on dllm/quotes/1; one without runs no gossip node."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from economy.gossip import QUOTES_TOPIC, GossipBus
from economy.price_announcement import PriceAnnouncement
from economy.signing import load_keypair
from peer.quote_publisher import QuotePublisherConfig
from swarm import protocol
from swarm.dht import start_dht
from swarm.protocol import GOSSIP_KEY

pytestmark = pytest.mark.timeout(180)

RATE = 7_000


def _gossip_children(proc) -> list[str]:
    try:
        children = psutil.Process(proc.popen.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    cmdlines = []
    for child in children:
        try:
            cmdlines.append(" ".join(child.cmdline()))
        except psutil.Error:
            continue
    return [c for c in cmdlines if "economy.gossip_node" in c]


def _announced_gossip_addr(initial_peers: list[str], peer_id: str, timeout: float = 30.0) -> str:
    """The gossip address `peer_id` announced under dllm/gossip, read as any other node would."""
    dht, _ = start_dht(initial_peers, client_mode=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = dht.get(GOSSIP_KEY, latest=True)
            for entry in found.value.values() if found is not None and isinstance(found.value, dict) else ():
                if entry.value.get("peer_id") == peer_id and entry.value.get("addrs"):
                    return entry.value["addrs"][0]
            time.sleep(0.5)
    finally:
        dht.shutdown()
    raise AssertionError(f"peer {peer_id} announced no gossip node under {GOSSIP_KEY} in {timeout} s")


async def _first_ask(addr: str, from_account: str, timeout: float = 30.0) -> tuple[PriceAnnouncement, float]:
    """The first ask `from_account` gossips at `addr`, and when its envelope was signed (s)."""
    async with GossipBus(load_keypair("//Eve")) as bus:
        await bus.connect(addr)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no ask from {from_account} within {timeout} s: {await bus.stats()}")
            message = await bus.next_message(timeout=remaining)
            if message.topic == QUOTES_TOPIC and message.sender == from_account:
                return PriceAnnouncement.from_envelope(message.envelope), message.envelope.timestamp_ms / 1000


async def _gossip_info(initial_peers: list[str], peer_id: str) -> dict:
    """The `gossip` part of a peer's rpc_info."""
    dht, _ = start_dht(initial_peers, client_mode=True)
    p2p = await dht.replicate_p2p()
    try:
        response = await p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), protocol.HANDLER_INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
        )
        return protocol.unpack_metadata(response.metadata)["gossip"]
    finally:
        await p2p.shutdown()
        dht.shutdown()


def test_billing_peers_gossip_signed_asks_and_a_free_peer_does_not_gossip(local_swarm, tmp_path):
    dave = load_keypair("//Dave")
    paid = local_swarm.start_peer(
        "0:8",
        "--chain-key",
        "//Dave",
        "--rate",
        str(RATE),
        "--quote-period",
        "1",
        "--receipts",
        str(tmp_path / "dave.sqlite3"),
        name="paid-peer",
    )
    other = local_swarm.start_peer(
        "0:4",
        "--chain-key",
        "//Charlie",
        "--rate",
        "1",
        "--quote-period",
        "1",
        "--receipts",
        str(tmp_path / "charlie.sqlite3"),
        name="other-paid-peer",
    )
    free = local_swarm.start_peer("4:8", name="free-peer")
    assert len(_gossip_children(paid)) == 1 and _gossip_children(free) == []

    addr = _announced_gossip_addr(local_swarm.initial_peers, paid.info["peer_id"])
    ask, signed_at = asyncio.run(_first_ask(addr, dave.ss58_address))

    assert (ask.role, ask.account, ask.peer_id) == ("ask", dave.ss58_address, paid.info["peer_id"])
    assert (ask.model, ask.start, ask.end) == (paid.info["model"], 0, 8)
    assert (ask.rate_generated, ask.rate_prompt, ask.max_price_per_token) == (RATE, RATE // 4, 0)
    assert ask.params_served > 0 and ask.params_served % 8 == 0
    # valid for 2 quote periods from when it was signed, to the whole second above (the publisher signs it as it
    # builds it; the delivery time varies with load, so it is not the reference)
    assert 2 * 1 - 0.5 <= ask.expires_at - signed_at < 2 * 1 + 1, (ask.expires_at, signed_at)

    # The two billing peers found each other through the DHT and each keeps the other's ask.
    deadline = time.monotonic() + 30
    while True:
        infos = [asyncio.run(_gossip_info(local_swarm.initial_peers, p.info["peer_id"])) for p in (paid, other)]
        if all(info["asks_seen"] >= 1 for info in infos) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(info["asks_seen"] >= 1 and info["quotes_published"] >= 2 for info in infos), infos


def test_quote_publisher_config_refuses_nonsense():
    with pytest.raises(ValueError, match="period_s must be > 0"):
        QuotePublisherConfig(period_s=0)

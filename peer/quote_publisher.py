"""A provider's signed price asks, published on the gossip topic `dllm/quotes/1`.

A peer with a chain key starts a `GossipBus` (py-libp2p in its own child process), finds other
gossip nodes in the DHT (other providers under `dllm/gossip`, verifiers under `dllm/verifiers`),
dials them, announces its own gossip addresses there, and every `period_s` seconds publishes a
`PriceAnnouncement` ask: its account, span, parameters served and rate, valid for two periods.
Asks heard from others are kept (latest per account and span) as the peer's view of the market.

Gossip is an extra: if the node cannot start, the peer logs it and keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hivemind.utils import get_dht_time
from substrateinterface import Keypair

from economy.gossip import GossipBus, GossipConfig, GossipError
from economy.gossip_topics import QUOTES_TOPIC
from economy.price_announcement import MalformedAnnouncementError, PriceAnnouncement
from economy.pricing import ProviderRate
from swarm import protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuotePublisherConfig:
    """How often a provider publishes its ask, and its gossip node's settings."""

    period_s: float = 30.0
    gossip: GossipConfig = GossipConfig()
    max_dials: int = 8
    """Gossip nodes dialled at most (GossipSub relays the rest of the way)."""

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.max_dials < 0:
            raise ValueError(f"period_s must be > 0 and max_dials >= 0, got {self.period_s}, {self.max_dials}")


def provider_ask(
    keypair: Keypair,
    peer_id: str,
    model: str,
    start: int,
    end: int,
    params_per_block: int,
    rate: ProviderRate,
    valid_for: float,
) -> PriceAnnouncement:
    """The ask a provider serving blocks start..end-1 at `rate` publishes, expiring after `valid_for` seconds."""
    return PriceAnnouncement(
        role="ask",
        account=keypair.ss58_address,
        peer_id=peer_id,
        model=model,
        start=start,
        end=end,
        params_served=(end - start) * params_per_block,
        rate_prompt=rate.prompt,
        rate_generated=rate.generated,
        max_price_per_token=0,
        expires_at=math.ceil(time.time() + valid_for),  # rounded up: valid for at least `valid_for`
    )


class QuotePublisher:
    """Publishes one peer's ask periodically and listens to everyone else's."""

    def __init__(
        self,
        keypair: Keypair,
        peer_id: str,
        announcement: Callable[[], PriceAnnouncement],
        dht: Any,
        owner_marker: bytes,
        config: QuotePublisherConfig,
    ):
        self.keypair = keypair
        self.peer_id = peer_id
        self.announcement = announcement
        self.dht = dht
        self.owner_marker = owner_marker
        self.config = config
        self.bus = GossipBus(keypair, config.gossip)
        self.published = 0
        self.market: dict[tuple[str, str, int, int], PriceAnnouncement] = {}
        self._dialled: set[str] = set()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def addrs(self) -> list[str]:
        return list(self.bus.addrs)

    async def start(self) -> None:
        """Starts the gossip node (raises GossipError), then dials known nodes, announces it, publishes the first
        ask (a failure there is logged; the periodic round retries)."""
        await self.bus.start()
        self._tasks = [asyncio.create_task(self._listen())]
        await self._round()
        self._tasks.append(asyncio.create_task(self._run()))

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.bus.close()

    def info(self) -> dict:
        """Fields for rpc_info: where this peer gossips and what it has seen."""
        return {"gossip": {"addrs": self.addrs, "quotes_published": self.published, "asks_seen": len(self.market)}}

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.config.period_s)
                return
            except TimeoutError:
                pass
            await self._round()

    async def _round(self) -> None:
        try:
            await self._discover()
            await self._announce()
            await self._publish()
        except Exception as e:  # a DHT or gossip hiccup: the next period retries
            logger.warning("publishing the price ask failed: %s", e)

    async def _publish(self) -> None:
        await self.bus.publish_quote(self.announcement())
        self.published += 1

    async def _listen(self) -> None:
        """Keeps the latest unexpired ask per (account, model, span); drains everything else."""
        while True:
            message = await self.bus.next_message()
            if message.topic != QUOTES_TOPIC:
                continue
            try:
                ask = PriceAnnouncement.from_envelope(message.envelope)
            except MalformedAnnouncementError as e:
                logger.info("ignored a price announcement from %s: %s", message.sender, e)
                continue
            now = time.time()
            if ask.role == "ask" and ask.expires_at > now:
                self.market[(ask.account, ask.model, ask.start, ask.end)] = ask
            for key in [k for k, a in self.market.items() if a.expires_at <= now]:
                del self.market[key]

    async def _announce(self) -> None:
        value = {"peer_id": self.peer_id, "account": self.keypair.ss58_address, "addrs": self.addrs}
        subkey = self.peer_id.encode() + self.owner_marker  # signed: nobody else can replace this entry
        await self.dht.store(
            protocol.GOSSIP_KEY, value, get_dht_time() + 3 * self.config.period_s, subkey=subkey, return_future=True
        )

    async def _discover(self) -> None:
        """Dials gossip nodes announced in the DHT that this one has not dialled yet."""
        for addr in await self._known_addrs():
            if len(self._dialled) >= self.config.max_dials:
                return
            if addr in self._dialled:
                continue
            self._dialled.add(addr)
            try:
                await self.bus.connect(addr)
            except GossipError as e:
                logger.info("could not reach gossip node %s: %s", addr, e)

    async def _known_addrs(self) -> list[str]:
        addrs = []
        for key, field_name in ((protocol.GOSSIP_KEY, "addrs"), (protocol.VERIFIERS_KEY, "gossip")):
            found = await self.dht.get(key, latest=True, return_future=True)
            if found is None or not isinstance(found.value, dict):
                continue
            for entry in found.value.values():
                value = getattr(entry, "value", None)
                if not isinstance(value, dict) or value.get("peer_id") == self.peer_id:
                    continue
                listed = value.get(field_name)
                if isinstance(listed, list):
                    addrs += [a for a in listed if isinstance(a, str)][:1]  # one address per node is enough
        return addrs

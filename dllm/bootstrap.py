"""A bootstrap DHT node: the well-known address that peers and clients join the swarm through.

It stores and forwards DHT records like any node but serves no blocks. It prints its multiaddrs
(one `INITIAL_PEER <maddr>` line each, machine-readable for scripts and the demo). `BootstrapService`
is a service (dllm/service.py): its stop() shuts the hivemind DHT process and p2pd down explicitly,
since hivemind leaves both running (and their unix sockets in /tmp) if the parent simply dies.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chain.config_bounds import bounded, check_bounds

logger = logging.getLogger(__name__)

# Prefix of the lines naming this node's addresses on stdout; the demo and tests parse them.
ADDRESS_LINE_PREFIX = "INITIAL_PEER "


@dataclass
class BootstrapConfig:
    """Where the bootstrap node listens and which swarm (if any) it joins."""

    host: str = "127.0.0.1"
    port: int = bounded(31337, ge=0, le=65535)  # 0: pick a free one
    initial_peers: list[str] = field(default_factory=list)
    identity_path: Path | None = None

    def __post_init__(self) -> None:
        check_bounds(self)


class BootstrapService:
    """One bootstrap DHT node; `ready_line` is what `dllm swarm bootstrap` prints once it serves."""

    def __init__(self, config: BootstrapConfig) -> None:
        self.config = config
        self._dht: Any = None

    async def start(self) -> None:
        """Forks the DHT process (which joins `initial_peers`, if any, while wait_ready() waits)."""
        from swarm.dht import start_dht

        self._dht, _ = start_dht(
            self.config.initial_peers,
            host_maddrs=[f"/ip4/{self.config.host}/tcp/{self.config.port}"],
            identity_path=self.config.identity_path,
            await_ready=False,
        )

    async def wait_ready(self) -> None:
        from swarm.dht import wait_dht_ready

        await wait_dht_ready(self._dht)

    async def wait_stopped(self) -> None:
        """Returns if the DHT process dies (it serves until stop() otherwise)."""
        while self._dht is not None and self._dht.is_alive():
            await asyncio.sleep(1.0)

    @property
    def ready_line(self) -> str:
        """One `INITIAL_PEER <maddr>` line per address, then a hint for people."""
        lines = [f"{ADDRESS_LINE_PREFIX}{address}" for address in self._dht.get_visible_maddrs()]
        return "\n".join(
            [*lines, "bootstrap node running; pass an INITIAL_PEER address to --initial-peers. Ctrl-C stops."]
        )

    async def stop(self) -> None:
        """Shuts the DHT process down (hivemind terminates it after its own grace period); idempotent."""
        dht, self._dht = self._dht, None
        if dht is not None:
            await asyncio.to_thread(dht.shutdown)
            await asyncio.to_thread(dht.join, 10)

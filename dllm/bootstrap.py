"""A bootstrap DHT node: the well-known address that peers and clients join the swarm through.

It stores and forwards DHT records like any node but serves no blocks. It prints its multiaddrs
(one `INITIAL_PEER <maddr>` line each, machine-readable for scripts and the demo) and shuts its
hivemind DHT process and p2pd daemon down explicitly on SIGINT/SIGTERM: hivemind leaves both running
(and their unix sockets in /tmp) if the parent simply dies.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Prefix of the lines naming this node's addresses on stdout; the demo and tests parse them.
ADDRESS_LINE_PREFIX = "INITIAL_PEER "


@dataclass
class BootstrapConfig:
    """Where the bootstrap node listens and which swarm (if any) it joins."""

    host: str = "127.0.0.1"
    port: int = 31337
    initial_peers: list[str] = field(default_factory=list)
    identity_path: Path | None = None


def run_bootstrap(config: BootstrapConfig) -> None:
    """Run the bootstrap node until SIGINT or SIGTERM, then shut it down cleanly (blocking)."""
    from swarm.dht import start_dht

    dht, _ = start_dht(
        config.initial_peers,
        host_maddrs=[f"/ip4/{config.host}/tcp/{config.port}"],
        identity_path=config.identity_path,
    )
    # Handlers go in only after the DHT process is forked: a forked child inherits Python-level handlers,
    # and one that ignores SIGTERM could not be terminated by hivemind's own shutdown.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for address in dht.get_visible_maddrs():
            sys.stdout.write(f"{ADDRESS_LINE_PREFIX}{address}\n")
        sys.stdout.write("bootstrap node running; pass an INITIAL_PEER address to --initial-peers. Ctrl-C stops.\n")
        sys.stdout.flush()
        stop.wait()
        log.info("stopping the bootstrap node")
    finally:
        dht.shutdown()
        dht.join(timeout=10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

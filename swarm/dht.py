"""Starting and stopping hivemind DHT nodes the way every DLLM process needs them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from chain.errors import UnavailableError

logger = logging.getLogger(__name__)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class BootstrapError(UnavailableError, ConnectionError):
    """None of the initial peers could be reached."""


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host_maddrs: Sequence[str] = LOOPBACK,
    announce_maddrs: Sequence[str] | None = None,
    client_mode: bool = False,
    identity_path: Path | None = None,
    private_key: RSAPrivateKey | None = None,
    await_ready: bool = True,
) -> tuple[DHT, RSASignatureValidator]:
    """Starts a DHT node (a daemon process) with record signing; returns it and its validator.

    `identity_path` keeps the libp2p peer id across restarts (a peer restarting with the same
    identity). The RSA key signs this process's DHT records so no one else can overwrite them.
    With `await_ready=False` it returns right after forking; call `dht.wait_until_ready()` later.
    """
    validator = RSASignatureValidator(private_key or RSAPrivateKey())
    kwargs: dict[str, Any] = {}
    if identity_path is not None:
        identity_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["identity_path"] = str(identity_path)
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    try:
        dht = DHT(
            initial_peers=list(initial_peers),
            start=True,
            host_maddrs=list(host_maddrs),
            client_mode=client_mode,
            record_validators=[validator],
            num_workers=8,
            await_ready=await_ready,
            **kwargs,
        )
    except Exception as e:  # the DHT process re-raises whatever its start-up raised; only joining is translated
        if initial_peers:
            raise BootstrapError(f"could not join the swarm through {list(initial_peers)}: {e}") from e
        raise
    return dht, validator


async def wait_dht_ready(dht: DHT, timeout_s: float = 60.0) -> None:
    """Waits until a DHT started with `await_ready=False` serves (raises its start-up error, or TimeoutError).

    It waits in short slices: a cancelled wait (a stop during start-up) leaves no worker thread blocked
    for long, and the event loop's executor, which the process waits for on exit, drains at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await asyncio.to_thread(dht.wait_until_ready, 0.25)
            return
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the DHT node did not start within {timeout_s:.0f} s") from None


def visible_maddrs(dht: DHT) -> list[str]:
    """Full multiaddrs (with /p2p/<peer id>) others can use as --initial-peers."""
    return [str(a) for a in dht.get_visible_maddrs()]

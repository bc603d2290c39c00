"""Providers' standing on chain, as a client routes by it: registered with a stake, not unbonding, not slashed.

Invariants:
- A status is read from the chain (chain.ledger.ComputeLedger.provider_status: the protocol's records plus the
  escrow's live balance), never from what a peer announces about itself.
- Each account's status is cached for `ttl_s` seconds (ClientConfig.standing_ttl_s, 10 s by default): a
  provider that requests an unbond or is slashed gets no new route from a client more than ttl_s plus one
  finalized block after the extrinsic; a route already open keeps its session until it ends.
- The ledger is synchronous and must stay on one thread: every read runs on this cache's single worker thread.
- A read that fails raises StandingUnavailableError (the caller decides: a client with min_stake > 0 routes to
  nobody rather than to providers it could not check).

Threats: a peer announcing a `chain_account` it does not own passes this check with someone else's stake; it
cannot get paid (its receipts must be signed by that account: swarm/billing.py), so it can only serve for free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from chain.errors import UnavailableError
from chain.units import PLANCK_PER_TOKEN, TOKEN_SYMBOL

if TYPE_CHECKING:
    from chain.ledger import ComputeLedger
    from chain.records import ProviderStatus

logger = logging.getLogger(__name__)

__all__ = ["ProviderStanding", "StandingUnavailableError", "describe_standing"]


class StandingUnavailableError(UnavailableError):
    """The chain could not be read to check providers' standing."""


def describe_standing(status: ProviderStatus | None, min_stake: int) -> str:
    """One line for route printouts: the refusal, or the state and stake of a provider a client may use."""
    if status is None:
        return "stake not checked"
    refusal = status.routing_refusal(min_stake)
    if refusal is not None:
        return refusal
    return f"registered, stake {status.stake / PLANCK_PER_TOKEN:g} {TOKEN_SYMBOL}"


class ProviderStanding:
    """Cached provider statuses read from the chain at `chain_url` (connects lazily, reconnects after errors)."""

    def __init__(self, chain_url: str, ttl_s: float = 10.0) -> None:
        self.chain_url = chain_url
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, ProviderStatus]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-standing")
        self._ledger: ComputeLedger | None = None

    def cached(self, account: str) -> ProviderStatus | None:
        """The last status read for `account` (however old), without reading the chain."""
        entry = self._cache.get(account)
        return entry[1] if entry is not None else None

    async def statuses(self, accounts: Iterable[str]) -> dict[str, ProviderStatus]:
        """The status of each account, re-read from chain where the cached one is older than ttl_s."""
        wanted = set(accounts)
        now = time.monotonic()
        stale = sorted(a for a in wanted if a not in self._cache or now - self._cache[a][0] > self.ttl_s)
        if stale:
            loop = asyncio.get_running_loop()
            try:
                fresh = await loop.run_in_executor(self._executor, self._read, stale)
            except Exception as error:  # any chain failure: the ledger is dropped and the caller fails closed
                self._executor.submit(self._drop_ledger)
                raise StandingUnavailableError(
                    f"cannot read providers' standing from {self.chain_url}: {type(error).__name__}: {error}"
                ) from error
            read_at = time.monotonic()
            for account, status in fresh.items():
                self._cache[account] = (read_at, status)
        return {a: self._cache[a][1] for a in wanted}

    def _read(self, accounts: list[str]) -> dict[str, ProviderStatus]:
        if self._ledger is None:
            from chain.ledger import ComputeLedger

            self._ledger = ComputeLedger(self.chain_url)
        return {account: self._ledger.provider_status(account) for account in accounts}

    def _drop_ledger(self) -> None:
        if self._ledger is not None:
            with contextlib.suppress(Exception):  # a broken websocket may fail to close; it is discarded either way
                self._ledger.close()
            self._ledger = None

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._drop_ledger)
        self._executor.shutdown(wait=True)

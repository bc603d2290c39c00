"""The peer's credit check: a charging peer serves a client's step only within the client's credit limit.

Before each metered step (inference step, forward or backward pass) `CreditGuard.admit` adds up what the
client owes this provider (economy/credit.py): its stored unpaid receipts, each of its sessions' pending
proposal and unbilled segment, the step itself, and work forfeited by sessions dropped unreceipted. Over
the limit, the step is refused with PaymentDueError (`payment_required`, owed and limit) before any
compute, so a client that stops paying is cut off with at most the limit unpaid.

Payment is seen from the receipt store's settled state. When the refused client has stored receipts
unpaid, the guard first runs a settlement round (which submits the client's pre-signed settlements or
finds them paid on chain, economy/presigned_ledger.py) and checks again: an honest client that paid a
moment ago is served. Such rounds are limited to one per client per `min_round_interval_s`, and a client
past half its limit with receipts stored kicks one round in the background, so an honest client paying
as it goes seldom meets the limit. Per step the check is a few integer sums (no chain call, no I/O
unless a receipt was stored or settled since the last check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from economy.credit import CreditBook, PaymentDueError, with_step
from economy.metering import StepKind
from economy.pricing import ProviderRate, provider_amount
from economy.receipt_store import ReceiptStore
from peer.metering_hook import MeteredSession, SessionMeters

logger = logging.getLogger(__name__)


class CreditGuard:
    """Credit limits of one charging peer's clients; `confirm` runs one settlement round."""

    def __init__(
        self,
        meters: SessionMeters,
        store: ReceiptStore,
        rate: ProviderRate,
        limit: int,
        confirm: Callable[[], Awaitable[object]] | None,
        min_round_interval_s: float = 1.0,
    ) -> None:
        self.meters, self.store, self.rate = meters, store, rate
        self.book = CreditBook(limit)
        self.confirm = confirm
        self.min_round_interval_s = min_round_interval_s
        self._fresh: set[str] = set()  # clients whose stored debt was read since the last store change
        self._rounds = 0  # settlement rounds finished
        self._last_forced: dict[str, float] = {}  # client -> when a refusal last ran a round for it
        self._background: asyncio.Task[None] | None = None
        self._last_background = 0.0
        self.refused = 0
        meters.on_drop = self._forfeit

    @property
    def limit(self) -> int:
        return self.book.limit

    # --- what the client owes -------------------------------------------------------------------

    def _outstanding(self, session: MeteredSession, step: tuple[StepKind, int, int] | None = None) -> int:
        """Pending proposal plus the unbilled segment (with `step` = (kind, tokens, context) added)."""
        usage = session.meter.segment_usage()
        if step is not None:
            usage = with_step(usage, *step)
        unbilled = provider_amount(self.rate, session.meter.params_served, usage) if usage.total_tokens else 0
        return (session.pending.amount if session.pending is not None else 0) + unbilled

    def _forfeit(self, session: MeteredSession) -> None:
        amount = self._outstanding(session)
        if amount:
            logger.warning("client %s left %d planck of work unreceipted (session dropped)", session.client, amount)
            self.book.forfeit(session.client, amount)

    def _stored(self, client: str) -> int:
        if client not in self._fresh:
            self.book.stored[client] = self.store.unpaid_amount(client)
            self._fresh.add(client)
        return self.book.stored[client]

    def receipts_changed(self, client: str | None = None) -> None:
        """A receipt was stored (for `client`) or a settlement round ended (None): re-read the store."""
        if client is None:
            self._fresh.clear()
        else:
            self._fresh.discard(client)

    def owed(
        self, client: str, current: MeteredSession | None = None, step: tuple[StepKind, int, int] | None = None
    ) -> int:
        """What `client` owes this provider, with `step` added to its session `current`."""
        open_amount = sum(self._outstanding(s, step if s is current else None) for s in self.meters.sessions_of(client))
        self._stored(client)
        return self.book.settled_owed(client) + open_amount

    # --- the check ------------------------------------------------------------------------------

    async def admit(self, session_id: str, kind: StepKind, tokens: int, context: int) -> None:
        """Raises PaymentDueError unless the session's client stays within its limit with this step."""
        session = self.meters.get(session_id)
        client, step = session.client, (kind, tokens, context)
        owed = self.owed(client, session, step)
        if owed <= self.book.limit:
            if 2 * owed > self.book.limit and self.book.stored.get(client, 0) > 0:
                self._round_in_background()
            return
        if self.book.stored.get(client, 0) > 0 and await self._round_for(client):
            owed = self.owed(client, session, step)
        try:
            self.book.check(client, owed - self.book.settled_owed(client))
        except PaymentDueError:
            self.refused += 1
            raise

    async def _run_round(self) -> None:
        assert self.confirm is not None
        await self.confirm()  # the receipt service runs one round at a time
        self._rounds += 1
        self.receipts_changed()

    async def _round_for(self, client: str) -> bool:
        """Runs a settlement round for a refused client (at most one per client per interval); True if it ran."""
        if self.confirm is None:
            return False
        now = time.monotonic()
        if now - self._last_forced.get(client, float("-inf")) < self.min_round_interval_s:
            return False
        self._last_forced[client] = now
        try:
            await self._run_round()
        except Exception:  # noqa: BLE001 - the chain may be unreachable: the client stays refused, rounds retry
            logger.exception("settlement round for client %s failed", client)
            return False
        return True

    def _round_in_background(self) -> None:
        now = time.monotonic()
        if self.confirm is None or (self._background is not None and not self._background.done()):
            return
        if now - self._last_background < self.min_round_interval_s:
            return
        self._last_background = now

        async def run() -> None:
            with contextlib.suppress(Exception):  # logged by the periodic rounds; this one only speeds them up
                await self._run_round()

        self._background = asyncio.create_task(run())

    async def close(self) -> None:
        if self._background is not None and not self._background.done():
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # it is stopping: its end is moot
                await self._background

    def info(self) -> dict[str, int]:
        return {"limit": self.book.limit, "refused": self.refused, "clients_forfeited": len(self.book.forfeited)}

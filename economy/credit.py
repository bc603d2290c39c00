"""Bounded credit: how much one client may owe one provider before it must pay on chain.

Receipts are issued after the work, so a provider always lends: between a step being served and its
payment landing on chain, the client holds work it has not paid for. `CreditBook` bounds that loan.
What a client owes a provider is

    owed = stored unpaid receipts (co-signed, not yet settled on chain)
         + open sessions' pending proposals (proposed, not countersigned) and unbilled segments
         + forfeited work (sessions dropped with work never receipted)

and a provider serves a step only if `owed` including that step stays within the client's credit limit
(`check`): whatever a client does (never countersign, countersign and never pay, let sessions expire),
a provider is out at most the limit per client account.

Invariant: amounts are integer planck, computed with economy.pricing's formula, so the running total of a
segment equals the amount its receipt will state. Threat: a client can open accounts freely, so the bound
is per client account; the limit is what a provider agrees to lend any unknown account.
"""

from __future__ import annotations

from chain.errors import EconomyError
from economy.metering import StepKind
from economy.pricing import ProviderRate, Usage, provider_amount

SEGMENT_TOKENS = 512
"""Generated tokens per receipt segment of an honest client (swarm/billing.py BillingConfig.receipt_every_tokens)."""


class PaymentDueError(EconomyError):
    """A billing peer refuses work: the client named no billing identity, or it owes its credit limit.

    `missing` names the absent field ("client") for a request without identity; otherwise `owed` is what
    the client owes this provider (with the refused step) and `limit` its credit limit, in planck."""

    def __init__(self, message: str, *, missing: str | None = None, owed: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.missing = missing
        self.owed = owed
        self.limit = limit

    @property
    def wire_details(self) -> dict[str, object]:
        """Fields sent beside the error kind, so the client reads numbers, not the message."""
        details: dict[str, object] = {"owed": getattr(self, "owed", 0), "limit": getattr(self, "limit", 0)}
        missing = getattr(self, "missing", None)
        if missing is not None:
            details["missing"] = missing
        return details


def segment_worth(rate: ProviderRate, params_served: int, max_session_length: int) -> int:
    """Planck of the largest segment an honest client runs up before its first receipt: a full-length
    prefill (or failover replay) of `max_session_length` tokens plus SEGMENT_TOKENS generated tokens, at
    that context and sampled. The default credit limit: an honest session's first receipt always fits."""
    usage = Usage(
        prompt_tokens=max_session_length,
        generated_tokens=SEGMENT_TOKENS,
        max_context=max_session_length + SEGMENT_TOKENS,
        sampled=True,
    )
    return max(1, provider_amount(rate, params_served, usage))


def with_step(usage: Usage, kind: StepKind, tokens: int, context: int) -> Usage:
    """`usage` plus one step of `tokens` tokens of `kind` that reaches `context` tokens of context."""
    return Usage(
        prompt_tokens=usage.prompt_tokens + (tokens if kind is StepKind.PROMPT else 0),
        generated_tokens=usage.generated_tokens + (tokens if kind is StepKind.GENERATED else 0),
        backward_tokens=usage.backward_tokens + (tokens if kind is StepKind.BACKWARD else 0),
        max_context=max(usage.max_context, context),
        sampled=usage.sampled,
    )


class CreditBook:
    """One provider's per-client amounts owed outside open sessions, and the credit check.

    `stored` mirrors the receipt store's unpaid sum per client (the owner refreshes it when a receipt is
    stored or a settlement round ends); `forfeited` accumulates work of sessions dropped unreceipted and is
    kept for the life of the process (no receipt can pay it any more)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a credit limit must be at least 1 planck")
        self.limit = limit
        self.stored: dict[str, int] = {}
        self.forfeited: dict[str, int] = {}

    def forfeit(self, client: str, amount: int) -> None:
        if amount > 0:
            self.forfeited[client] = self.forfeited.get(client, 0) + amount

    def settled_owed(self, client: str) -> int:
        """What `client` owes outside its open sessions (stored unpaid receipts and forfeited work)."""
        return self.stored.get(client, 0) + self.forfeited.get(client, 0)

    def check(self, client: str, open_amount: int) -> None:
        """Raises PaymentDueError if `client`'s debt, with `open_amount` of its open sessions, passes the limit."""
        owed = self.settled_owed(client) + open_amount
        if owed > self.limit:
            raise PaymentDueError(
                f"client {client} would owe {owed} planck, over its credit limit of {self.limit} planck here: "
                "pay the co-signed receipts on chain (or countersign the pending ones), then retry",
                owed=owed,
                limit=self.limit,
            )

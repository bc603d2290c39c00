"""Price announcements gossiped on dllm/quotes/1: providers' asks and clients' bids.

An announcement travels inside a SignedEnvelope, and is valid only if the envelope's sender is the
announcement's account: nobody can advertise a price in another account's name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from chain.errors import EconomyError
from economy import canonical
from economy.canonical import CanonicalFormatError, FieldSpec
from economy.envelope import SignedEnvelope
from economy.pricing import ProviderRate

ANNOUNCEMENT_TAG = "dllm.price.1"
ROLES = ("ask", "bid")


class MalformedAnnouncementError(EconomyError, ValueError):
    """The payload is not a well-formed price announcement, or not its sender's own."""


_SCHEMA = (
    FieldSpec("role", "str", max_len=3),
    FieldSpec("account", "ss58"),
    FieldSpec("peer_id", "str", max_len=128),
    FieldSpec("model", "str", max_len=256),
    FieldSpec("start", "u64"),
    FieldSpec("end", "u64"),
    FieldSpec("params_served", "u64"),
    FieldSpec("rate_prompt", "u64"),
    FieldSpec("rate_generated", "u64"),
    FieldSpec("max_price_per_token", "u64"),
    FieldSpec("expires_at", "u64"),
)


@dataclass(frozen=True)
class PriceAnnouncement:
    """An ask (provider: its rate for blocks start..end) or a bid (client: its max price per token)."""

    role: str
    account: str
    peer_id: str
    model: str
    start: int
    end: int
    params_served: int
    rate_prompt: int
    rate_generated: int
    max_price_per_token: int
    """Bids only (0 in asks): planck per generated token the client accepts for the whole model."""
    expires_at: int

    @property
    def rate(self) -> ProviderRate:
        return ProviderRate(self.rate_prompt, self.rate_generated)

    def encode(self) -> bytes:
        if self.role not in ROLES:
            raise MalformedAnnouncementError(f"role must be one of {ROLES}, got {self.role!r}")
        try:
            return canonical.encode(ANNOUNCEMENT_TAG, _SCHEMA, tuple(getattr(self, f.name) for f in fields(self)))
        except CanonicalFormatError as e:
            raise MalformedAnnouncementError(str(e)) from None

    @classmethod
    def decode(cls, data: bytes) -> PriceAnnouncement:
        try:
            values = canonical.decode(ANNOUNCEMENT_TAG, _SCHEMA, data)
        except CanonicalFormatError as e:
            raise MalformedAnnouncementError(f"malformed price announcement: {e}") from None
        a = cls(*values)
        if a.role not in ROLES:
            raise MalformedAnnouncementError(f"role must be one of {ROLES}, got {a.role!r}")
        if a.end <= a.start:
            raise MalformedAnnouncementError(f"announced span {a.start}:{a.end} is empty")
        return a

    @classmethod
    def from_envelope(cls, envelope: SignedEnvelope) -> PriceAnnouncement:
        """The announcement an (already authenticated) envelope carries, if it is the sender's own."""
        a = cls.decode(envelope.payload)
        if a.account != envelope.sender:
            raise MalformedAnnouncementError(f"announcement for {a.account} was sent by {envelope.sender}")
        return a

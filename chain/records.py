"""Records the ledger returns: results of extrinsics and the protocol state read back from chain."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChainEvent:
    """One runtime event, decoded (addresses as SS58 of the chain's prefix)."""

    module: str
    name: str
    # The event's SCALE value as substrate-interface decodes it: a dict of named fields for every
    # event the ledger reads (Balances, System, Multisig).
    attributes: Any


@dataclass(frozen=True)
class ChainResult:
    """The outcome of one included, successful extrinsic."""

    block_hash: str
    block_number: int
    extrinsic_hash: str
    extrinsic_index: int
    fee: int
    events: tuple[ChainEvent, ...]

    def find(self, module: str, name: str) -> list[ChainEvent]:
        """The events of this extrinsic with the given pallet and event name."""
        return [e for e in self.events if e.module == module and e.name == name]


@dataclass(frozen=True)
class ProviderShare:
    """A provider that served part of a request, weighted by the parameters it served."""

    provider: str  # SS58 address
    params_served: int


@dataclass(frozen=True)
class Payment:
    """The payment for one signed receipt: `amount` split pro rata over `shares`."""

    receipt_id: bytes  # 32-byte hash of the signed receipt
    amount: int
    shares: tuple[ProviderShare, ...]

    @classmethod
    def single(cls, receipt_id: bytes, provider: str, amount: int) -> Payment:
        """A receipt served entirely by one provider."""
        return cls(receipt_id, amount, (ProviderShare(provider, 1),))


class ProviderState(enum.StrEnum):
    NOT_REGISTERED = "not_registered"
    REGISTERED = "registered"
    UNBONDING = "unbonding"  # unbond requested, waiting for the delay and the council
    UNBONDED = "unbonded"


@dataclass(frozen=True)
class SlashRecord:
    provider: str
    amount: int  # planck actually moved out of the escrow
    evidence_hash: bytes
    beneficiary: str
    block_number: int


@dataclass(frozen=True)
class ProviderStatus:
    """A provider's registration and its stake (the escrow's free balance, read from chain)."""

    provider: str
    state: ProviderState
    escrow: str
    stake: int
    registered_at: int | None = None
    unbond_requested_at: int | None = None
    unbond_ready_at: int | None = None
    slashes: tuple[SlashRecord, ...] = ()


@dataclass(frozen=True)
class ComputeRecord:
    """Compute a provider recorded, tied to the hash of the signed receipts it covers."""

    provider: str
    receipts_hash: bytes
    tokens_x_params: int
    requests: int
    block_number: int


@dataclass(frozen=True)
class ComputeTotals:
    provider: str
    tokens_x_params: int
    requests: int
    records: tuple[ComputeRecord, ...] = field(default=())


@dataclass(frozen=True)
class SettledReceipt:
    """One receipt's settlement: who paid whom, in which block."""

    receipt_id: bytes
    client: str
    payouts: tuple[tuple[str, int], ...]  # (provider SS58, planck)
    block_number: int
    extrinsic_hash: str

    @property
    def amount(self) -> int:
        return sum(a for _, a in self.payouts)

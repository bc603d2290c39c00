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
    """The payment for one signed receipt: `amount` split pro rata over `shares`.

    `tokens` and `requests` are the compute the receipt covers (from the receipt the client co-signed):
    the settlement record puts them on chain, so each share's provider is credited
    tokens x its `params_served`.
    """

    receipt_id: bytes  # 32-byte hash of the signed receipt
    amount: int
    shares: tuple[ProviderShare, ...]
    tokens: int = 0  # prompt + generated + backward tokens the receipt's segment processed
    requests: int = 0  # sessions the receipt opens: 1 for a session's first segment, else 0

    @classmethod
    def single(
        cls,
        receipt_id: bytes,
        provider: str,
        amount: int,
        *,
        params_served: int = 1,
        tokens: int = 0,
        requests: int = 0,
    ) -> Payment:
        """A receipt served entirely by one provider."""
        return cls(receipt_id, amount, (ProviderShare(provider, params_served),), tokens, requests)


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
class DisputeRecord:
    """A provider's signed dispute of the evidence against it (a `dispute` record the provider itself sent).

    `provider_passed` and `worst_error_ppm` are the provider's own re-run of the evidence, as it states them:
    informative only (council members re-run the evidence themselves). Open until `open_until` (the block the
    council's decision window closes) or until a slash citing `evidence_hash` is on chain."""

    provider: str
    evidence_hash: bytes
    provider_passed: bool
    worst_error_ppm: int
    reason: str
    block_number: int
    open_until: int


@dataclass(frozen=True)
class OpenSlashProposal:
    """A slash a council member opened that is neither executed nor cancelled: what the other members approve.

    `evidence_hash` is the one the opener's `slash-open` record names (None for a record that names none); a
    member approves only after re-checking that evidence and rebuilding the call from it to `call_hash`."""

    provider: str
    call_hash: bytes
    evidence_hash: bytes | None
    proposer: str
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
    # Call hashes of slashes a council member opened on chain that are neither executed nor cancelled yet.
    open_slashes: tuple[bytes, ...] = ()
    # Last block an open slash still holds the unbond (`slash_hold_blocks` after it opened); None: none holds it.
    slash_hold_until: int | None = None
    # Disputes the provider filed whose decision window is still open and whose evidence no slash cited yet.
    open_disputes: tuple[DisputeRecord, ...] = ()
    # The chain head this status was read at.
    as_of_block: int | None = None

    @property
    def slash_holds(self) -> bool:
        """Whether an open slash proposal still holds the provider (its unbond, its routes) at `as_of_block`."""
        if not self.open_slashes:
            return False
        return self.slash_hold_until is None or self.as_of_block is None or self.as_of_block <= self.slash_hold_until

    def routing_refusal(self, min_stake: int) -> str | None:
        """Why a client asking for `min_stake` must not route to (nor pay) this provider; None: it may.

        Only a registered provider with no slash, none pending and at least `min_stake` bonded qualifies: an
        unbonding one is leaving (its stake goes back once the delay passes), a slashed one was caught cheating
        (re-registering after an unbond starts a clean record), and a pending slash means a verdict is out (until
        the council's hold on it ends: a proposal no second member joined in time does not bar a provider forever)."""
        if self.state is ProviderState.UNBONDING:
            return f"unbonding since block {self.unbond_requested_at}"
        if self.state is not ProviderState.REGISTERED:
            return self.state.value
        if self.slashes:
            last = self.slashes[-1]
            return f"slashed {len(self.slashes)}x (last at block {last.block_number}, {last.amount} planck)"
        if self.slash_holds:
            return f"{len(self.open_slashes)} slash(es) pending in the council"
        if self.stake < min_stake:
            return f"stake {self.stake} planck below the minimum {min_stake}"
        return None


@dataclass(frozen=True)
class ComputeRecord:
    """Compute credited to a provider, tied to the receipt (settlement records) or the hash of the
    receipts (a provider's own `compute` record) it covers."""

    provider: str
    receipts_hash: bytes
    tokens_x_params: int
    requests: int
    block_number: int


@dataclass(frozen=True)
class ComputeTotals:
    """A provider's compute on chain.

    The totals count only `records`: compute carried by the paying clients' settlements (signed by
    the client, counted only when the settlement's transfers happened). `claimed` holds the
    provider's self-reported `compute` records, which no client signed: kept apart, never totalled.
    """

    provider: str
    tokens_x_params: int
    requests: int
    records: tuple[ComputeRecord, ...] = field(default=())
    claimed: tuple[ComputeRecord, ...] = field(default=())


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


@dataclass(frozen=True)
class ExtrinsicEffects:
    """What one included extrinsic did, read from its events: whether it succeeded, the Multisig
    operations it opened (receipt markers) and the transfers it made. Events are the effects that
    stand: an inner call that failed, or a batch that was rolled back, left none."""

    success: bool
    new_multisigs: tuple[tuple[bytes, bytes, bytes], ...]
    """(approving account, multisig account, call hash) of each `Multisig.NewMultisig` event."""
    transfers: tuple[tuple[bytes, bytes, int], ...]
    """(from, to, planck) of each `Balances.Transfer` event."""

    def marked_by(self, approving: bytes, multisig: bytes) -> set[bytes]:
        """The call hashes (receipt ids) `approving` opened on `multisig` in this extrinsic."""
        return {h for a, m, h in self.new_multisigs if a == approving and m == multisig}

    def transferred(self, source: bytes, dest: bytes) -> int:
        """Planck moved from `source` to `dest` in this extrinsic."""
        return sum(amount for f, t, amount in self.transfers if f == source and t == dest)

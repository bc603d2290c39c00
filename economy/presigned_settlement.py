"""Settlement extrinsics the paying client signs in advance and hands to the providers it pays.

The chain pays a receipt only from an extrinsic signed by the receipt's client (chain design: the
client's own `Utility.batch_all` of receipt markers, transfers and a record). At the end of each
session segment the client signs ONE such extrinsic for all of that segment's receipts, with an
explicit nonce and a mortal era that ends no later than the earliest expiry of its receipts (so the
runtime refuses it once any of them has expired: economy/receipts.py), and gives the same bytes to
every provider it pays. Any of them (or the client) may submit it; the runtime includes it at most
once (its nonce is consumed, and the receipt markers make a second settlement of the same receipt
fail), so nobody is paid twice.

A provider accepts a pre-signed settlement only after `check_offer`: it is signed by the receipt's
client; its batch_all holds exactly the calls `ComputeLedger.build_settlement` composes (markers,
one transfer per provider, one `settle` record naming the marked receipts and paying what is
transferred; any other call could sink the batch at dispatch or move funds); it marks the receipt
and transfers the provider at least the sum of ALL of that provider's receipts it marks (the new
one and those the provider already holds from this client); the runtime would take it now
(`validate_transaction`: signature, fee); and its nonce is the client's next usable one.

Next usable nonce: the account's next nonce N (`system_accountNextIndex`, the pool counted), or
N + k when the provider itself holds unpaid settlements of this client at every nonce N .. N + k - 1.
A client legitimately hands several segments' settlements over before the first is on chain (e.g.
with `submit_settlements` off); a provider can then submit the whole run itself, in order, so no
settlement waits on a nonce only the client could fill. Any other future nonce is refused: it could
wait forever. At nonce N the settlement is also dry-run against the head's state (runtime API
`BlockBuilder_apply_extrinsic` via `state_call`) and refused unless it would succeed; a later one
cannot be dry-run before its predecessors apply, so it is dry-run when its turn comes, before it is
submitted (economy/presigned_ledger.py), and kept, not spent, while it would fail.

Expiry: a provider refuses an offer for a receipt with fewer than SETTLEMENT_MARGIN_BLOCKS left before its
expiry, or whose era leaves it fewer than that many blocks to submit it (`check_expiry`, `blocks_left`).

None of this makes a settlement certain (the client can still spend its nonce or its funds first);
what it guarantees is that a provider never counts a receipt paid unless the chain shows the transfer
(`ComputeLedger.paid_on_chain`), and what stays unpaid is bounded by the client's credit limit.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chain.account_derivation import account_id
from chain.errors import EconomyError
from chain.records import Payment
from chain.remarks import VERSIONS, MalformedRemarkError, decode_remark, encode_remark
from chain.settlement_codec import MalformedSettlementError, parse_settlement
from economy.receipts import (
    EXPIRY_SLACK_BLOCKS,
    NO_EXPIRY,
    RECEIPT_LIFETIME_BLOCKS,
    SETTLEMENT_MARGIN_BLOCKS,
    ExpiredReceiptError,
    UsageReceipt,
    check_expiry,
)

if TYPE_CHECKING:  # callers hand in the ledger and keys: the error types here load without substrate-interface
    from substrateinterface import Keypair

    from chain.ledger import ComputeLedger

# TransactionValidityError::Invalid variants (sp_runtime), as the runtime encodes them.
_INVALID_REASONS = {
    0: "call",
    1: "payment (the client cannot pay the fee)",
    2: "future",
    3: "stale (its nonce was already used)",
    4: "bad signature",
    5: "ancient birth block",
    6: "exhausts resources",
    7: "custom",
    8: "bad mandatory",
    9: "mandatory validation",
    10: "bad signer",
}
_EXTERNAL_SOURCE = "02"


class SettlementOfferError(EconomyError, ValueError):
    """A pre-signed settlement is malformed, invalid on chain, or does not pay the receipt it came with."""


class SettlementNotReadyError(EconomyError, RuntimeError):
    """An earlier nonce of the same client is not on chain yet: this extrinsic cannot be included now."""


class StaleSettlementError(EconomyError, RuntimeError):
    """The extrinsic's nonce was consumed by another transaction without paying these receipts."""


@dataclass(frozen=True)
class PresignedSettlement:
    """A decoded settlement extrinsic: who signed it, at which nonce, what it marks and pays."""

    extrinsic: bytes
    signer: bytes
    """Account id (32 bytes) of the paying client."""
    nonce: int
    receipt_ids: frozenset[bytes]
    transfers: dict[bytes, int]
    """Account id -> planck transferred to it."""
    era: tuple[int, int] | None = None
    """(period, phase) of a mortal extrinsic; None for an immortal one."""

    def blocks_left(self, head: int) -> int | None:
        """Blocks from `head` until the runtime refuses this extrinsic (its era ends); None if immortal."""
        if self.era is None:
            return None
        period, phase = self.era
        birth = (max(head, phase) - phase) // period * period + phase  # sp_runtime::generic::Era::birth
        return birth + period - head

    def check_pays(self, receipt: UsageReceipt, held: Mapping[bytes, int] | None = None) -> None:
        """Raises SettlementOfferError unless this extrinsic settles `receipt` in full.

        `held`: receipt id -> planck of the provider's other receipts from this client. The transfer to
        the provider must cover `receipt` AND every held receipt the extrinsic also marks: a marker
        blocks any later payment of its receipt, so each one marked here must be paid here.
        """
        if self.signer != account_id(receipt.client):
            raise SettlementOfferError(
                f"the settlement is signed by another account than the receipt's client {receipt.client}"
            )
        if receipt.receipt_id_bytes not in self.receipt_ids:
            raise SettlementOfferError(f"the settlement does not mark receipt {receipt.receipt_id}")
        others = {rid: amount for rid, amount in (held or {}).items() if rid in self.receipt_ids}
        others.pop(receipt.receipt_id_bytes, None)
        owed = receipt.amount + sum(others.values())
        paid = self.transfers.get(account_id(receipt.provider), 0)
        if paid < owed:
            raise SettlementOfferError(
                f"the settlement transfers {paid} planck to {receipt.provider}, less than the {owed} planck "
                f"of the {1 + len(others)} receipts of that provider it marks"
            )


def payments_for(receipts: list[UsageReceipt]) -> list[Payment]:
    """One chain Payment per receipt (each receipt is served by exactly one provider), with the compute
    the client co-signed: the settlement records its tokens x parameters and requests on chain (a
    session's first segment opens one request)."""
    return [
        Payment.single(
            r.receipt_id_bytes,
            r.provider,
            r.amount,
            params_served=r.params_served,
            tokens=r.usage.total_tokens,
            requests=1 if r.sequence == 0 else 0,
        )
        for r in receipts
    ]


def sign_at_nonce(
    ledger: ComputeLedger, client: Keypair, payments: list[Payment], nonce: int, expires_at: int = NO_EXPIRY
) -> bytes:
    """The client's settlement extrinsic for `payments` with an explicit nonce.

    `expires_at`: the earliest expiry of the paid receipts. The extrinsic is mortal and its era ends at or
    before that block, so the runtime refuses it from then on; ExpiredReceiptError if fewer than
    SETTLEMENT_MARGIN_BLOCKS are left. NO_EXPIRY (receipts of no expiry, whose markers are never
    released) signs an immortal extrinsic.
    """
    call, _ = ledger.build_settlement(client, payments)
    era: dict[str, int] | None = None
    if expires_at != NO_EXPIRY:
        head = int(ledger.substrate.get_block_number(None))
        left = expires_at - head
        if left < SETTLEMENT_MARGIN_BLOCKS:
            raise ExpiredReceiptError(
                f"a receipt of this settlement expires at block {expires_at}: at block {head} none may be signed"
            )
        reach = min(left, int(ledger.substrate.get_constant("System", "BlockHashCount").value), 1 << 16)
        # Born at head - 1: a dry run at the head's state finds only earlier blocks' hashes. Its period is a power
        # of two <= reach, so the era ends before expires_at.
        era = {"period": 1 << (reach.bit_length() - 1), "current": head - 1}
    extrinsic = ledger.substrate.create_signed_extrinsic(call=call, keypair=client, nonce=nonce, era=era)
    return bytes(extrinsic.data.data)


def decode_settlement(ledger: ComputeLedger, extrinsic: bytes) -> PresignedSettlement:
    """Parses a settlement extrinsic (no chain access once the runtime is known). SettlementOfferError unless its
    bytes are exactly what `ComputeLedger.build_settlement` composes and the protocol signs
    (chain/settlement_codec.py) and its record names and pays exactly what its markers and transfers do."""
    if type(extrinsic) is not bytes or not 0 < len(extrinsic) <= 1 << 20:
        raise SettlementOfferError("a settlement must be 1 byte .. 1 MiB of SCALE-encoded extrinsic")
    try:
        parsed = parse_settlement(ledger.settlement_layout(), extrinsic)
    except MalformedSettlementError as e:
        raise SettlementOfferError(f"not a settlement extrinsic of this protocol: {e}") from None
    _check_record(parsed.record, parsed.receipt_ids, parsed.transfers)
    return PresignedSettlement(
        extrinsic, parsed.signer, parsed.nonce, frozenset(parsed.receipt_ids), dict(parsed.transfers), parsed.era
    )


def _check_record(payload: bytes, receipt_ids: tuple[bytes, ...], transfers: tuple[tuple[bytes, int], ...]) -> None:
    """SettlementOfferError unless the settle record is the one `ComputeLedger.build_settlement` writes for these
    markers and transfers: a current-version `settle` record in canonical JSON naming exactly the marked receipts,
    in marker order, each once, whose shares add up, provider by provider in order of first appearance, to
    exactly the transfers (a provider whose shares are all 0 gets no transfer)."""
    try:
        remark = decode_remark(payload)
    except MalformedRemarkError as e:
        raise SettlementOfferError(f"the settlement's record is not a settle record: {e}") from None
    if (
        remark.kind != "settle"
        or remark.version != VERSIONS["settle"]
        or encode_remark("settle", remark.body) != payload
    ):
        raise SettlementOfferError(f"a {remark.kind} v{remark.version} record, not the protocol's settle record")
    records = remark.body.get("receipts")
    if set(remark.body) != {"receipts"} or not isinstance(records, list):
        raise SettlementOfferError("the settle record holds more or other than its receipts")
    if len(set(receipt_ids)) != len(receipt_ids) or [_record_id(r) for r in records] != list(receipt_ids):
        raise SettlementOfferError("the settle record does not name exactly the receipts the settlement marks")
    payouts: dict[bytes, int] = {}
    for record in records:
        for share in record[1]:
            if not (isinstance(share, list) and len(share) == 3 and all(_is_count(v) for v in share[1:])):
                raise SettlementOfferError("a share of the settle record is not [provider, planck, parameters]")
            provider = _hex32(share[0])
            payouts[provider] = payouts.get(provider, 0) + share[1]
    if list(transfers) != [(p, a) for p, a in payouts.items() if a > 0]:
        raise SettlementOfferError("the settlement's transfers are not what its settle record pays each provider")


def _record_id(record: object) -> bytes:
    """The receipt id of one settle-record entry [receipt, shares, tokens, requests], checking its shape."""
    if not (
        isinstance(record, list)
        and len(record) == 4
        and isinstance(record[1], list)
        and record[1]
        and _is_count(record[2])
        and _is_count(record[3])
    ):
        raise SettlementOfferError("an entry of the settle record is not [receipt, shares, tokens, requests]")
    return _hex32(record[0])


def _hex32(value: object) -> bytes:
    """32 bytes written as the record writes them: 64 lowercase hex digits."""
    if not isinstance(value, str) or len(value) != 64 or value != value.lower():
        raise SettlementOfferError(f"{value!r:.80} is not a 32-byte id in lowercase hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise SettlementOfferError(f"{value!r:.80} is not a 32-byte id in lowercase hex") from None


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def validate_on_chain(ledger: ComputeLedger, extrinsic: bytes) -> None:
    """Asks the runtime whether the extrinsic could be included (signature, nonce, fee).

    A future nonce is valid (it waits for the earlier ones). Raises SettlementOfferError otherwise.
    """
    head = ledger.substrate.get_chain_head()
    reply = ledger.substrate.rpc_request(
        "state_call",
        ["TaggedTransactionQueue_validate_transaction", "0x" + _EXTERNAL_SOURCE + extrinsic.hex() + head[2:]],
    )
    result = bytes.fromhex(str(reply["result"]).removeprefix("0x"))
    if result[:1] == b"\x00":
        return
    reason = _INVALID_REASONS.get(result[2], f"code {result[2]}") if len(result) > 2 and result[1] == 0 else "unknown"
    raise SettlementOfferError(f"the runtime refuses the settlement extrinsic: {reason}")


def dry_run(ledger: ComputeLedger, extrinsic: bytes) -> None:
    """Applies the extrinsic to a copy of the current head's state (runtime API `BlockBuilder_apply_extrinsic`
    through `state_call`, what `system_dryRun` does, without needing an unsafe RPC) and raises
    SettlementOfferError unless it would be included AND succeed. Only for an extrinsic at the account's
    next nonce: a later one is invalid (future) against the current state."""
    head = ledger.substrate.get_chain_head()
    reply = ledger.substrate.rpc_request("state_call", ["BlockBuilder_apply_extrinsic", "0x" + extrinsic.hex(), head])
    result = bytes.fromhex(str(reply["result"]).removeprefix("0x"))
    if result[:2] == b"\x00\x00":  # Ok(Ok(())): included and dispatched successfully
        return
    if result[:2] == b"\x00\x01":
        raise SettlementOfferError(f"the settlement would fail at dispatch (DispatchError 0x{result[2:].hex()})")
    reason = _INVALID_REASONS.get(result[2], f"code {result[2]}") if len(result) > 2 and result[1] == 0 else "unknown"
    raise SettlementOfferError(f"the runtime would not include the settlement: {reason}")


def check_offer(
    ledger: ComputeLedger,
    extrinsic: bytes,
    receipt: UsageReceipt,
    held_nonces: Collection[int],
    held_amounts: Mapping[bytes, int],
) -> PresignedSettlement:
    """Everything a provider checks before it accepts `extrinsic` as payment of `receipt`.

    The protocol's calls only, signed by the receipt's client, paying this provider for all of its receipts
    it marks (`held_amounts`: the provider's receipts from this client); a nonce no earlier than the account's
    next one and with no gap the provider cannot fill itself (`held_nonces`: nonces of this client's settlements
    it holds unpaid); valid for the runtime (signature, fee); and, at the next nonce, a dry run that succeeds.
    The receipt and the extrinsic's era must both leave SETTLEMENT_MARGIN_BLOCKS to submit it: an expired
    receipt's marker may have been released, so paying it now could pay it twice.
    Raises SettlementOfferError (SettlementNotReadyError never: a gap is refused, not waited on).
    """
    settlement = decode_settlement(ledger, extrinsic)
    settlement.check_pays(receipt, held_amounts)
    head = int(ledger.substrate.get_block_number(None))
    try:
        check_expiry(receipt, head)
    except ExpiredReceiptError as e:
        raise SettlementOfferError(f"no settlement of this receipt is valid any more: {e}") from None
    left = settlement.blocks_left(head)
    if left is not None and left < SETTLEMENT_MARGIN_BLOCKS:
        raise SettlementOfferError(f"the settlement's era ends in {left} blocks: too soon to submit it")
    next_nonce = account_nonce(ledger, receipt.client)
    if settlement.nonce < next_nonce:
        raise SettlementOfferError(f"nonce {settlement.nonce} of {receipt.client} is already used (next: {next_nonce})")
    missing = sorted(set(range(next_nonce, settlement.nonce)) - set(held_nonces))
    if missing:
        raise SettlementOfferError(
            f"nonce {settlement.nonce} of {receipt.client} leaves a gap this provider cannot fill: "
            f"the account is at {next_nonce} and no settlement is held for nonces {missing[:5]}"
        )
    validate_on_chain(ledger, extrinsic)
    if settlement.nonce == next_nonce:
        dry_run(ledger, extrinsic)
    return settlement


RELEASE_AFTER_BLOCKS = RECEIPT_LIFETIME_BLOCKS + EXPIRY_SLACK_BLOCKS
"""A marker made at block t is of a receipt the client countersigned at or before t with an expiry at most
t + RELEASE_AFTER_BLOCKS (check_expiry): from then on no settlement of it is valid, and it may be released."""
_RELEASE_CHUNK = 500  # markers per cancelling extrinsic (well inside a block's weight)


def release_expired_markers(
    ledger: ComputeLedger, client: Keypair, after_blocks: int = RELEASE_AFTER_BLOCKS
) -> list[bytes]:
    """Releases the client's markers made at least `after_blocks` blocks ago (their receipts have expired),
    in batches; returns the receipt ids released. Stateless (read from the chain), so a restarted client
    releases what an earlier run left: what it keeps locked is the markers of its last `after_blocks` blocks."""
    head = int(ledger.substrate.get_block_number(None))
    markers = ledger.open_markers(client.ss58_address)
    due = sorted(rid for rid, (height, _) in markers.items() if height + after_blocks <= head)
    for start in range(0, len(due), _RELEASE_CHUNK):
        ledger.release_markers(client, due[start : start + _RELEASE_CHUNK])
    return due


def account_nonce(ledger: ComputeLedger, ss58: str) -> int:
    """The next nonce of an account, counting transactions already in the pool."""
    return int(ledger.substrate.get_account_nonce(ss58))


def included_nonce(ledger: ComputeLedger, ss58: str) -> int:
    """The next nonce of an account after its transactions included in blocks (the pool not counted)."""
    return int(ledger.substrate.query("System", "Account", ["0x" + account_id(ss58).hex()]).value["nonce"])

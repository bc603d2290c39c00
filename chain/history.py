"""An index of the protocol's records, built by scanning blocks for dllm remarks (chain/remarks.py).

The chain is the source of truth; this index is a cache the ledger client rebuilds from any start
block (the block the protocol was deployed at). Only finalized blocks are scanned, so a re-org on
a real chain never rewrites what was indexed. `RecordScanner` does the block walking for this index and for
chain/lineage.py's LineageIndex (each applies its own kinds). Each record is trusted only if:
- its blake2_256 hash appears in a `System.Remarked` event of the same extrinsic (so the call
  really executed: events of a failed batch are rolled back with it), and
- the event's sender is the account the record kind requires (the provider itself, the paying
  client, the council's multisig account, or one council member for a slash proposal), and
- the funds it claims moved did move in that extrinsic (matching `Balances.Transfer` events).

Compute is credited from settlement records only (v2 `settle`: the paying client signed the tokens
and parameters of each receipt it paid, and the record counts only when its transfers happened,
once per receipt). A provider's own `compute` records are kept apart in `claimed_compute`: no
client signed them, so they are never part of a provider's compute totals.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from substrateinterface import SubstrateInterface

from chain.account_derivation import account_id, address, blake2_256, escrow_account
from chain.records import ComputeRecord, SettledReceipt, SlashRecord
from chain.remarks import MalformedRemarkError, Remark, decode_remark, find_candidate_payloads

logger = logging.getLogger(__name__)


MAX_DISPUTE_REASON = 280
"""Characters a dispute's reason may hold (a record with a longer one is ignored)."""


@dataclass(frozen=True)
class DisputeEntry:
    """A `dispute` record as indexed: sent by the provider itself, naming evidence against it."""

    evidence_hash: bytes
    provider_passed: bool
    worst_error_ppm: int
    reason: str
    block: int


@dataclass
class ProviderEntry:
    registered_at: int
    unbond_requested_at: int | None = None
    unbonded_at: int | None = None
    slashes: list[SlashRecord] = field(default_factory=list)
    # Slashes a council member opened (call hash -> block): pending while the council's Multisig operation exists.
    slash_proposals: dict[bytes, int] = field(default_factory=dict)
    # call hash -> (evidence hash the slash-open record names or None, the member that opened it)
    slash_proposers: dict[bytes, tuple[bytes | None, bytes]] = field(default_factory=dict)
    # evidence hash -> the provider's own dispute of it (the first one it filed)
    disputes: dict[bytes, DisputeEntry] = field(default_factory=dict)


@dataclass
class ScannedExtrinsic:
    """What one extrinsic did, as far as the indexes care."""

    index: int
    remarks: list[tuple[bytes, bytes]] = field(default_factory=list)  # (sender, payload hash)
    transfers: list[tuple[bytes, bytes, int]] = field(default_factory=list)  # (from, to, amount)
    signer: bytes | None = None  # the account that signed it (None: unsigned, or not a plain account id)


def extrinsic_signer(raw: bytes) -> bytes | None:
    """The signer's account id of a SCALE-encoded extrinsic (with its compact length prefix): a signed v4
    extrinsic (version byte 0x84) whose MultiAddress is an `Id`; else None."""
    width = {0: 1, 1: 2, 2: 4}.get(raw[0] & 0b11) if raw else None
    if width is None or len(raw) < width + 34 or raw[width] != 0x84 or raw[width + 1] != 0x00:
        return None
    return bytes(raw[width + 2 : width + 34])


class RecordScanner:
    """Walks finalized blocks from `start_block` and hands every dllm record a `System.Remarked` event of its own
    extrinsic vouches for to `_apply` (with the event's sender); a malformed record is logged and skipped.
    The indexes (LedgerIndex here, chain/lineage.py's LineageIndex) apply their own kinds' trust rules."""

    def __init__(self, substrate: SubstrateInterface, start_block: int = 0) -> None:
        self.substrate = substrate
        self.next_block = start_block

    def sync(self) -> int:
        """Index every finalized block not seen yet; returns the last indexed block number."""
        head_hash = self.substrate.rpc_request("chain_getFinalizedHead", [])["result"]
        head: int = self.substrate.get_block_number(head_hash)
        while self.next_block <= head:
            self._index_block(self.next_block)
            self.next_block += 1
        return head

    def _index_block(self, number: int) -> None:
        block_hash = self.substrate.get_block_hash(number)
        extrinsics: dict[int, ScannedExtrinsic] = {}
        for record in self.substrate.get_events(block_hash):
            idx = record.value.get("extrinsic_idx")
            if idx is None:
                continue
            module, name, attrs = record.value["module_id"], record.value["event_id"], record.value["attributes"]
            if (module, name) == ("System", "Remarked"):
                ext = extrinsics.setdefault(idx, ScannedExtrinsic(idx))
                ext.remarks.append((account_id(attrs["sender"]), bytes.fromhex(attrs["hash"][2:])))
            elif (module, name) == ("Balances", "Transfer"):
                ext = extrinsics.setdefault(idx, ScannedExtrinsic(idx))
                ext.transfers.append((account_id(attrs["from"]), account_id(attrs["to"]), int(attrs["amount"])))
        with_remarks = [e for e in extrinsics.values() if e.remarks]
        if not with_remarks:
            return
        body = self.substrate.rpc_request("chain_getBlock", [block_hash])["result"]["block"]["extrinsics"]
        for ext in with_remarks:
            raw = bytes.fromhex(body[ext.index][2:])
            ext.signer = extrinsic_signer(raw)
            ext_hash = "0x" + blake2_256(raw).hex()
            by_hash = {blake2_256(p): p for p in find_candidate_payloads(raw)}
            for sender, payload_hash in ext.remarks:
                payload = by_hash.get(payload_hash)
                if payload is None:
                    continue  # a remark of another protocol
                try:
                    self._apply(decode_remark(payload), sender, ext, number, ext_hash)
                except (MalformedRemarkError, KeyError, TypeError, ValueError) as exc:
                    logger.warning("ignoring malformed dllm record in block %d: %s", number, exc)

    def _apply(self, remark: Remark, sender: bytes, ext: ScannedExtrinsic, block: int, ext_hash: str) -> None:
        raise NotImplementedError


class LedgerIndex(RecordScanner):
    """Protocol state rebuilt from chain history (see the module docstring for the trust rules)."""

    def __init__(
        self,
        substrate: SubstrateInterface,
        council_account: bytes,
        start_block: int = 0,
        council_members: Iterable[bytes] = (),
    ) -> None:
        super().__init__(substrate, start_block)
        self.council_account = council_account
        self.council_members = frozenset(council_members)
        self.providers: dict[bytes, ProviderEntry] = {}
        self.escrow_owner: dict[bytes, bytes] = {}
        self.compute: dict[bytes, list[ComputeRecord]] = defaultdict(list)  # from clients' settlements
        self.claimed_compute: dict[bytes, list[ComputeRecord]] = defaultdict(list)  # self-reported
        self.settled: dict[bytes, SettledReceipt] = {}
        self.settlement_log: list[SettledReceipt] = []

    # ---- applying records --------------------------------------------------------------------
    def _apply(self, remark: Remark, sender: bytes, ext: ScannedExtrinsic, block: int, ext_hash: str) -> None:
        body = remark.body
        if remark.kind == "register":
            escrow = escrow_account(self.council_account, sender)
            stake = int(body["stake"])
            if bytes.fromhex(body["escrow"]) != escrow or (sender, escrow, stake) not in ext.transfers:
                logger.warning("ignoring a registration whose stake did not reach its escrow (block %d)", block)
                return
            current = self.providers.get(sender)
            if current is None or current.unbonded_at is not None:
                self.providers[sender] = ProviderEntry(registered_at=block)
                self.escrow_owner[escrow] = sender
        elif remark.kind == "compute":
            receipts = bytes.fromhex(body["receipts"])
            tokens, requests = int(body["tokens_x_params"]), int(body["requests"])
            if len(receipts) != 32 or tokens < 0 or requests < 0:
                raise ValueError("bad compute record")
            self.claimed_compute[sender].append(ComputeRecord(self._ss58(sender), receipts, tokens, requests, block))
        elif remark.kind == "settle":
            self._apply_settlement(remark, sender, ext, block, ext_hash)
        elif remark.kind == "unbond-request":
            entry = self.providers.get(sender)
            if entry is not None and entry.unbonded_at is None and entry.unbond_requested_at is None:
                entry.unbond_requested_at = block
        elif remark.kind == "slash-open":
            self._apply_slash_proposal(body, sender, block)
        elif remark.kind == "dispute":
            self._apply_dispute(body, sender, block)
        elif remark.kind in ("slash", "unbond"):
            if sender != self.council_account:
                logger.warning("ignoring a %s record not sent by the council (block %d)", remark.kind, block)
                return
            provider = bytes.fromhex(body["provider"])
            entry = self.providers.get(provider)
            if entry is None:
                return
            escrow = escrow_account(self.council_account, provider)
            if remark.kind == "unbond":
                entry.unbonded_at = block
                return
            beneficiary = bytes.fromhex(body["beneficiary"])
            moved = sum(a for f, t, a in ext.transfers if f == escrow and t == beneficiary)
            entry.slashes.append(
                SlashRecord(
                    self._ss58(provider), moved, bytes.fromhex(body["evidence"]), self._ss58(beneficiary), block
                )
            )

    def _apply_slash_proposal(self, body: dict[str, Any], sender: bytes, block: int) -> None:
        """A member's first approval of a slash, announced so that an unbond can see it is pending."""
        if sender not in self.council_members:
            logger.warning("ignoring a slash proposal not sent by a council member (block %d)", block)
            return
        entry = self.providers.get(bytes.fromhex(body["provider"]))
        call_hash = bytes.fromhex(body["call"])
        evidence = bytes.fromhex(body["evidence"]) if isinstance(body.get("evidence"), str) else None
        if entry is not None and len(call_hash) == 32:
            entry.slash_proposals.setdefault(call_hash, block)
            entry.slash_proposers.setdefault(
                call_hash, (evidence if evidence and len(evidence) == 32 else None, sender)
            )

    def _apply_dispute(self, body: dict[str, Any], sender: bytes, block: int) -> None:
        """A provider's dispute: attached to the SENDER's own registration only, so no account can dispute (and so
        hold up) anything on behalf of another provider; the first dispute of an evidence hash is kept."""
        entry = self.providers.get(sender)
        if entry is None or entry.unbonded_at is not None:
            logger.warning("ignoring a dispute not sent by a registered provider (block %d)", block)
            return
        evidence = bytes.fromhex(body["evidence"])
        passed, error, reason = body["passed"], body["worst_error_ppm"], body["reason"]
        if len(evidence) != 32 or type(passed) is not bool or type(error) is not int or error < 0:
            raise ValueError("bad dispute record")
        if type(reason) is not str or len(reason) > MAX_DISPUTE_REASON:
            raise ValueError("bad dispute reason")
        entry.disputes.setdefault(evidence, DisputeEntry(evidence, passed, error, reason, block))

    def _apply_settlement(
        self, remark: Remark, client: bytes, ext: ScannedExtrinsic, block: int, ext_hash: str
    ) -> None:
        claimed: dict[bytes, int] = defaultdict(int)
        receipts = [_settled_receipt(entry, remark.version) for entry in remark.body["receipts"]]
        for receipt in receipts:
            for provider, amount in receipt.payouts:
                claimed[provider] += amount
        paid: dict[bytes, int] = defaultdict(int)
        for sender, to, amount in ext.transfers:
            if sender == client:
                paid[to] += amount
        if any(paid[p] < amount for p, amount in claimed.items()):
            logger.warning("ignoring a settlement whose transfers do not cover its receipts (block %d)", block)
            return
        for receipt in receipts:
            if receipt.receipt_id in self.settled:
                continue  # a replay has no effect on the ledger (and the runtime refuses it anyway)
            record = SettledReceipt(
                receipt.receipt_id,
                self._ss58(client),
                tuple((self._ss58(p), a) for p, a in receipt.payouts),
                block,
                ext_hash,
            )
            self.settled[receipt.receipt_id] = record
            self.settlement_log.append(record)
            for provider, params in receipt.params:
                self.compute[provider].append(
                    ComputeRecord(
                        self._ss58(provider), receipt.receipt_id, receipt.tokens * params, receipt.requests, block
                    )
                )

    def _ss58(self, account: bytes) -> str:
        return address(account, self.substrate.ss58_format)


@dataclass(frozen=True)
class _ReceiptEntry:
    """One receipt of a settlement record, decoded."""

    receipt_id: bytes
    payouts: list[tuple[bytes, int]]  # planck > 0 only, as SettledReceipt lists them
    params: list[tuple[bytes, int]]  # (provider, parameters served); empty in v1 records
    tokens: int
    requests: int


def _settled_receipt(entry: list[Any], version: int) -> _ReceiptEntry:
    """v1: [receipt, [[provider, planck], ...]] (no compute); v2: [receipt, [[provider, planck, params], ...],
    tokens, requests]. Raises KeyError/TypeError/ValueError on a malformed entry (the record is ignored)."""
    if version == 1:
        receipt_hex, payouts = entry
        shares = [(bytes.fromhex(p), int(a), 0) for p, a in payouts]
        tokens = requests = 0
    else:
        receipt_hex, raw_shares, tokens, requests = entry
        shares = [(bytes.fromhex(p), int(a), int(params)) for p, a, params in raw_shares]
        tokens, requests = int(tokens), int(requests)
    receipt_id = bytes.fromhex(receipt_hex)
    if len(receipt_id) != 32 or tokens < 0 or requests < 0 or any(a < 0 or n < 0 for _, a, n in shares):
        raise ValueError("bad settlement record entry")
    return _ReceiptEntry(
        receipt_id,
        [(p, a) for p, a, _ in shares if a > 0],
        [(p, n) for p, _, n in shares if n > 0] if version > 1 else [],
        tokens,
        requests,
    )

"""An index of the protocol's records, built by scanning blocks for dllm:v1 remarks.

The chain is the source of truth; this index is a cache the ledger client rebuilds from any start
block (the block the protocol was deployed at). Only finalized blocks are scanned, so a re-org on
a real chain never rewrites what was indexed. Each record is trusted only if:
- its blake2_256 hash appears in a `System.Remarked` event of the same extrinsic (so the call
  really executed: events of a failed batch are rolled back with it), and
- the event's sender is the account the record kind requires (the provider itself, the paying
  client, or the council's multisig account), and
- the funds it claims moved did move in that extrinsic (matching `Balances.Transfer` events).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from substrateinterface import SubstrateInterface

from chain.account_derivation import account_id, address, blake2_256, escrow_account
from chain.records import ComputeRecord, SettledReceipt, SlashRecord
from chain.remarks import MalformedRemarkError, Remark, decode_remark, find_candidate_payloads

logger = logging.getLogger(__name__)


@dataclass
class ProviderEntry:
    registered_at: int
    unbond_requested_at: int | None = None
    unbonded_at: int | None = None
    slashes: list[SlashRecord] = field(default_factory=list)


@dataclass
class _Extrinsic:
    """What one extrinsic did, as far as the index cares."""

    index: int
    remarks: list[tuple[bytes, bytes]] = field(default_factory=list)  # (sender, payload hash)
    transfers: list[tuple[bytes, bytes, int]] = field(default_factory=list)  # (from, to, amount)


class LedgerIndex:
    """Protocol state rebuilt from chain history (see the module docstring for the trust rules)."""

    def __init__(self, substrate: SubstrateInterface, council_account: bytes, start_block: int = 0) -> None:
        self.substrate = substrate
        self.council_account = council_account
        self.next_block = start_block
        self.providers: dict[bytes, ProviderEntry] = {}
        self.escrow_owner: dict[bytes, bytes] = {}
        self.compute: dict[bytes, list[ComputeRecord]] = defaultdict(list)
        self.settled: dict[bytes, SettledReceipt] = {}
        self.settlement_log: list[SettledReceipt] = []

    # ---- scanning -------------------------------------------------------------------------
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
        extrinsics: dict[int, _Extrinsic] = {}
        for record in self.substrate.get_events(block_hash):
            idx = record.value.get("extrinsic_idx")
            if idx is None:
                continue
            module, name, attrs = record.value["module_id"], record.value["event_id"], record.value["attributes"]
            if (module, name) == ("System", "Remarked"):
                ext = extrinsics.setdefault(idx, _Extrinsic(idx))
                ext.remarks.append((account_id(attrs["sender"]), bytes.fromhex(attrs["hash"][2:])))
            elif (module, name) == ("Balances", "Transfer"):
                ext = extrinsics.setdefault(idx, _Extrinsic(idx))
                ext.transfers.append((account_id(attrs["from"]), account_id(attrs["to"]), int(attrs["amount"])))
        with_remarks = [e for e in extrinsics.values() if e.remarks]
        if not with_remarks:
            return
        body = self.substrate.rpc_request("chain_getBlock", [block_hash])["result"]["block"]["extrinsics"]
        for ext in with_remarks:
            raw = bytes.fromhex(body[ext.index][2:])
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

    # ---- applying records --------------------------------------------------------------------
    def _apply(self, remark: Remark, sender: bytes, ext: _Extrinsic, block: int, ext_hash: str) -> None:
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
            self.compute[sender].append(ComputeRecord(self._ss58(sender), receipts, tokens, requests, block))
        elif remark.kind == "settle":
            self._apply_settlement(body, sender, ext, block, ext_hash)
        elif remark.kind == "unbond-request":
            entry = self.providers.get(sender)
            if entry is not None and entry.unbonded_at is None and entry.unbond_requested_at is None:
                entry.unbond_requested_at = block
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

    def _apply_settlement(
        self, body: dict[str, Any], client: bytes, ext: _Extrinsic, block: int, ext_hash: str
    ) -> None:
        claimed: dict[bytes, int] = defaultdict(int)
        receipts = []
        for receipt_hex, payouts in body["receipts"]:
            decoded = [(bytes.fromhex(p), int(a)) for p, a in payouts]
            for provider, amount in decoded:
                claimed[provider] += amount
            receipts.append((bytes.fromhex(receipt_hex), decoded))
        paid: dict[bytes, int] = defaultdict(int)
        for sender, to, amount in ext.transfers:
            if sender == client:
                paid[to] += amount
        if any(paid[p] < amount for p, amount in claimed.items()):
            logger.warning("ignoring a settlement whose transfers do not cover its receipts (block %d)", block)
            return
        for receipt_id, payouts in receipts:
            if receipt_id in self.settled:
                continue  # a replay has no effect on the ledger (and the runtime refuses it anyway)
            record = SettledReceipt(
                receipt_id, self._ss58(client), tuple((self._ss58(p), a) for p, a in payouts), block, ext_hash
            )
            self.settled[receipt_id] = record
            self.settlement_log.append(record)

    def _ss58(self, account: bytes) -> str:
        return address(account, self.substrate.ss58_format)

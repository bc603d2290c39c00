"""The provider side of billing: the `dllm.v1.receipt` RPC, the receipt store and settlement rounds.

Protocol (one unary RPC, `op` in the metadata):
1. `{"op": "propose", "session_id"}`: the peer closes the session's current meter segment and
   answers `{"receipt": bytes, "provider_signature": bytes}` (the same pending proposal until
   it is delivered back).
2. `{"op": "deliver", "signed": SignedReceipt bytes, "settlement": extrinsic bytes}`: the client
   returns the receipt with its countersignature and its pre-signed settlement extrinsic. The peer
   checks both signatures against the session's client, that it is the receipt it proposed and not
   one already stored, and that the extrinsic is valid on chain and pays the receipt in full; then it
   stores both in one SQLite transaction and answers `{"receipt_id"}`.
A settlement task submits stored extrinsics every `settle_interval_s` seconds (and once on start,
which settles whatever a crashed run left); see economy/presigned_ledger.py. Rounds run one at a time
(`settle_now`): the credit guard of a charging peer (peer/credit_guard.py) also runs one when a client
over its credit limit may have paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from substrateinterface import Keypair

from economy.presigned_ledger import PresignedSettlementLedger, settle_round
from economy.presigned_settlement import PresignedSettlement, check_offer
from economy.pricing import ProviderRate
from economy.receipt_store import ReceiptStore
from economy.receipts import (
    NO_EXPIRY,
    RECEIPT_LIFETIME_BLOCKS,
    MalformedReceiptError,
    NothingToBillError,
    ReplayedReceiptError,
    SignedReceipt,
    UnexpectedReceiptError,
    UsageReceipt,
    receipt_for_segment,
    sign_as_provider,
    verify_receipt,
)
from economy.settlement import Settler
from economy.signing import load_keypair
from peer.credit_guard import CreditGuard
from peer.metering_hook import SessionMeters
from swarm import protocol, wire_errors
from swarm.protocol import ProtocolError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BillingSetup:
    """What a peer needs to bill: its key, where receipts are kept, the chain, its price."""

    keypair: Keypair
    receipts_path: Path
    chain_url: str | None
    rate: ProviderRate
    settle_interval_s: float


class ReceiptService:
    """Issues, accepts and settles one provider's receipts."""

    def __init__(self, setup: BillingSetup, meters: SessionMeters, store: ReceiptStore, network: str, ledger=None):
        self.setup = setup
        self.keypair = setup.keypair
        self.meters = meters
        self.store = store
        self.network = network
        self.ledger = ledger  # chain.ComputeLedger, or None: receipts are kept but not settled
        self.chain_lock = threading.Lock()
        self.presigned = PresignedSettlementLedger(ledger, store, self.chain_lock) if ledger is not None else None
        self.settler = Settler(store, self.presigned) if self.presigned is not None else None
        self.receipts_accepted = 0
        self.receipts_rejected = 0
        # This provider's own standing on chain (chain.records.ProviderStatus as JSON), re-read every settlement
        # round: what clients with a min_stake see (rpc_info "standing"); None until first read or without a chain.
        self.standing: dict | None = None
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._round_lock = asyncio.Lock()
        self.credit: CreditGuard | None = None  # set by start() on a peer that charges (rate > 0)

    @classmethod
    async def start(cls, setup: BillingSetup, meters: SessionMeters, credit_limit: int | None = None) -> ReceiptService:
        """Connects to the chain (if any), opens the store, settles what an earlier run left.

        With a rate > 0 the peer charges: every session must name its client, and each client may owe at most
        `credit_limit` planck (required then)."""
        ledger, network = None, "dllm-offline"
        if setup.chain_url:
            from chain.ledger import ComputeLedger

            ledger = await asyncio.to_thread(ComputeLedger, setup.chain_url)
            network = await asyncio.to_thread(ledger.substrate.get_block_hash, 0)
        setup.receipts_path.parent.mkdir(parents=True, exist_ok=True)
        store = ReceiptStore(setup.receipts_path, network=network, provider=setup.keypair.ss58_address)
        service = cls(setup, meters, store, network, ledger)
        if setup.rate.generated > 0:
            if credit_limit is None:
                raise ValueError("a peer that charges needs a credit limit")
            meters.require_client = True
            confirm = service.settle_now if service.settler is not None else None
            service.credit = CreditGuard(meters, store, setup.rate, credit_limit, confirm)
        if service.settler is not None:
            results = await settle_round(service.settler)
            if results:
                logger.info("settled %d receipts left by an earlier run", len(results))
            service._task = asyncio.create_task(service._settle_periodically(service.settler))
        return service

    async def add_handlers(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(protocol.HANDLER_RECEIPT, self.rpc_receipt, runtime_pb2.ExpertRequest)

    async def settle_now(self) -> None:
        """One settlement round (never two at once: a round's reconcile would release the other's batch)."""
        if self.settler is None:
            return
        async with self._round_lock:
            await settle_round(self.settler)
        if self.credit is not None:
            self.credit.receipts_changed()

    async def close(self) -> None:
        self._stop.set()
        if self.credit is not None:
            await self.credit.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # it is stopping: its end is moot
                await self._task
        self.store.close()
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.close)

    async def _settle_periodically(self, settler: Settler) -> None:
        while not self._stop.is_set():
            try:
                self.standing = await asyncio.to_thread(self._read_standing)
            except Exception as error:  # noqa: BLE001 - a chain hiccup: keep the last standing, retry next round
                logger.warning("reading this provider's standing on chain failed: %s", error)
            with contextlib.suppress(TimeoutError):  # the interval passed: settle
                await asyncio.wait_for(self._stop.wait(), self.setup.settle_interval_s)
            try:
                await self.settle_now()
            except Exception:  # noqa: BLE001 - the chain may be briefly unreachable; retry next round
                logger.exception("settlement round failed")

    def _read_standing(self) -> dict:
        with self.chain_lock:
            status = self.ledger.provider_status(self.keypair.ss58_address)
        return {
            "state": status.state.value,
            "stake": status.stake,
            "slashes": len(status.slashes),
            "open_slashes": len(status.open_slashes),
            "unbond_ready_at": status.unbond_ready_at,
            "routable": status.routing_refusal(0) is None,
            "refusal": status.routing_refusal(0),
        }

    def info(self) -> dict:
        """Fields for rpc_info: who gets paid and the receipt counters."""
        counts = self.store.counts()
        return {
            "billing": {
                "account": self.keypair.ss58_address,
                "network": self.network,
                "receipts": {state.value: n for state, n in counts.items()},
                "accepted": self.receipts_accepted,
                "rejected": self.receipts_rejected,
                **({"credit": self.credit.info()} if self.credit is not None else {}),
            }
        }

    # --- the RPC -------------------------------------------------------------------------------

    async def rpc_receipt(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            metadata = protocol.unpack_metadata(request.metadata)
            op = protocol.get_field(metadata, "op", str)
            if op == "propose":
                reply = self._propose(metadata, await self._expiry())
            elif op == "deliver":
                reply = await self._deliver(metadata)
            else:
                raise ProtocolError(f"unknown receipt op {op!r:.40}; expected 'propose' or 'deliver'")
            return runtime_pb2.ExpertResponse(metadata=protocol.pack_metadata(reply))
        except Exception as e:  # an RPC boundary: any failure becomes an error reply (wire_errors picks its kind)
            self.receipts_rejected += 1
            return wire_errors.reply_for(e, "receipt RPC", logger)

    async def _expiry(self) -> int:
        """expires_at for a receipt proposed now: the chain head + RECEIPT_LIFETIME_BLOCKS (NO_EXPIRY offline)."""
        if self.ledger is None:
            return NO_EXPIRY

        def head() -> int:
            with self.chain_lock:
                return int(self.ledger.substrate.get_block_number(None))

        return await asyncio.to_thread(head) + RECEIPT_LIFETIME_BLOCKS

    def _propose(self, metadata: dict, expires_at: int) -> dict:
        session = self.meters.get(protocol.get_field(metadata, "session_id", str))
        if session.pending is None:
            usage, before, after = session.meter.close_segment()
            if usage.total_tokens == 0:
                raise NothingToBillError("no work was metered in this session since its last receipt")
            m = session.meter
            session.pending = receipt_for_segment(
                network=self.network,
                session_id=m.session_id,
                sequence=session.sequence,
                model=m.model,
                start=m.start,
                end=m.end,
                params_served=m.params_served,
                rate=self.setup.rate,
                usage=usage,
                provider=self.keypair.ss58_address,
                client=session.client,
                commitment_before=before,
                commitment=after,
                issued_at=int(time.time()),
                adapter_version=session.adapter_version,
                adapter_digest=session.adapter_digest,
                dtype=self.meters.dtype,
                expires_at=expires_at,
            )
        receipt = session.pending
        return {"receipt": receipt.encode(), "provider_signature": sign_as_provider(receipt, self.keypair)}

    async def _deliver(self, metadata: dict) -> dict:
        raw = protocol.get_field(metadata, "signed", bytes)
        signed = SignedReceipt.decode(raw)
        r = signed.receipt
        try:
            session_id = r.session_id.decode()
        except UnicodeDecodeError:
            raise MalformedReceiptError("the receipt's session id is not one this peer issues") from None
        session = self.meters.get(session_id)
        receipt_id = verify_receipt(
            signed, expected_client=session.client, expected_provider=self.keypair.ss58_address, network=self.network
        )
        if self.store.has(receipt_id):
            raise ReplayedReceiptError(f"receipt {receipt_id} was already delivered")
        if session.pending is None or session.pending.encode() != r.encode():
            raise UnexpectedReceiptError(f"receipt {receipt_id} is not the receipt this peer proposed for the session")
        offer = None
        if self.ledger is not None:
            extrinsic = protocol.get_field(metadata, "settlement", bytes)
            held = (self.store.held_nonces(r.client), self.store.amounts_from(r.client))  # on the store's thread
            settlement = await asyncio.to_thread(self._check_settlement, extrinsic, r, *held)
            offer = (settlement.nonce, extrinsic)
        self.store.add(signed, expected_client=session.client, settlement=offer)
        session.pending = None
        session.sequence += 1
        if self.credit is not None:
            self.credit.receipts_changed(r.client)
        self.receipts_accepted += 1
        logger.info("receipt %s: %d planck from %s", receipt_id, r.amount, r.client)
        return {"receipt_id": receipt_id}

    def _check_settlement(
        self, extrinsic: bytes, receipt: UsageReceipt, held_nonces: set[int], held_amounts: dict[bytes, int]
    ) -> PresignedSettlement:
        """The checks of economy.presigned_settlement.check_offer: the protocol's calls only, paying all of
        this provider's receipts it marks, at a nonce with no gap this provider cannot fill, succeeding in a
        dry run."""
        with self.chain_lock:
            return check_offer(self.ledger, extrinsic, receipt, held_nonces, held_amounts)


def billing_setup(
    chain_key: str | None,
    chain_url: str | None,
    receipts_path: Path | None,
    rate: int,
    settle_interval_s: float,
    ss58_format: int = 42,
) -> BillingSetup | None:
    """The peer's billing setup from its config, or None when it has no chain key (serves for free)."""
    if not chain_key:
        return None
    keypair = load_keypair(chain_key, ss58_format)
    path = receipts_path or Path.home() / ".dllm" / f"receipts-{keypair.ss58_address}.sqlite3"
    return BillingSetup(keypair, path, chain_url, ProviderRate.from_advertised(rate), settle_interval_s)

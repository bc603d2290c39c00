"""Sign and submit extrinsics; turn every failure into a specific exception."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from scalecodec.base import ScaleBytes
from scalecodec.types import GenericCall, GenericExtrinsic
from substrateinterface import ExtrinsicReceipt, Keypair, SubstrateInterface
from substrateinterface.exceptions import SubstrateRequestException

from chain.errors import (
    DispatchError,
    ExtrinsicRejectedError,
    InsufficientBalanceError,
    InvalidSignatureError,
    UnknownAccountError,
)
from chain.records import ChainEvent, ChainResult

logger = logging.getLogger(__name__)

_BALANCE_ERRORS = {"InsufficientBalance", "KeepAlive", "ExistentialDeposit", "LiquidityRestrictions"}


class ExtrinsicSubmitter:
    """Submits signed extrinsics and waits for inclusion (one connection, not thread-safe)."""

    def __init__(self, substrate: SubstrateInterface) -> None:
        self.substrate = substrate

    def sign(self, signer: Keypair, call: GenericCall) -> GenericExtrinsic:
        return self.substrate.create_signed_extrinsic(call=call, keypair=signer)

    def submit(self, signer: Keypair, call: GenericCall) -> ChainResult:
        """Sign `call` with `signer`, submit it, wait for its block; raise on any failure."""
        return self.submit_extrinsic(self.sign(signer, call))

    def submit_encoded(self, extrinsic_bytes: bytes) -> ChainResult:
        """Submit an extrinsic signed elsewhere (SCALE bytes), e.g. by an offline wallet.

        Not decoded here: the node decodes and checks it, and refuses bytes that are not an extrinsic
        (ExtrinsicRejectedError); submission needs only the bytes and their hash."""
        extrinsic = self.substrate.create_scale_object("Extrinsic", data=ScaleBytes(extrinsic_bytes))
        return self.submit_extrinsic(extrinsic)

    def submit_extrinsic(self, extrinsic: GenericExtrinsic) -> ChainResult:
        try:
            submitted = self.substrate.submit_extrinsic(extrinsic, wait_for_inclusion=True)
        except SubstrateRequestException as exc:
            raise pool_rejection(exc) from exc
        receipt = self.located(submitted)
        # Reading events must happen before error checks: is_success is derived from them.
        events = tuple(
            ChainEvent(e.value["module_id"], e.value["event_id"], e.value["attributes"])
            for e in receipt.triggered_events
        )
        if not receipt.is_success:
            raise self.dispatch_failure(receipt.error_message, events, receipt.block_hash)
        return ChainResult(
            block_hash=receipt.block_hash,
            block_number=receipt.block_number,
            extrinsic_hash=receipt.extrinsic_hash,
            extrinsic_index=receipt.extrinsic_idx,
            fee=fee_paid(events),
            events=events,
        )

    def located(self, receipt: ExtrinsicReceipt) -> ExtrinsicReceipt:
        """The receipt with its block number and extrinsic index, found by hashing the block's raw extrinsics
        (substrate-interface decodes every extrinsic of the block to find the index: ~0.3 s for one
        500-receipt settlement)."""
        block = self.substrate.rpc_request("chain_getBlock", [receipt.block_hash])["result"]["block"]
        wanted = bytes.fromhex(str(receipt.extrinsic_hash).removeprefix("0x"))
        for index, raw in enumerate(block["extrinsics"]):
            if hashlib.blake2b(bytes.fromhex(raw.removeprefix("0x")), digest_size=32).digest() == wanted:
                return ExtrinsicReceipt(
                    self.substrate,
                    extrinsic_hash=receipt.extrinsic_hash,
                    block_hash=receipt.block_hash,
                    block_number=int(block["header"]["number"], 16),
                    extrinsic_idx=index,
                    finalized=receipt.finalized,
                )
        raise ExtrinsicRejectedError(f"extrinsic {receipt.extrinsic_hash} is not in block {receipt.block_hash}")

    def dispatch_failure(
        self, error: dict[str, Any] | None, events: tuple[ChainEvent, ...], block_hash: str
    ) -> Exception:
        error = error or {}
        module = self.module_of_failure(events) or error.get("type", "Runtime")
        name = error.get("name", "Unknown")
        docs = " ".join(error.get("docs") or [])
        failure = DispatchError(module, name, docs, block_hash)
        if name in _BALANCE_ERRORS:
            wrapped = InsufficientBalanceError(f"{failure} (fee paid, calls rolled back)")
            wrapped.__cause__ = failure
            return wrapped
        return failure

    def module_of_failure(self, events: tuple[ChainEvent, ...]) -> str | None:
        for event in events:
            if (event.module, event.name) != ("System", "ExtrinsicFailed"):
                continue
            err = event.attributes.get("dispatch_error", {}) if isinstance(event.attributes, dict) else {}
            module = err.get("Module") if isinstance(err, dict) else None
            if isinstance(module, dict) and "index" in module:
                return self.pallet_name(int(module["index"]))
        return None

    def pallet_name(self, index: int) -> str | None:
        for pallet in self.substrate.metadata.pallets:
            if pallet.value.get("index") == index:
                name: str = pallet.name
                return name
        return None


def fee_paid(events: tuple[ChainEvent, ...]) -> int:
    """The fee the signer really paid: its fee withdrawal minus the refund of unused weight.

    (substrate-interface's total_fee_amount counts the withdrawal before the refund.)
    """
    withdrawals = [e for e in events if (e.module, e.name) == ("Balances", "Withdraw")]
    if not withdrawals:
        return 0
    payer = withdrawals[0].attributes["who"]  # the fee is withdrawn before any call runs
    refund = sum(
        int(e.attributes["amount"])
        for e in events
        if (e.module, e.name) == ("Balances", "Deposit") and e.attributes["who"] == payer
    )
    return int(withdrawals[0].attributes["amount"]) - refund


def pool_rejection(exc: SubstrateRequestException) -> Exception:
    """Map a transaction-pool refusal (the extrinsic never entered a block) to an error type."""
    detail = exc.args[0] if exc.args else exc
    text = str(detail).lower()
    if "bad signature" in text or "badproof" in text or "bad proof" in text:
        return InvalidSignatureError(f"the chain rejected the extrinsic's signature: {detail}")
    if "inability to pay" in text or "payment" in text:
        return InsufficientBalanceError(f"the signer cannot pay the transaction fee: {detail}")
    if "unknown" in text and "account" in text:
        return UnknownAccountError(str(detail))
    return ExtrinsicRejectedError(f"the transaction pool rejected the extrinsic: {detail}")

"""Settlement extrinsics the paying client signs in advance and hands to the providers it pays.

The chain pays a receipt only from an extrinsic signed by the receipt's client (chain design: the
client's own `Utility.batch_all` of receipt markers, transfers and a record). At the end of each
session segment the client signs ONE such extrinsic for all of that segment's receipts, with an
explicit nonce and an immortal era, and gives the same bytes to every provider it pays. Any of them
(or the client) may submit it; the runtime includes it at most once (its nonce is consumed, and the
receipt markers make a second settlement of the same receipt fail), so nobody is paid twice.

A provider accepts a pre-signed settlement only after checking, here, that it is signed by the
receipt's client, is valid for the runtime now (the runtime's own `validate_transaction`: signature,
nonce not yet used, fee payable), marks the receipt, and transfers at least the receipt's amount
to the provider. Nonces: the client allocates them in sequence from its account nonce; an
extrinsic can be included only when its nonce is the account's next one, so settlement waits for
earlier ones (`SettlementNotReadyError`) instead of sitting in the pool.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chain.account_derivation import account_id
from chain.errors import EconomyError
from chain.records import Payment
from economy.receipts import UsageReceipt

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

    def check_pays(self, receipt: UsageReceipt) -> None:
        """Raises SettlementOfferError unless this extrinsic settles `receipt` in full."""
        if self.signer != account_id(receipt.client):
            raise SettlementOfferError(
                f"the settlement is signed by another account than the receipt's client {receipt.client}"
            )
        if receipt.receipt_id_bytes not in self.receipt_ids:
            raise SettlementOfferError(f"the settlement does not mark receipt {receipt.receipt_id}")
        paid = self.transfers.get(account_id(receipt.provider), 0)
        if paid < receipt.amount:
            raise SettlementOfferError(
                f"the settlement transfers {paid} planck to {receipt.provider}, "
                f"less than the receipt's {receipt.amount}"
            )


def payments_for(receipts: list[UsageReceipt]) -> list[Payment]:
    """One chain Payment per receipt (each receipt is served by exactly one provider)."""
    return [Payment.single(r.receipt_id_bytes, r.provider, r.amount) for r in receipts]


def sign_at_nonce(ledger: ComputeLedger, client: Keypair, payments: list[Payment], nonce: int) -> bytes:
    """The client's settlement extrinsic for `payments` with an explicit nonce and an immortal era."""
    call, _ = ledger.build_settlement(client, payments)
    return bytes(ledger.substrate.create_signed_extrinsic(call=call, keypair=client, nonce=nonce).data.data)


def decode_settlement(ledger: ComputeLedger, extrinsic: bytes) -> PresignedSettlement:
    """Parses a settlement extrinsic (no chain access). Raises SettlementOfferError on anything else."""
    if type(extrinsic) is not bytes or not 0 < len(extrinsic) <= 1 << 20:
        raise SettlementOfferError("a settlement must be 1 byte .. 1 MiB of SCALE-encoded extrinsic")
    from scalecodec.base import ScaleBytes  # with the ledger: a peer that does not bill never decodes one

    try:
        obj = ledger.substrate.create_scale_object("Extrinsic", data=ScaleBytes(extrinsic))
        obj.decode(check_remaining=True)
        value = obj.value
        signer = account_id(value["address"])
        nonce = int(value["nonce"])
        call = value["call"]
    except Exception as e:  # scalecodec raises many types on garbage
        raise SettlementOfferError(f"not a signed extrinsic of this chain: {type(e).__name__}: {e}") from None
    if (call.get("call_module"), call.get("call_function")) != ("Utility", "batch_all"):
        raise SettlementOfferError("a settlement must be a Utility.batch_all")
    receipt_ids: set[bytes] = set()
    transfers: dict[bytes, int] = defaultdict(int)
    for inner in call["call_args"][0]["value"]:
        name = (inner.get("call_module"), inner.get("call_function"))
        args = {a["name"]: a["value"] for a in inner.get("call_args", [])}
        if name == ("Multisig", "approve_as_multi"):
            receipt_ids.add(bytes.fromhex(str(args["call_hash"]).removeprefix("0x")))
        elif name == ("Balances", "transfer_keep_alive"):
            transfers[account_id(args["dest"])] += int(args["value"])
    return PresignedSettlement(extrinsic, signer, nonce, frozenset(receipt_ids), dict(transfers))


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


def account_nonce(ledger: ComputeLedger, ss58: str) -> int:
    """The next nonce of an account, counting transactions already in the pool."""
    return int(ledger.substrate.get_account_nonce(ss58))


def included_nonce(ledger: ComputeLedger, ss58: str) -> int:
    """The next nonce of an account after its transactions included in blocks (the pool not counted)."""
    return int(ledger.substrate.query("System", "Account", ["0x" + account_id(ss58).hex()]).value["nonce"])

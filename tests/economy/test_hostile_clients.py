"""Clients that countersign and then try not to pay, against the real dev chain and a provider's real
receipt store and settler. Each dodge ends with the provider paid in full or the settlement refused,
and no receipt is ever marked paid without its transfer on chain (docs/economy.md, "Threat model")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from substrateinterface import Keypair

from chain.ledger import ComputeLedger
from chain.records import Payment
from economy.metering import StepKind, UsageMeter
from economy.presigned_ledger import PresignedSettlementLedger, settle_round
from economy.presigned_settlement import (
    SettlementOfferError,
    account_nonce,
    check_offer,
    payments_for,
    sign_at_nonce,
)
from economy.receipt_store import ReceiptState, ReceiptStore
from economy.receipts import SignedReceipt
from economy.settlement import Settler
from tests.chain.ledger_helpers import fresh_account
from tests.economy.receipt_helpers import co_signed

pytestmark = pytest.mark.timeout(300)


def receipt(provider: Keypair, client: Keypair, sequence: int, tokens: int = 4) -> SignedReceipt:
    """A metered receipt of `tokens` prompt tokens, co-signed by both."""
    meter = UsageMeter(b"hostile-session", "tiny", 0, 4, 800_000)
    meter.record_step(StepKind.PROMPT, tokens, torch.ones(1, tokens, 8), torch.full((1, tokens, 8), 2.0))
    return co_signed(provider, client, meter, sequence=sequence, rate=10**10)


class Provider:
    """A provider's side: its receipt store, the offer checks of its receipt RPC, its settlement round."""

    def __init__(self, ledger: ComputeLedger, key: Keypair, path: Path):
        self.ledger, self.key = ledger, key
        self.store = ReceiptStore(path, provider=key.ss58_address)

    def accept(self, signed: SignedReceipt, extrinsic: bytes) -> None:
        """What the receipt RPC's deliver does: check the offer, then store receipt and settlement."""
        r = signed.receipt
        offer = check_offer(
            self.ledger, extrinsic, r, self.store.held_nonces(r.client), self.store.amounts_from(r.client)
        )
        self.store.add(signed, expected_client=r.client, settlement=(offer.nonce, extrinsic))

    def settle(self) -> None:
        settler = Settler(self.store, PresignedSettlementLedger(self.ledger, self.store))
        asyncio.run(settle_round(settler))

    def totals(self) -> dict[ReceiptState, int]:
        return {s: n for s, n in self.store.counts().items() if n}

    def balance(self) -> int:
        return self.ledger.balance(self.key.ss58_address)


@pytest.fixture
def parties(ledger, tmp_path):
    provider = Provider(ledger, fresh_account(ledger, 10**12), tmp_path / "provider.sqlite3")
    yield provider, fresh_account(ledger)
    provider.store.close()


def sign_calls(ledger: ComputeLedger, client: Keypair, calls: list, nonce: int) -> bytes:
    extrinsic = ledger.substrate.create_signed_extrinsic(call=ledger._batch(calls), keypair=client, nonce=nonce)
    return bytes(extrinsic.data.data)


def inner_calls(ledger: ComputeLedger, client: Keypair, payments: list[Payment]) -> list:
    """The inner calls of the batch_all build_settlement composes for `payments`."""
    call, _ = ledger.build_settlement(client, payments)
    return list(call.value["call_args"]["calls"])


def marker_call(ledger: ComputeLedger, receipt_id: bytes):
    """The receipt marker exactly as build_settlement composes it (a bare marker, without its transfer)."""
    return ledger._marker(receipt_id)


def test_bare_marker_without_transfer_is_never_paid(ledger, parties):
    provider, client = parties
    signed = [receipt(provider.key, client, i) for i in range(2)]
    nonce = account_nonce(ledger, client.ss58_address)
    provider.accept(signed[0], sign_at_nonce(ledger, client, payments_for([signed[0].receipt]), nonce))
    provider.accept(signed[1], sign_at_nonce(ledger, client, payments_for([signed[1].receipt]), nonce + 1))
    before = provider.balance()

    # The client spends both nonces on bare markers of the receipts: no transfer.
    for n, s in enumerate(signed):
        ledger.submit_signed(sign_calls(ledger, client, [marker_call(ledger, s.receipt.receipt_id_bytes)], nonce + n))
    ids = [s.receipt.receipt_id_bytes for s in signed]
    assert len(ledger.settled_on_chain(client.ss58_address, ids)) == 2  # marked...

    provider.settle()
    assert provider.balance() == before  # ...not paid
    assert provider.totals() == {ReceiptState.UNSETTLED: 2}  # and never counted as paid
    known = provider.store.amounts_from(client.ss58_address)
    assert ledger.paid_on_chain(client.ss58_address, provider.key.ss58_address, ids, lambda m: known) == set()


def test_future_nonce_is_refused_unless_the_provider_holds_the_gap(ledger, parties):
    provider, client = parties
    first, second = (receipt(provider.key, client, i) for i in range(2))
    nonce = account_nonce(ledger, client.ss58_address)
    later = sign_at_nonce(ledger, client, payments_for([second.receipt]), nonce + 1)
    with pytest.raises(SettlementOfferError, match="gap"):
        provider.accept(second, later)  # nothing at `nonce`: it could wait forever
    assert provider.totals() == {}

    # Two segments handed over before either is on chain: the provider holds the gap, both are accepted.
    before = provider.balance()
    provider.accept(first, sign_at_nonce(ledger, client, payments_for([first.receipt]), nonce))
    provider.accept(second, later)
    provider.settle()
    assert provider.balance() == before + first.receipt.amount + second.receipt.amount
    assert provider.totals() == {ReceiptState.SETTLED: 2}


def test_failing_inner_call_is_refused(ledger, parties):
    provider, client = parties
    signed = receipt(provider.key, client, 0)
    nonce = account_nonce(ledger, client.ss58_address)
    inner = inner_calls(ledger, client, payments_for([signed.receipt]))

    # An extra call that fails at dispatch (root only) sinks the whole batch_all: refused by its shape.
    sudo_only = ledger._call("System", "set_heap_pages", {"pages": 1})
    for calls in (inner + [sudo_only], [inner[0], sudo_only, *inner[1:]]):
        with pytest.raises(SettlementOfferError, match="not one a settlement holds"):
            provider.accept(signed, sign_calls(ledger, client, calls, nonce))

    # Only the protocol's calls, but one fails at dispatch: by the time it is offered, another settlement of
    # the client has marked one of its receipts (approve_as_multi: AlreadyApproved sinks the batch_all).
    other = receipt(provider.key, client, 1)
    both = sign_at_nonce(ledger, client, payments_for([signed.receipt, other.receipt]), nonce + 1)
    ledger.submit_signed(sign_at_nonce(ledger, client, payments_for([other.receipt]), nonce))
    with pytest.raises(SettlementOfferError, match="dispatch"):
        provider.accept(signed, both)
    assert provider.totals() == {}


def test_several_receipts_of_one_provider_underpaid(ledger, parties):
    provider, client = parties
    small, large = receipt(provider.key, client, 0, tokens=2), receipt(provider.key, client, 1, tokens=6)
    assert small.receipt.amount < large.receipt.amount
    nonce = account_nonce(ledger, client.ss58_address)
    # One settlement marks both, records the small one at 0 and transfers only the largest amount.
    payments = [
        Payment.single(large.receipt.receipt_id_bytes, provider.key.ss58_address, large.receipt.amount),
        Payment.single(small.receipt.receipt_id_bytes, provider.key.ss58_address, 1),
    ]
    underpaying = sign_calls(ledger, client, inner_calls(ledger, client, payments), nonce)
    provider.accept(large, underpaying)  # alone, the large receipt is covered
    with pytest.raises(SettlementOfferError, match="less than"):
        provider.accept(small, underpaying)  # with the large one held, both are not

    # The client front-runs an honest settlement of both with the underpaying one: the chain holds both
    # markers and the largest amount; neither receipt counts as paid.
    provider.accept(small, sign_at_nonce(ledger, client, payments_for([small.receipt]), nonce + 1))
    before = provider.balance()
    ledger.submit_signed(underpaying)
    provider.settle()
    assert provider.balance() == before + large.receipt.amount + 1
    assert provider.totals() == {ReceiptState.UNSETTLED: 2}


def test_replayed_settlement_is_refused(ledger, parties):
    provider, client = parties
    signed = receipt(provider.key, client, 0)
    nonce = account_nonce(ledger, client.ss58_address)
    extrinsic = sign_at_nonce(ledger, client, payments_for([signed.receipt]), nonce)
    ledger.submit_signed(extrinsic)
    with pytest.raises(SettlementOfferError, match="already used"):
        provider.accept(signed, extrinsic)  # an included settlement, handed over again
    later = receipt(provider.key, client, 1)
    with pytest.raises(SettlementOfferError, match="does not mark"):
        provider.accept(later, extrinsic)  # the old settlement offered for new work
    assert provider.totals() == {}

"""Bounded settlement cost, against the real dev chain: receipts expire, no settlement of an expired receipt
is valid (the client refuses to sign one, the provider refuses the offer, the runtime refuses the extrinsic
once its era has ended), and releasing the markers of expired receipts returns the client's reserved
deposit without opening a second payment (docs/chain.md, "Bounded settlement cost")."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from substrateinterface import Keypair

from chain.errors import ChainError
from chain.ledger import ComputeLedger
from economy.metering import StepKind, UsageMeter
from economy.presigned_ledger import PresignedSettlementLedger, settle_round
from economy.presigned_settlement import (
    SettlementOfferError,
    account_nonce,
    check_offer,
    payments_for,
    release_expired_markers,
    sign_at_nonce,
)
from economy.receipt_store import ReceiptState, ReceiptStore
from economy.receipts import (
    SETTLEMENT_MARGIN_BLOCKS,
    ExpiredReceiptError,
    SignedReceipt,
    UsageReceipt,
    check_expiry,
)
from economy.settlement import Settler
from tests.chain.ledger_helpers import account_state, fresh_account
from tests.economy.receipt_helpers import co_signed

pytestmark = pytest.mark.timeout(300)

LIFETIME = 40  # blocks: a test-sized lifetime (the protocol's is RECEIPT_LIFETIME_BLOCKS)


def head(ledger: ComputeLedger) -> int:
    return int(ledger.substrate.get_block_number(None))


def receipt(provider: Keypair, client: Keypair, sequence: int, expires_at: int) -> SignedReceipt:
    meter = UsageMeter(b"expiry-session", "tiny", 0, 4, 800_000)
    meter.record_step(StepKind.PROMPT, 4, torch.ones(1, 4, 8), torch.full((1, 4, 8), 2.0))
    return co_signed(provider, client, meter, sequence=sequence, rate=10**10, expires_at=expires_at)


def sign(ledger: ComputeLedger, client: Keypair, receipts: list[UsageReceipt], nonce: int) -> bytes:
    return sign_at_nonce(ledger, client, payments_for(receipts), nonce, min(r.expires_at for r in receipts))


def offer(ledger: ComputeLedger, store: ReceiptStore, extrinsic: bytes, signed: SignedReceipt) -> None:
    r = signed.receipt
    settlement = check_offer(ledger, extrinsic, r, store.held_nonces(r.client), store.amounts_from(r.client))
    store.add(signed, expected_client=r.client, settlement=(settlement.nonce, extrinsic))


def test_client_refuses_an_expiry_beyond_the_lifetime_and_an_expiring_receipt(ledger):
    provider, client = fresh_account(ledger, 0), fresh_account(ledger, 0)
    now = head(ledger)
    check_expiry(receipt(provider, client, 0, now + 2048).receipt, now, proposed=True)
    with pytest.raises(ExpiredReceiptError, match="at most"):  # a far expiry would lock its marker longer
        check_expiry(receipt(provider, client, 0, now + 10_000).receipt, now, proposed=True)
    with pytest.raises(ExpiredReceiptError, match="no settlement"):
        check_expiry(receipt(provider, client, 0, now + SETTLEMENT_MARGIN_BLOCKS - 1).receipt, now)


def test_a_receipt_past_expiry_cannot_be_settled(ledger, dev_chain, tmp_path: Path):
    provider, client = fresh_account(ledger), fresh_account(ledger)
    store = ReceiptStore(tmp_path / "provider.db", provider=provider.ss58_address)
    signed = receipt(provider, client, 0, head(ledger) + LIFETIME)
    nonce = account_nonce(ledger, client.ss58_address)
    extrinsic = sign(ledger, client, [signed.receipt], nonce)
    check_offer(ledger, extrinsic, signed.receipt, set(), {})  # valid while the receipt is fresh

    dev_chain.new_blocks(LIFETIME - SETTLEMENT_MARGIN_BLOCKS + 1)
    with pytest.raises(ExpiredReceiptError):  # the client refuses to sign
        sign(ledger, client, [signed.receipt], nonce)
    with pytest.raises(SettlementOfferError, match="no settlement of this receipt"):  # the provider refuses
        offer(ledger, store, extrinsic, signed)
    dev_chain.new_blocks(SETTLEMENT_MARGIN_BLOCKS)
    before = account_state(ledger, client)
    with pytest.raises(ChainError):  # the era ended: the runtime refuses the bytes signed before expiry
        ledger.submit_signed(extrinsic)
    assert account_state(ledger, client) == before
    assert not ledger.settled_on_chain(client.ss58_address, [signed.receipt.receipt_id_bytes])
    store.close()


def test_released_markers_return_the_deposit_and_never_allow_a_second_payment(ledger, dev_chain, tmp_path: Path):
    provider, client = fresh_account(ledger), fresh_account(ledger)
    store = ReceiptStore(tmp_path / "provider.db", provider=provider.ss58_address)
    reserved_before = account_state(ledger, client)[2]
    expires_at = head(ledger) + LIFETIME
    receipts = [receipt(provider, client, seq, expires_at) for seq in range(3)]
    nonce = account_nonce(ledger, client.ss58_address)
    first = sign(ledger, client, [s.receipt for s in receipts], nonce)
    # A second settlement of receipt 0, signed before the first landed (no marker yet): what a provider that
    # wants to be paid twice would hold, and what the marker stops until the receipt expires.
    second = sign(ledger, client, [receipts[0].receipt], nonce + 1)
    for s in receipts:
        offer(ledger, store, first, s)
    settler = Settler(store, PresignedSettlementLedger(ledger, store))
    asyncio.run(settle_round(settler))
    assert store.counts()[ReceiptState.SETTLED] == 3
    deposit = int(ledger.substrate.get_constant("Multisig", "DepositBase").value) + 2 * int(
        ledger.substrate.get_constant("Multisig", "DepositFactor").value
    )
    assert account_state(ledger, client)[2] == reserved_before + 3 * deposit
    with pytest.raises(ChainError):  # while the marker stands, the runtime refuses the second payment
        ledger.submit_signed(second)

    marked_at = ledger.open_markers(client.ss58_address)[receipts[0].receipt.receipt_id_bytes][0]
    assert release_expired_markers(ledger, client, after_blocks=LIFETIME + 1) == []  # not expired yet: kept
    dev_chain.new_blocks(marked_at + LIFETIME + 1 - head(ledger))
    assert head(ledger) > expires_at  # the rule releases only markers of receipts past their expiry
    released = release_expired_markers(ledger, client, after_blocks=LIFETIME + 1)
    assert sorted(released) == sorted(s.receipt.receipt_id_bytes for s in receipts)
    assert account_state(ledger, client)[2] == reserved_before  # the deposit is back
    assert ledger.open_markers(client.ss58_address) == {}

    # The second payment of a released receipt: refused by the client, the provider and the runtime.
    with pytest.raises(ExpiredReceiptError):
        sign(ledger, client, [receipts[0].receipt], account_nonce(ledger, client.ss58_address))
    with pytest.raises(SettlementOfferError):
        check_offer(ledger, second, receipts[0].receipt, set(), {})
    free_before = account_state(ledger, client)[1]
    with pytest.raises(ChainError):
        ledger.submit_signed(second)
    assert account_state(ledger, client)[1] == free_before
    # The provider's store keeps what it confirmed: a released marker does not make a paid receipt unpaid.
    asyncio.run(settler.reconcile())
    assert store.counts()[ReceiptState.SETTLED] == 3
    store.close()


def test_cli_releases_only_markers_of_expired_receipts(ledger, dev_chain):
    """`dllm chain release-markers` with the protocol's rule: fresh markers stay (their receipts have not expired)."""
    provider = fresh_account(ledger, 0)
    uri = f"//dllm-test-cli-{time.time_ns()}"
    client = Keypair.create_from_uri(uri, ss58_format=ledger.ss58_format)
    ledger.submitter.submit(
        fresh_account(ledger),
        ledger.substrate.compose_call(
            "Balances", "transfer_keep_alive", {"dest": client.ss58_address, "value": 10**14}
        ),
    )
    signed = receipt(provider, client, 0, head(ledger) + LIFETIME)
    ledger.submit_signed(sign(ledger, client, [signed.receipt], account_nonce(ledger, client.ss58_address)))
    command = [sys.executable, "-m", "dllm.cli", "chain", "release-markers", "--chain-url", dev_chain.url]
    done = subprocess.run([*command, "--chain-key", uri], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "released 0 markers of expired receipts; 1 stay open" in done.stdout
    assert list(ledger.open_markers(client.ss58_address)) == [signed.receipt.receipt_id_bytes]

"""Bad input gets a specific error and leaves the chain state unchanged."""

from __future__ import annotations

import pytest

from chain.account_derivation import RECEIPT_REGISTRY_ACCOUNT
from chain.devchain.dev_accounts import dev_keypair
from chain.errors import (
    DispatchError,
    DoubleSettlementError,
    InsufficientBalanceError,
    InsufficientStakeError,
    InvalidAddressError,
    InvalidSignatureError,
    NotRegisteredError,
    QuorumError,
    UnknownAccountError,
)
from chain.records import Payment
from tests.chain.ledger_helpers import UNIT, account_state, council_keys, fresh_account, h

pytestmark = pytest.mark.timeout(240)


def test_unknown_account_cannot_register(ledger):
    ghost = fresh_account(ledger, funds=0)
    before = account_state(ledger, ghost)
    with pytest.raises(UnknownAccountError, match="does not exist"):
        ledger.register_provider(ghost, 5 * UNIT)
    assert account_state(ledger, ghost) == before == (0, 0, 0)


def test_insufficient_balance_pays_nothing(ledger):
    client, provider = fresh_account(ledger, funds=2 * UNIT), fresh_account(ledger)
    before = account_state(ledger, client), account_state(ledger, provider)
    with pytest.raises(InsufficientBalanceError, match="spendable"):
        ledger.settle(client, [Payment.single(h(f"{client.ss58_address}-big"), provider.ss58_address, 10 * UNIT)])
    assert (account_state(ledger, client), account_state(ledger, provider)) == before
    assert not ledger.is_settled(h(f"{client.ss58_address}-big"), client.ss58_address)


def test_insufficient_stake_is_refused(ledger):
    provider = fresh_account(ledger)
    before = account_state(ledger, provider)
    with pytest.raises(InsufficientStakeError, match="at least"):
        ledger.register_provider(provider, ledger.config.min_stake - 1)
    assert account_state(ledger, provider) == before
    ledger.register_provider(provider, 3 * UNIT)
    escrow = ledger.escrow_of(provider.ss58_address)
    escrow_before = account_state(ledger, escrow)
    with pytest.raises(InsufficientStakeError, match="staked"):
        ledger.slash(list(council_keys(ledger)), provider.ss58_address, 4 * UNIT, h("too-much"))
    with pytest.raises(NotRegisteredError):
        ledger.slash(list(council_keys(ledger)), fresh_account(ledger, funds=0).ss58_address, UNIT, h("x"))
    assert account_state(ledger, escrow) == escrow_before


def test_tampered_signature_is_rejected_by_the_runtime(ledger):
    client, provider = fresh_account(ledger), fresh_account(ledger)
    receipt = h(f"{client.ss58_address}-signed")
    signed = ledger.sign_settlement(client, [Payment.single(receipt, provider.ss58_address, UNIT)])
    # Layout: compact length, version byte, MultiAddress (0x00 + 32 bytes), MultiSignature (type + 64 bytes).
    width = {0: 1, 1: 2, 2: 4}[signed[0] & 0b11]
    signature_at = width + 1 + 33 + 1
    tampered = bytearray(signed)
    tampered[signature_at + 7] ^= 0xFF
    before = account_state(ledger, client), account_state(ledger, provider)
    with pytest.raises(InvalidSignatureError):
        ledger.submit_signed(bytes(tampered))
    assert (account_state(ledger, client), account_state(ledger, provider)) == before
    # The untouched bytes are a valid settlement: only the tampering made it fail.
    ledger.submit_signed(signed)
    assert ledger.is_settled(receipt, client.ss58_address)


def test_double_settlement_is_refused_by_client_and_runtime(ledger):
    client, provider = fresh_account(ledger), fresh_account(ledger)
    receipt = h(f"{client.ss58_address}-once")
    ledger.settle(client, [Payment.single(receipt, provider.ss58_address, UNIT)])
    before = account_state(ledger, client), account_state(ledger, provider)
    with pytest.raises(DoubleSettlementError) as refused:
        ledger.settle(
            client,
            [
                Payment.single(h("fresh-one" + client.ss58_address), provider.ss58_address, UNIT),
                Payment.single(receipt, provider.ss58_address, UNIT),
            ],
        )
    assert refused.value.receipt_ids == [receipt]
    assert (account_state(ledger, client), account_state(ledger, provider)) == before
    # A client that skips the check: the runtime itself rejects the replayed marker, so the
    # transfer in the same batch_all is rolled back (only the fee is charged).
    marker = ledger.substrate.compose_call(
        "Multisig",
        "approve_as_multi",
        {
            "threshold": 2,
            "other_signatories": ["0x" + RECEIPT_REGISTRY_ACCOUNT.hex()],
            "maybe_timepoint": None,
            "call_hash": "0x" + receipt.hex(),
            "max_weight": 0,
        },
    )
    pay = ledger.substrate.compose_call(
        "Balances", "transfer_keep_alive", {"dest": provider.ss58_address, "value": UNIT}
    )
    with pytest.raises(DispatchError) as failed:
        ledger.submitter.submit(client, ledger.substrate.compose_call("Utility", "batch_all", {"calls": [marker, pay]}))
    assert (failed.value.module, failed.value.name) == ("Multisig", "NoTimepoint")
    assert account_state(ledger, provider) == before[1]
    assert len(ledger.settlement_history(client_ss58=client.ss58_address)) == 1


def test_slash_without_quorum_changes_nothing(ledger):
    provider = fresh_account(ledger)
    ledger.register_provider(provider, 10 * UNIT)
    escrow = ledger.escrow_of(provider.ss58_address)
    alice, bob, _ = council_keys(ledger)
    dave = dev_keypair("Dave", ledger.ss58_format)
    before = account_state(ledger, escrow), account_state(ledger, alice)
    for signers in ([alice], [alice, alice], [alice, dave], [provider, alice]):
        with pytest.raises(QuorumError):
            ledger.slash(signers, provider.ss58_address, UNIT, h("no-quorum"))
    assert (account_state(ledger, escrow), account_state(ledger, alice)) == before
    # On chain too: one approval alone opens an operation but moves nothing.
    move = ledger._from_escrow(
        provider.public_key,
        ledger.substrate.compose_call("Balances", "transfer", {"dest": alice.ss58_address, "value": UNIT}),
    )
    from chain.account_derivation import blake2_256

    others = ["0x" + m.hex() for m in sorted(ledger.config.council.member_ids()) if m != alice.public_key]
    call_hash = "0x" + blake2_256(move.data.data).hex()
    opened = ledger.submitter.submit(
        alice,
        ledger.substrate.compose_call(
            "Multisig",
            "approve_as_multi",
            {
                "threshold": 2,
                "other_signatories": others,
                "maybe_timepoint": None,
                "call_hash": call_hash,
                "max_weight": 0,
            },
        ),
    )
    assert opened.find("Multisig", "NewMultisig") and account_state(ledger, escrow) == before[0]
    ledger.submitter.submit(
        alice,
        ledger.substrate.compose_call(
            "Multisig",
            "cancel_as_multi",
            {
                "threshold": 2,
                "other_signatories": others,
                "call_hash": call_hash,
                "timepoint": {"height": opened.block_number, "index": opened.extrinsic_index},
            },
        ),
    )
    assert account_state(ledger, escrow) == before[0]


def test_bad_addresses_and_receipts(ledger):
    client = fresh_account(ledger)
    with pytest.raises(InvalidAddressError):
        ledger.settle(client, [Payment.single(h("addr" + client.ss58_address), "5NotAnAddress", UNIT)])
    with pytest.raises(InvalidAddressError):
        ledger.provider_status("garbage")
    with pytest.raises(ValueError):
        ledger.record_compute(client, b"short", 1, 1)

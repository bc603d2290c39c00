"""Every ledger operation end to end on the real runtime, checking balances and events."""

from __future__ import annotations

import pytest

from chain.account_derivation import BURN_ACCOUNT
from chain.ledger import ComputeLedger
from chain.records import Payment, ProviderShare, ProviderState
from tests.chain.ledger_helpers import UNIT, council_keys, fresh_account, h

pytestmark = pytest.mark.timeout(240)


def test_register_bonds_stake_into_an_escrow_only_the_council_controls(ledger):
    provider = fresh_account(ledger)
    before = ledger.balance(provider.ss58_address)
    result = ledger.register_provider(provider, 100 * UNIT)
    escrow = ledger.escrow_of(provider.ss58_address)
    [transfer] = result.find("Balances", "Transfer")
    assert transfer.attributes == {"from": provider.ss58_address, "to": escrow, "amount": 100 * UNIT}
    assert result.find("System", "Remarked")[0].attributes["sender"] == provider.ss58_address
    assert ledger.balance(provider.ss58_address) == before - 100 * UNIT - result.fee
    status = ledger.provider_status(provider.ss58_address)
    assert status.state is ProviderState.REGISTERED and status.stake == 100 * UNIT
    assert status.registered_at == result.block_number and status.escrow == escrow


def test_self_reported_compute_is_kept_apart_and_never_totalled(ledger):
    provider = fresh_account(ledger)
    ledger.register_provider(provider, 10 * UNIT)
    ledger.record_compute(provider, h("receipts-a"), tokens_x_params=1_000_000, requests=4)
    result = ledger.record_compute(provider, h("receipts-b"), tokens_x_params=500, requests=1)
    totals = ledger.compute_ledger(provider.ss58_address)
    assert (totals.tokens_x_params, totals.requests, totals.records) == (0, 0, ())
    assert [r.receipts_hash for r in totals.claimed] == [h("receipts-a"), h("receipts-b")]
    assert [r.tokens_x_params for r in totals.claimed] == [1_000_000, 500]
    assert totals.claimed[-1].block_number == result.block_number


def test_settlement_records_the_compute_of_each_paid_receipt(ledger):
    client, p1, p2 = fresh_account(ledger), fresh_account(ledger), fresh_account(ledger)
    tag = client.ss58_address
    split = Payment(
        h(f"{tag}-split"),
        4 * UNIT,
        (ProviderShare(p1.ss58_address, 3_000), ProviderShare(p2.ss58_address, 1_000)),
        tokens=12,
        requests=1,
    )
    second_segment = Payment.single(h(f"{tag}-seg"), p2.ss58_address, 7, params_served=5_000, tokens=30, requests=0)
    result = ledger.settle(client, [split, second_segment])
    one = ledger.compute_ledger(p1.ss58_address)
    two = ledger.compute_ledger(p2.ss58_address)
    assert (one.tokens_x_params, one.requests) == (12 * 3_000, 1)
    assert (two.tokens_x_params, two.requests) == (12 * 1_000 + 30 * 5_000, 1)
    assert [r.receipts_hash for r in two.records] == [split.receipt_id, second_segment.receipt_id]
    assert {r.block_number for r in two.records} == {result.block_number} and two.claimed == ()
    # A fresh index (any client) reads the same totals back from the chain.
    with ComputeLedger(ledger.config.url) as other:
        assert other.compute_ledger(p2.ss58_address).tokens_x_params == two.tokens_x_params


def test_settle_pays_pro_rata_in_one_batch_and_each_receipt_once(ledger):
    client, p1, p2 = fresh_account(ledger), fresh_account(ledger), fresh_account(ledger)
    tag = client.ss58_address
    payments = [
        Payment(
            h(f"{tag}-r{i}"), 4 * UNIT, (ProviderShare(p1.ss58_address, 3_000), ProviderShare(p2.ss58_address, 1_000))
        )
        for i in range(20)
    ] + [Payment.single(h(f"{tag}-solo"), p2.ss58_address, 7)]
    balances = {kp.ss58_address: ledger.balance(kp.ss58_address) for kp in (client, p1, p2)}
    result = ledger.settle(client, payments)
    assert ledger.balance(p1.ss58_address) - balances[p1.ss58_address] == 60 * UNIT
    assert ledger.balance(p2.ss58_address) - balances[p2.ss58_address] == 20 * UNIT + 7
    # The client pays the amounts and the fee; marker deposits are reserved, not spent.
    assert balances[client.ss58_address] - ledger.balance(client.ss58_address) - result.fee == (
        80 * UNIT + 7 + ledger.substrate.query("System", "Account", [client.ss58_address]).value["data"]["reserved"]
    )
    assert len(result.find("Multisig", "NewMultisig")) == 21
    assert all(ledger.is_settled(p.receipt_id, client.ss58_address) for p in payments)
    assert ledger.is_settled(payments[0].receipt_id) and not ledger.is_settled(h("never-paid"))
    history = ledger.settlement_history(client_ss58=client.ss58_address)
    assert [s.receipt_id for s in history] == [p.receipt_id for p in payments]
    assert dict(history[0].payouts) == {p1.ss58_address: 3 * UNIT, p2.ss58_address: 1 * UNIT}
    assert len(ledger.settlement_history(provider_ss58=p1.ss58_address)) == 20


def test_slash_by_council_quorum_moves_stake_with_evidence_on_chain(ledger):
    provider = fresh_account(ledger)
    ledger.register_provider(provider, 50 * UNIT)
    escrow = ledger.escrow_of(provider.ss58_address)
    burn = ledger.address(BURN_ACCOUNT)
    burn_before = ledger.balance(burn)
    alice, bob, charlie = council_keys(ledger)
    result = ledger.slash([alice, charlie], provider.ss58_address, 20 * UNIT, h("evidence-1"))
    [transfer] = result.find("Balances", "Transfer")
    assert transfer.attributes == {"from": escrow, "to": burn, "amount": 20 * UNIT}
    [executed] = result.find("Multisig", "MultisigExecuted")
    assert executed.attributes["result"] == {"Ok": ()}
    assert ledger.balance(burn) - burn_before == 20 * UNIT
    status = ledger.provider_status(provider.ss58_address)
    assert status.stake == 30 * UNIT
    assert [(s.amount, s.evidence_hash) for s in status.slashes] == [(20 * UNIT, h("evidence-1"))]
    # Slashing the rest (amount=None) empties the escrow, even to another beneficiary.
    ledger.slash([bob, alice], provider.ss58_address, None, h("evidence-2"), beneficiary_ss58=charlie.ss58_address)
    assert ledger.provider_status(provider.ss58_address).stake == 0


def test_unbond_needs_the_delay_and_the_council(ledger, dev_chain):
    from chain.errors import UnbondNotReadyError

    provider = fresh_account(ledger)
    ledger.register_provider(provider, 25 * UNIT)
    council = list(council_keys(ledger))
    with pytest.raises(UnbondNotReadyError):
        ledger.unbond(council, provider.ss58_address)  # no request yet
    ledger.request_unbond(provider)
    status = ledger.provider_status(provider.ss58_address)
    assert status.state is ProviderState.UNBONDING
    with pytest.raises(UnbondNotReadyError, match="possible from block"):
        ledger.unbond(council, provider.ss58_address)
    dev_chain.new_blocks(ledger.config.unbond_delay_blocks)
    before = ledger.balance(provider.ss58_address)
    result = ledger.unbond(council[1:], provider.ss58_address)
    [transfer] = result.find("Balances", "Transfer")
    assert transfer.attributes["to"] == provider.ss58_address and transfer.attributes["amount"] == 25 * UNIT
    assert ledger.balance(provider.ss58_address) == before + 25 * UNIT
    after = ledger.provider_status(provider.ss58_address)
    assert after.state is ProviderState.UNBONDED and after.stake == 0
    ledger.register_provider(provider, 5 * UNIT)  # may register again
    assert ledger.provider_status(provider.ss58_address).state is ProviderState.REGISTERED


def test_a_fresh_client_rebuilds_the_same_history_from_the_chain(ledger, dev_chain):
    from chain.ledger import ComputeLedger

    client, provider = fresh_account(ledger), fresh_account(ledger)
    ledger.settle(client, [Payment.single(h(f"{client.ss58_address}-x"), provider.ss58_address, UNIT)])
    with ComputeLedger(dev_chain.url) as other:
        assert other.settlement_history(client_ss58=client.ss58_address) == ledger.settlement_history(
            client_ss58=client.ss58_address
        )

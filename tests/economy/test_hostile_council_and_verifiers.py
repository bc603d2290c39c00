"""Stake that matters, on the real dev chain with real peers: providers that never registered, are unbonding or
were slashed get no routes and no payments from a client with a min_stake; a registered one does. The council's
unbond waits for the delay and for every slash a member opened; slashing stays possible during the delay.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from hivemind.proto import runtime_pb2

from chain.account_derivation import account_id
from chain.errors import QuorumError, SlashPendingError, UnbondNotReadyError
from chain.records import ProviderState
from swarm import protocol
from swarm.billing import BillingConfig
from swarm.client import ClientConfig, DistributedModel, GenerationParams
from swarm.routing import BanList, NoRouteError
from tests.chain.ledger_helpers import council_keys, fresh_account
from tests.economy.swarm_economy import UNIT, funded_key, start_billing_peer, total_balance, wait_until

pytestmark = pytest.mark.timeout(600)

RATE = 10**10
STAKE_UNITS = 5


def _evidence(label: str) -> bytes:
    return hashlib.blake2b(label.encode(), digest_size=32).digest()


def test_one_council_key_alone_cannot_slash(ledger):
    provider = fresh_account(ledger)
    ledger.register_provider(provider, STAKE_UNITS * UNIT)
    alice, _, _ = council_keys(ledger)
    with pytest.raises(QuorumError):
        ledger.slash([alice], provider.ss58_address, UNIT, _evidence("alone"))
    # Alice's own open proposal does not let her finish it alone either: a second member must sign.
    ledger.propose_slash(alice, provider.ss58_address, UNIT, _evidence("alone"))
    with pytest.raises(QuorumError):
        ledger.slash([alice], provider.ss58_address, UNIT, _evidence("alone"))
    assert ledger.provider_status(provider.ss58_address).stake == STAKE_UNITS * UNIT


def test_unbond_waits_for_the_delay_and_every_pending_slash(ledger, dev_chain):
    provider = fresh_account(ledger)
    ledger.register_provider(provider, STAKE_UNITS * UNIT)
    alice, bob, charlie = council_keys(ledger)
    requested = ledger.request_unbond(provider)
    status = ledger.provider_status(provider.ss58_address)
    assert status.state is ProviderState.UNBONDING and status.routing_refusal(0).startswith("unbonding since block")
    assert status.unbond_ready_at == requested.block_number + ledger.config.unbond_delay_blocks
    with pytest.raises(UnbondNotReadyError, match="possible from block"):  # the delay first
        ledger.unbond([alice, bob], provider.ss58_address)

    # A verifier's verdict reached a council member, who opens the slash: the unbond must wait for it.
    call_hash = ledger.propose_slash(charlie, provider.ss58_address, 2 * UNIT, _evidence("wrong outputs"))
    assert ledger.provider_status(provider.ss58_address).open_slashes == (call_hash,)
    dev_chain.new_blocks(ledger.config.unbond_delay_blocks)
    before = total_balance(ledger, provider.ss58_address)
    with pytest.raises(SlashPendingError, match="slash"):
        ledger.unbond([alice, bob], provider.ss58_address)
    assert ledger.provider_status(provider.ss58_address).stake == STAKE_UNITS * UNIT
    assert total_balance(ledger, provider.ss58_address) == before

    # Slashing during the delay: one more member completes Charlie's proposal.
    ledger.slash([alice], provider.ss58_address, 2 * UNIT, _evidence("wrong outputs"))
    status = ledger.provider_status(provider.ss58_address)
    assert status.state is ProviderState.UNBONDING and status.open_slashes == ()
    assert status.stake == (STAKE_UNITS - 2) * UNIT and [s.amount for s in status.slashes] == [2 * UNIT]

    # Nothing pending any more: the council returns what is left, and only that.
    ledger.unbond([alice, bob], provider.ss58_address)
    assert ledger.provider_status(provider.ss58_address).state is ProviderState.UNBONDED
    assert total_balance(ledger, provider.ss58_address) == before + (STAKE_UNITS - 2) * UNIT


def test_a_proposal_nobody_joins_holds_the_unbond_only_for_the_councils_hold(ledger, dev_chain):
    """Attack: one member opens a slash the others refuse to join, to trap an honest provider's stake forever."""
    provider, serving = fresh_account(ledger), fresh_account(ledger)
    for kp in (provider, serving):
        ledger.register_provider(kp, STAKE_UNITS * UNIT)
    alice, bob, charlie = council_keys(ledger)
    ledger.propose_slash(charlie, serving.ss58_address, 2 * UNIT, _evidence("made up too"))
    call_hash = ledger.propose_slash(charlie, provider.ss58_address, 2 * UNIT, _evidence("made up"))
    opened = ledger.substrate.get_block_number(None)
    assert "pending in the council" in (ledger.provider_status(serving.ss58_address).routing_refusal(0) or "")
    ledger.request_unbond(provider)
    dev_chain.new_blocks(ledger.config.unbond_delay_blocks)
    status = ledger.provider_status(provider.ss58_address)
    assert status.open_slashes == (call_hash,) and status.slash_hold_until == opened + ledger.config.slash_hold_blocks
    with pytest.raises(SlashPendingError, match="hold ends"):  # the others still have time to re-check and join
        ledger.unbond([alice, bob], provider.ss58_address)

    dev_chain.new_blocks(max(0, status.slash_hold_until + 1 - ledger.substrate.get_block_number(None)))
    before = total_balance(ledger, provider.ss58_address)
    ledger.unbond([alice, bob], provider.ss58_address)  # nobody joined in time: the stake goes back whole
    assert ledger.provider_status(provider.ss58_address).state is ProviderState.UNBONDED
    assert total_balance(ledger, provider.ss58_address) == before + STAKE_UNITS * UNIT
    assert ledger.provider_status(serving.ss58_address).routing_refusal(0) is None  # routes again too


def test_dllm_peer_unbond_starts_the_delay(ledger, dev_chain):
    uri, provider = funded_key(ledger)
    ledger.register_provider(provider, STAKE_UNITS * UNIT)
    done = subprocess.run(
        [sys.executable, "-m", "dllm.cli", "peer", "unbond", "--chain-url", dev_chain.url, "--chain-key", uri],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    status = ledger.provider_status(provider.ss58_address)
    assert status.state is ProviderState.UNBONDING and status.stake == STAKE_UNITS * UNIT
    assert f"from block {status.unbond_ready_at}" in done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "dllm.cli", "peer", "unbond", "--chain-url", dev_chain.url, "--chain-key", uri],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1 and "cannot request an unbond: unbonding" in again.stderr


def test_unregistered_unbonding_and_slashed_providers_get_no_routes_nor_payments(
    dev_chain, ledger, local_swarm, tmp_path
):
    url = dev_chain.url
    keys = {name: funded_key(ledger) for name in ("registered", "unregistered", "unbonding", "slashed")}
    stakes = {"registered": STAKE_UNITS, "unregistered": 0, "unbonding": STAKE_UNITS, "slashed": STAKE_UNITS}
    procs = {
        name: start_billing_peer(
            local_swarm, "0:8", uri, url, tmp_path / f"{name}.sqlite3", rate=RATE, stake_units=stakes[name], wait=False
        )
        for name, (uri, _) in keys.items()
    }
    for proc in procs.values():
        local_swarm.wait_ready(proc, timeout=120)
    accounts = {name: kp.ss58_address for name, (_, kp) in keys.items()}
    ledger.request_unbond(keys["unbonding"][1])
    # Slashed for 1 ROC: 4 ROC stay bonded, above the client's minimum; the slash alone rules it out.
    ledger.slash(list(council_keys(ledger)[:2]), accounts["slashed"], UNIT, _evidence("caught"))
    expected = {
        "registered": None,
        "unregistered": "not_registered",
        "unbonding": "unbonding since block",
        "slashed": "slashed 1x",
    }
    for name, account in accounts.items():
        refusal = ledger.provider_status(account).routing_refusal(UNIT)
        assert (refusal is None) if expected[name] is None else refusal.startswith(expected[name]), (name, refusal)
    before = {account: total_balance(ledger, account) for account in accounts.values()}

    client_uri, _ = funded_key(ledger, 1000 * UNIT)
    config = ClientConfig(billing=BillingConfig(url, client_uri, sample_rate=0.0), min_stake=UNIT)
    model = DistributedModel.from_pretrained(local_swarm.model, local_swarm.initial_peers, config=config)
    core = model.core
    by_peer = {procs[name].info["peer_id"]: name for name in procs}
    try:
        # Each provider re-reads its own standing from chain every settlement round (2 s here) and shows it in
        # rpc_info; the first reading may predate the unbond and the slash above, so wait for a current one.
        for name in ("registered", "unbonding", "slashed"):
            peer_id = procs[name].info["peer_id"]
            seen: list[dict | None] = []

            def current_standing(peer_id: str = peer_id, name: str = name, seen: list = seen) -> dict | None:
                reply = model._loop.run(core.call(peer_id, protocol.HANDLER_INFO, runtime_pb2.ExpertRequest()))
                shown = protocol.unpack_metadata(reply.metadata).get("standing")
                seen.append(shown)
                state = "unbonding" if name == "unbonding" else "registered"
                current = shown is not None and shown["state"] == state and shown["slashes"] == (name == "slashed")
                return shown if current else None

            try:
                shown = wait_until(current_standing, 60, f"{name}'s current standing in rpc_info")
            except AssertionError as error:
                raise AssertionError(f"{error}; last shown: {seen[-1:]}") from None
            assert shown["routable"] is (name == "registered"), (name, shown)

        paid = 0
        for prompt in ("def add(a, b):", "import os", "class Stack:"):
            result = model.generate(prompt, GenerationParams(max_new_tokens=4, ignore_eos=True))
            assert [by_peer[hop.split(":")[0]] for hop in result.route] == ["registered"]
            assert result.route_standing == [f"registered, stake {STAKE_UNITS} ROC"]
            paid += result.bill.total
        model._loop.run(core.billing.flush())

        # With the registered provider out of reach, no route is left: the error names each peer's standing.
        core.bans = BanList(3600)
        core.bans.ban(procs["registered"].info["peer_id"])
        with pytest.raises(NoRouteError) as refused:
            model._loop.run(core.plan(0, 8))
        message = str(refused.value)
        left_out = dict(
            part.split(": ", 1) for part in message.split("left out for their standing on chain: ")[1].split("; ")
        )
        for name in ("unregistered", "unbonding", "slashed"):
            announced, reason = left_out[procs[name].info["peer_id"][-8:]].split(" ", 1)
            assert account_id(announced) == account_id(accounts[name]) and reason.startswith(expected[name]), message
    finally:
        model.close()

    registered = accounts["registered"]
    wait_until(lambda: total_balance(ledger, registered) == before[registered] + paid, 90, "the registered paid")
    for name in ("unregistered", "unbonding", "slashed"):
        assert total_balance(ledger, accounts[name]) == before[accounts[name]], f"{name} was paid"
        assert not any(
            account_id(p) == account_id(accounts[name])
            for s in ledger.settlement_history(provider_ss58=accounts[name])
            for p, _ in s.payouts
        )

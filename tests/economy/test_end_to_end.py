"""The whole economy on the real dev chain: 3 honest peers and 1 cheater serve a paying client.

Honest peers are paid exactly their settled receipts; the cheater (20 % of its outputs corrupted)
is caught by two verifier processes and slashed by the council with an event naming its escrow;
nobody honest is slashed; funds are conserved (every planck that left the participants is a fee or
burned stake). Also: verdicts from a non-verifier and bogus work samples are refused on the wire.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from chain.account_derivation import account_id
from chain.ledger import ComputeLedger
from economy.gossip import GossipBus
from economy.signing import load_keypair
from economy.verification import SignedVerdict, Verdict
from economy.work_sample import SampledStep, WorkSample
from swarm import protocol
from swarm.billing import SessionBilling
from swarm.client import DistributedModel, GenerationParams
from swarm.protocol import HANDLER_VERIFY
from swarm.routing import BanList
from tests.economy.swarm_economy import (
    UNIT,
    fees_paid,
    funded_key,
    spot_checked_client,
    start_billing_peer,
    start_cheater,
    start_council,
    start_verifier,
    store_totals,
    total_balance,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

RATE = 10**10
STAKE_UNITS = 5
ROUTES = {"honest-split": ("a", "b"), "honest-whole": ("c",), "via-cheater": ("cheater", "b")}
PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):"]


def test_honest_peers_paid_cheater_slashed_funds_conserved(dev_chain, ledger, local_swarm, tiny_model_path, tmp_path):
    _run(ledger, dev_chain.url, local_swarm, tiny_model_path, tmp_path)


def _run(ledger: ComputeLedger, url: str, swarm, model_path, tmp_path) -> None:
    keys = {name: funded_key(ledger) for name in ("a", "b", "c", "cheater")}
    client_uri, client = funded_key(ledger, 1000 * UNIT)
    stores = {name: tmp_path / f"{name}.sqlite3" for name in keys}

    verifier = start_verifier(swarm, "//Alice", url)
    start_verifier(swarm, "//Bob", url)
    members = start_council(swarm, url)  # //Alice and //Bob, each its own process with its one key
    procs = {
        name: start_billing_peer(swarm, blocks, keys[name][0], url, stores[name], rate=RATE, wait=False)
        for name, blocks in (("a", "0:4"), ("b", "4:8"), ("c", "0:8"))
    }
    procs["cheater"] = start_cheater(swarm, "0:4", keys["cheater"][0], url, stores["cheater"], rate=RATE)
    for name in ("a", "b", "c"):
        swarm.wait_ready(procs[name], timeout=120)
    accounts = {name: kp.ss58_address for name, (_, kp) in keys.items()}
    assert all(ledger.provider_status(a).stake == STAKE_UNITS * UNIT for a in accounts.values())

    council = [load_keypair(k, ledger.ss58_format).ss58_address for k in ("//Alice", "//Bob")]
    burn = ledger.address(ledger.config.burn_account)
    escrows = {name: ledger.escrow_of(a) for name, a in accounts.items()}
    participants = {client.ss58_address, *accounts.values(), *escrows.values(), *council, burn}
    first_block = ledger.substrate.get_block_number(None) + 1
    before = {p: total_balance(ledger, p) for p in participants}

    model = spot_checked_client(swarm, model_path, url, client_uri, verifiers=2)
    core = model.core
    try:
        paid: dict[str, int] = {a: 0 for a in accounts.values()}
        chain_address = {account_id(a): a for a in accounts.values()}  # receipts may use another ss58 prefix
        by_peer = {procs[name].info["peer_id"]: name for name in procs}
        for prompt in PROMPTS:
            for route, allowed in ROUTES.items():
                core.bans = BanList(3600)  # steer the route: every other peer counts as failed
                for peer_id, name in by_peer.items():
                    if name not in allowed:
                        core.bans.ban(peer_id)
                result = model.generate(prompt, GenerationParams(max_new_tokens=6, ignore_eos=True))
                assert [by_peer[r.split(":")[0]] for r in result.route] == list(allowed), route
                assert result.quote is not None and result.bill is not None
                assert len(result.bill.lines) == len(allowed) and 0 < result.bill.total <= result.quote.total
                for line in result.bill.lines:
                    paid[chain_address[account_id(line.hop.provider)]] += line.amount
        model._loop.run(core.billing.flush())
        assert core.billing.sample_failures == []
        _check_verdicts(core.billing.verdicts, accounts)
        assert result.billing is not None  # the last request's own billing session
        _check_wire_rejections(model, result.billing, verifier, members[0], accounts, swarm)
    finally:
        model.close()

    # Every provider (the cheater too, for the work it was paid for) receives exactly its receipts.
    for name, account in accounts.items():
        wait_until(
            lambda account=account: total_balance(ledger, account) == before[account] + paid[account],
            90,
            f"{name}'s receipts to be settled",
        )
        # the client submits the settlements; the provider's store marks them at its next round (every 2 s)
        settled = {"settled": (len(PROMPTS) * sum(name in r for r in ROUTES.values()), paid[account])}
        wait_until(lambda name=name, settled=settled: store_totals(stores[name]) == settled, 30, f"{name}'s store")

    # The cheater is slashed by the council, with the evidence on chain; no honest peer is.
    status = wait_until(lambda: (s := ledger.provider_status(accounts["cheater"])).slashes and s, 120, "the slash")
    (slash,) = status.slashes
    assert slash.amount == STAKE_UNITS * UNIT and status.stake == 0 and len(slash.evidence_hash) == 32
    events = ledger.substrate.get_events(ledger.substrate.get_block_hash(slash.block_number))
    transfers = [
        e.value["attributes"] for e in events if (e.value["module_id"], e.value["event_id"]) == ("Balances", "Transfer")
    ]
    assert any(
        account_id(t["from"]) == account_id(escrows["cheater"])
        and account_id(t["to"]) == account_id(burn)
        and t["amount"] == slash.amount
        for t in transfers
    )
    for name in ("a", "b", "c"):
        honest = ledger.provider_status(accounts[name])
        assert honest.slashes == () and honest.stake == STAKE_UNITS * UNIT

    # Conservation: what left the participants is exactly the fees they paid; the burn sink holds the stake.
    last_block = ledger.substrate.get_block_number(None)
    after = {p: total_balance(ledger, p) for p in participants}
    delta = {p: after[p] - before[p] for p in participants}
    fees = fees_paid(ledger, first_block, last_block, participants)
    assert sum(delta.values()) == -fees
    assert delta[burn] == slash.amount and delta[escrows["cheater"]] == -slash.amount
    assert sum(delta[a] for a in accounts.values()) == sum(paid.values())
    assert sum(v for p, v in delta.items() if p != burn) == -(fees + slash.amount)


def _check_verdicts(verdicts: list[SignedVerdict], accounts: dict[str, str]) -> None:
    by_provider: dict[str, list[Verdict]] = {}
    for signed in verdicts:
        by_provider.setdefault(account_id(signed.verdict.provider), []).append(signed.verdict)
    for name in ("a", "b", "c"):
        mine = by_provider[account_id(accounts[name])]
        assert mine and all(v.passed for v in mine), name
    failing = [v for v in by_provider[account_id(accounts["cheater"])] if not v.passed]
    assert len({v.verifier for v in failing}) == 2  # both verifiers caught it independently


def _check_wire_rejections(
    model: DistributedModel, session: SessionBilling, verifier, member, accounts: dict[str, str], swarm
) -> None:
    """A verdict gossiped by a non-verifier is ignored; bogus work samples get typed errors."""
    core = model.core
    verifier_id = verifier.info["peer_id"]

    async def rogue_verdict() -> None:
        eve = load_keypair("//Eve")
        fake = Verdict(
            eve.ss58_address, accounts["a"], core.model, 0, 4, bytes(32), bytes(32), False, 10**6, int(time.time())
        )
        async with GossipBus(eve) as bus:
            await bus.connect(member.info["gossip"][0])
            await bus.wait_for_mesh(1)
            await bus.publish_verdict(SignedVerdict.sign(fake, eve))
            await asyncio.sleep(2.0)

    asyncio.run(rogue_verdict())

    def info() -> dict:
        response = model._loop.run(
            core.call(member.info["peer_id"], protocol.HANDLER_INFO, runtime_pb2.ExpertRequest())
        )
        return protocol.unpack_metadata(response.metadata)

    wait_until(
        lambda: info()["rejected"].get("NotAVerifierError", 0) >= 1, 20, "the non-verifier's verdict to be refused"
    )

    def verify(payload: dict) -> dict:
        request = runtime_pb2.ExpertRequest(metadata=msgpack.packb(payload, use_bin_type=True))
        response = model._loop.run(
            core.p2p.call_protobuf_handler(
                PeerID.from_base58(verifier_id), HANDLER_VERIFY, request, runtime_pb2.ExpertResponse
            )
        )
        return msgpack.unpackb(response.metadata, raw=False)

    assert verify({"sample": b"garbage"})["error"]["kind"] == "malformed_sample"
    signed = session.receipts[-1]
    steps = next(m.steps for m in session.meters.values() if m.meter.session_id == signed.receipt.session_id)
    forged = [
        SampledStep(s.kind, s.position, s.inputs, s.outputs + (1.0 if i == 0 else 0.0)) for i, s in enumerate(steps)
    ]
    reply = verify({"sample": WorkSample(signed, tuple(forged)).encode()})
    assert reply["error"]["kind"] == "evidence_mismatch", reply

"""Bad input on the wire to a provider's dllm.v1.receipt RPC: each refused with its own error kind,
and the provider keeps serving (the honest receipt that follows is accepted)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chain.ledger import ComputeLedger
from economy.receipts import SignedReceipt, UsageReceipt, sign_as_client
from economy.signing import load_keypair
from swarm import wire_errors
from swarm.billing import BillingConfig
from swarm.client import ClientConfig, DistributedModel
from swarm.protocol import ReceiptRefusedError, RemotePeerError
from tests.economy.swarm_economy import funded_key, start_billing_peer, store_totals

pytestmark = pytest.mark.timeout(300)


def test_forged_wrong_client_replayed_and_unpaid_receipts_are_refused(
    dev_chain, local_swarm, tiny_model_path, tmp_path
):
    ledger = ComputeLedger(dev_chain.url)
    try:
        provider_uri, _ = funded_key(ledger)
        client_uri, _ = funded_key(ledger, 100 * 10**12)
        store = tmp_path / "provider.sqlite3"
        start_billing_peer(local_swarm, "0:8", provider_uri, dev_chain.url, store, rate=10**10, settle_interval=3600)
    finally:
        ledger.close()
    billing = BillingConfig(dev_chain.url, client_uri, sample_rate=0.0, submit_settlements=False)
    model = DistributedModel.from_pretrained(
        str(tiny_model_path), local_swarm.initial_peers, config=ClientConfig(billing=billing)
    )
    try:
        kinds = model._loop.run(_exercise(model))
    finally:
        model.close()
    assert kinds == {
        "forged": "forged_receipt",
        "wrong_client": "forged_receipt",
        "provider_slot": "wrong_signer",
        "altered": "forged_receipt",
        "garbage": "malformed_receipt",
        "no_settlement": "invalid_request",
        "bad_settlement": "invalid_settlement",
        "unknown_session": "unknown_session",
        "replayed": "replayed_receipt",
    }
    assert store_totals(store) == {"unsettled": (1, store_totals(store)["unsettled"][1])}


async def _exercise(model: DistributedModel) -> dict[str, str]:
    core = model.core
    sb = core.billing.session(sampled=False)
    session = core.inference_session(max_length=8, billing=sb)
    kinds: dict[str, str] = {}
    try:
        with torch.inference_mode():
            await session.step(core.head.embed_tokens(torch.tensor([[5, 6, 7]])))
        (stream,) = session.hops
        peer = stream.hop.peer_id

        async def refused(name: str, metadata: dict) -> None:
            with pytest.raises(RemotePeerError) as info:
                await sb._call(peer, metadata)
            # the class the wire table names for the kind: ReceiptRefusedError for every receipt-specific kind
            assert type(info.value) is wire_errors.remote_class(info.value.kind), info.value
            assert info.value.peer_id == peer
            if info.value.kind not in ("invalid_request", "unknown_session"):
                assert isinstance(info.value, ReceiptRefusedError)
            kinds[name] = info.value.kind

        proposal = await sb._call(peer, {"op": "propose", "session_id": stream.session_id})
        receipt = UsageReceipt.decode(proposal["receipt"])
        good = SignedReceipt(receipt, proposal["provider_signature"], sign_as_client(receipt, core.billing.keypair))
        nonce, extrinsic = await core.billing.sign_settlement([receipt])

        def deliver(signed_bytes: bytes, settlement: bytes | None = extrinsic) -> dict:
            metadata = {"op": "deliver", "signed": signed_bytes}
            if settlement is not None:
                metadata["settlement"] = settlement
            return metadata

        eve = load_keypair("//Eve")
        await refused("forged", deliver(dataclasses.replace(good, client_signature=bytes(64)).encode()))
        await refused(
            "wrong_client",
            deliver(
                dataclasses.replace(
                    good, client_signature=bytes(eve.sign(b"dllm/receipt/1:" + receipt.encode()))
                ).encode()
            ),
        )
        await refused(
            "provider_slot", deliver(dataclasses.replace(good, client_signature=good.provider_signature).encode())
        )
        inflated = dataclasses.replace(receipt, generated_tokens=receipt.generated_tokens + 10)
        inflated = dataclasses.replace(inflated, amount=inflated.expected_amount())
        await refused(
            "altered",
            deliver(
                SignedReceipt(
                    inflated, good.provider_signature, sign_as_client(inflated, core.billing.keypair)
                ).encode()
            ),
        )
        await refused("garbage", deliver(b"\x93not a receipt"))
        await refused("no_settlement", deliver(good.encode(), settlement=None))
        await refused("bad_settlement", deliver(good.encode(), settlement=extrinsic[:-1] + bytes([extrinsic[-1] ^ 1])))
        await refused("unknown_session", {"op": "propose", "session_id": "no-such-session"})
        assert "receipt_id" in await sb._call(peer, deliver(good.encode()))  # the honest one still goes through
        await refused("replayed", deliver(good.encode()))
    finally:
        await session.close()
    return kinds

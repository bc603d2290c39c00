"""Bounded credit against hostile clients, on a real charging peer and the real dev chain.

(a) A session or pass without a billing identity is refused with `payment_required` naming the missing field.
(b) A client that takes work and never countersigns is cut off (further steps AND new sessions) once what it
    owes reaches the peer's credit limit: the provider is out at most that limit.
(c) Once that client's receipt is paid on chain, the same client is served again.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from hivemind.proto import runtime_pb2

from chain.ledger import ComputeLedger
from economy.pricing import ProviderRate, Usage, provider_amount
from peer.blocks import load_span_layers
from swarm import protocol, wire_errors
from swarm.billing import BillingConfig
from swarm.client import ClientConfig, SwarmClient
from swarm.model_files import load_config
from swarm.routing import Hop, NoRouteError
from swarm.session import _HopStream
from swarm.tensors import encode
from tests.economy.swarm_economy import UNIT, funded_key, store_totals, total_balance, wait_until

pytestmark = pytest.mark.timeout(300)

RATE = 10**10
LIMIT_TOKENS = 12  # the credit limit: this many generated tokens' worth
PROMPT_TOKENS = 4  # worth one generated token (prompt tokens cost a quarter)


def _span_params(model_path) -> int:
    config = load_config(model_path)
    layers = load_span_layers(model_path, config, 0, 1, torch.float32, torch.device("cpu"))
    return sum(p.numel() for p in layers[0].parameters()) * config.num_hidden_layers


def test_credit_bounds_what_a_hostile_client_takes(dev_chain, local_swarm, tiny_model_path, tmp_path):
    rate = ProviderRate.from_advertised(RATE)
    params = _span_params(tiny_model_path)
    per_token = provider_amount(rate, params, Usage(generated_tokens=1))
    limit = LIMIT_TOKENS * per_token
    ledger = ComputeLedger(dev_chain.url)
    try:
        provider_uri, provider = funded_key(ledger)
        client_uri, _ = funded_key(ledger, 1000 * UNIT)
        store = tmp_path / "provider.sqlite3"
        peer = local_swarm.start_peer(
            "0:8",
            "--chain-url",
            dev_chain.url,
            "--chain-key",
            provider_uri,
            "--rate",
            str(RATE),
            "--receipts",
            str(store),
            "--settle-interval",
            "600",  # no periodic round: payment is seen through the credit guard's own round
            "--credit-limit",
            str(limit),
            name="charging",
            timeout=120,
        )
        before = total_balance(ledger, provider.ss58_address)
        billing = BillingConfig(dev_chain.url, client_uri, sample_rate=0.0)
        paid = asyncio.run(_run(local_swarm, tiny_model_path, peer.info["peer_id"], billing, rate, params, limit))
        wait_until(lambda: total_balance(ledger, provider.ss58_address) == before + paid, 60, "the payment on chain")
        assert store_totals(store)["settled"][1] == paid
    finally:
        ledger.close()


async def _run(swarm, model_path, peer_id: str, billing: BillingConfig, rate, params: int, limit: int) -> int:
    anonymous = SwarmClient(model_path, swarm.initial_peers, ClientConfig())
    paying = SwarmClient(model_path, swarm.initial_peers, ClientConfig(billing=billing))
    await anonymous.start()
    await paying.start()
    try:
        (record,) = [r for r in await paying.records(refresh=True) if r.peer_id == peer_id]
        assert record.charges and record.credit_limit == limit
        hidden_size = paying.model_config.hidden_size
        await _anonymous_is_refused(anonymous, record, hidden_size)
        return await _cut_off_then_served_after_paying(paying, record, hidden_size, rate, params, limit)
    finally:
        await paying.close()
        await anonymous.close()


async def _anonymous_is_refused(core: SwarmClient, record, hidden_size: int) -> None:
    # (a) the client that pays nobody does not even route there ...
    with pytest.raises(NoRouteError):
        await core.plan(0, record.num_blocks)
    # ... and a session opened by hand, or a forward pass, is refused before any compute
    stream = await core.open_inference_stream(record.peer_id)
    try:
        metadata = {"model": core.model, "blocks": [0, 8], "max_length": 8, "session_id": uuid.uuid4().hex}
        x = torch.randn(1, 2, hidden_size)
        await stream.send(
            runtime_pb2.ExpertRequest(tensors=[encode(x)], metadata=protocol.pack_metadata({**metadata, "position": 0}))
        )
        reply = await stream.receive()
        with pytest.raises(protocol.PaymentRequiredError) as info:
            wire_errors.raise_if_error(protocol.unpack_metadata(reply.metadata), record.peer_id)
        assert info.value.missing == "client" and info.value.kind == "payment_required"
    finally:
        await stream.close()
    request = runtime_pb2.ExpertRequest(
        tensors=[encode(torch.randn(1, 3, hidden_size))], metadata=protocol.pack_metadata({"blocks": [0, 8]})
    )
    with pytest.raises(protocol.PaymentRequiredError) as info:
        await core.call(record.peer_id, protocol.HANDLER_FORWARD, request)
    assert info.value.missing == "client"


async def _cut_off_then_served_after_paying(
    core: SwarmClient, record, hidden_size: int, rate, params: int, limit: int
) -> int:
    assert core.billing is not None
    session = core.billing.session(sampled=False)  # meters like an honest client, but never settles on its own

    def hop_stream() -> _HopStream:
        hop = Hop(record, 0, record.num_blocks)
        return _HopStream(
            core.open_inference_stream, hop, core.model, 64, 1, 30.0, core.is_alive, session.observe, session.open_extra
        )

    # (b) work until refused: the prompt, then one token at a time
    first = hop_stream()
    await first.step(torch.randn(1, PROMPT_TOKENS, hidden_size))
    generated = 0
    with pytest.raises(protocol.PaymentRequiredError) as info:
        for _ in range(4 * LIMIT_TOKENS):
            await first.step(torch.randn(1, 1, hidden_size))
            generated += 1
    served = provider_amount(
        rate,
        params,
        Usage(prompt_tokens=PROMPT_TOKENS, generated_tokens=generated, max_context=PROMPT_TOKENS + generated),
    )
    assert served <= limit < info.value.owed and info.value.limit == limit  # the loss is at most the limit
    assert limit - served < provider_amount(rate, params, Usage(generated_tokens=1))  # cut off only at the limit
    with pytest.raises(protocol.PaymentRequiredError):  # further steps stay refused
        await first.step(torch.randn(1, 1, hidden_size))
    second = hop_stream()  # and so is a new session of the same client
    with pytest.raises(protocol.PaymentRequiredError):
        await second.step(torch.randn(1, 1, hidden_size))
    await second.close()

    # (c) the client countersigns and pays on chain: the peer sees it paid and serves it again
    (receipt,) = await session.settle([first])
    assert receipt.receipt.amount == served
    await core.billing.settled()
    await first.step(torch.randn(1, 1, hidden_size))
    await first.close()
    return served

"""One model serves concurrent requests (the HTTP API shares one): each request's route, quote, session and
billing come back with that request, never from state on the model that the next request overwrites."""

from __future__ import annotations

import asyncio

import pytest

from economy.pricing import ProviderRate
from swarm.client import ClientConfig, DistributedModel, GenerationParams

pytestmark = pytest.mark.timeout(240)

RATES = {"cheap": 10**9, "dear": 4 * 10**9}  # planck per token per billion parameters
LONG = 400  # tokens: the first request is still generating when the second has finished


def test_two_overlapping_generations_each_get_their_own_route_quote_and_session(local_swarm):
    peers = {
        name: local_swarm.start_peer("0:8", "--rate", str(rate), name=name, wait=False) for name, rate in RATES.items()
    }
    for peer in peers.values():
        local_swarm.wait_ready(peer)
    rate_of = {p.info["peer_id"]: ProviderRate.from_advertised(RATES[name]) for name, p in peers.items()}
    long = GenerationParams(max_new_tokens=LONG, ignore_eos=True)
    short = GenerationParams(max_new_tokens=4, ignore_eos=True)

    # A price cap makes every request priced: each gets a quote for its own route, without a chain.
    config = ClientConfig(max_price_per_token=10**18)
    with DistributedModel.from_pretrained(local_swarm.model, local_swarm.initial_peers, config=config) as model:

        async def overlapping():
            first = model.astream("The module", long)
            pieces = [await first.__anext__()]  # its session is open: its route is fixed
            assert first.session is not None and first.result is None
            (first_peer,) = {h.hop.peer_id for h in first.session.hops}
            model.core.bans.ban(first_peer)  # the next request must take the other peer
            second = await model.agenerate("Return the", short)
            (hop,) = first.session.hops  # the first request is still generating: the two overlapped
            assert hop.position < len(model.tokenizer("The module")["input_ids"]) + LONG
            pieces += [piece async for piece in first]
            return first, "".join(pieces), second

        first, first_text, second = asyncio.run(overlapping())

    one = first.result
    assert one is not None and one.session is first.session and one.text == first_text
    assert second.session is not None and second.session is not one.session
    assert (one.completion_tokens, second.completion_tokens) == (LONG, 4)
    (one_peer,) = {h.hop.peer_id for h in one.session.hops}
    (two_peer,) = {h.hop.peer_id for h in second.session.hops}
    assert {one_peer, two_peer} == set(rate_of)  # one request per peer
    assert one.route == [f"{one_peer}:0:8"] and second.route == [f"{two_peer}:0:8"]
    for result, peer in ((one, one_peer), (second, two_peer)):
        assert result.quote is not None and result.bill is None and result.billing is None
        assert [line.hop.rate for line in result.quote.lines] == [rate_of[peer]]
        assert result.quote.total == sum(line.amount for line in result.quote.lines)
    assert one.quote is not None and second.quote is not None
    assert one.quote.price_per_token != second.quote.price_per_token

"""A client's max price per generated token is respected by routing, and it sees a quote first."""

from __future__ import annotations

import pytest

from economy.pricing import route_price_per_token
from swarm.billing import route_hops
from swarm.client import ClientConfig, DistributedModel, GenerationParams
from swarm.routing import NoRouteError

pytestmark = pytest.mark.timeout(180)


def test_route_within_the_cap_is_used_and_one_above_it_is_refused(swarm):
    params = GenerationParams(max_new_tokens=3, ignore_eos=True)
    with DistributedModel.from_pretrained(
        str(swarm.model_path), swarm.initial_peers, config=ClientConfig(max_price_per_token=10**6)
    ) as model:
        result = model.generate("def add(a, b):", params)
        hops = model._loop.run(model.core.plan(0, model.core.num_blocks))
        price = route_price_per_token(route_hops(hops), context_tokens=result.prompt_tokens + 3)
    assert result.quote is not None and result.quote.price_per_token == price > 0
    assert result.bill is None  # a price cap alone does not pay anyone

    with DistributedModel.from_pretrained(
        str(swarm.model_path), swarm.initial_peers, config=ClientConfig(max_price_per_token=price)
    ) as model:
        assert model.generate("def add(a, b):", params).completion_tokens == 3
    with (
        DistributedModel.from_pretrained(
            str(swarm.model_path), swarm.initial_peers, config=ClientConfig(max_price_per_token=price - 1)
        ) as model,
        pytest.raises(NoRouteError, match="cap"),
    ):
        model.generate("def add(a, b):", params)

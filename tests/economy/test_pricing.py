"""Pricing: integer amounts, multipliers, quotes bound bills, the client's price cap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from economy.pricing import (
    BP,
    PriceCapExceededError,
    PricingError,
    ProviderRate,
    RouteHop,
    Usage,
    bill,
    context_multiplier_bp,
    fits_max_price,
    provider_amount,
    quote,
    route_price_per_token,
)

ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
BOB = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"


def hops(rate_a: int = 10**9, rate_b: int = 10**9) -> list[RouteHop]:
    return [
        RouteHop(ALICE, 0, 4, 800_000, ProviderRate.from_advertised(rate_a)),
        RouteHop(BOB, 4, 8, 800_000, ProviderRate.from_advertised(rate_b)),
    ]


def test_amount_is_proportional_to_params_and_tokens() -> None:
    rate = ProviderRate(prompt=250, generated=1000)
    one = provider_amount(rate, 10**9, Usage(generated_tokens=1))
    assert one == 1000
    assert provider_amount(rate, 2 * 10**9, Usage(generated_tokens=3)) == 6000
    assert provider_amount(rate, 10**9, Usage(prompt_tokens=4)) == 1000
    # a backward token costs twice a prompt token
    assert provider_amount(rate, 10**9, Usage(backward_tokens=1)) == 500


def test_multipliers_are_documented_values() -> None:
    rate = ProviderRate(prompt=1000, generated=1000)
    base = provider_amount(rate, 10**9, Usage(generated_tokens=10))
    assert provider_amount(rate, 10**9, Usage(generated_tokens=10, sampled=True)) == base * 11 // 10
    assert context_multiplier_bp(2048) == BP
    assert context_multiplier_bp(2048 + 8192) == 2 * BP
    assert provider_amount(rate, 10**9, Usage(generated_tokens=10, max_context=2048 + 8192)) == 2 * base


def test_amounts_round_up_in_integers() -> None:
    # 1 token on a 1-parameter span at rate 1: a tiny fraction of a planck rounds up to 1
    assert provider_amount(ProviderRate(1, 1), 1, Usage(generated_tokens=1)) == 1
    assert provider_amount(ProviderRate(1, 1), 1, Usage()) == 0


def test_quote_respects_price_cap() -> None:
    route = hops()
    per_token = route_price_per_token(route)
    assert per_token == 2 * 800_000  # 1e9 planck per token per 1e9 params on 0.8M params, twice
    assert fits_max_price(route, per_token)
    assert not fits_max_price(route, per_token - 1)
    assert fits_max_price(route, None)
    with pytest.raises(PriceCapExceededError, match="above the cap"):
        quote("m", route, prompt_tokens=10, max_new_tokens=10, max_price_per_token=per_token - 1)


def test_bad_inputs_raise_pricing_error() -> None:
    with pytest.raises(PricingError):
        ProviderRate(prompt=-1, generated=5)
    with pytest.raises(PricingError):
        Usage(prompt_tokens=1.5)  # type: ignore[arg-type]
    with pytest.raises(PricingError):
        RouteHop(ALICE, 4, 4, 10, ProviderRate(1, 1))
    with pytest.raises(PricingError):
        quote("m", [], 1, 1)


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.integers(0, 5000),
    max_new=st.integers(0, 5000),
    used_prompt_frac=st.floats(0, 1),
    used_new_frac=st.floats(0, 1),
    sampled=st.booleans(),
    backward=st.booleans(),
    rate_a=st.integers(0, 10**12),
    rate_b=st.integers(0, 10**12),
)
def test_bill_never_exceeds_quote(
    prompt, max_new, used_prompt_frac, used_new_frac, sampled, backward, rate_a, rate_b
) -> None:
    route = hops(rate_a, rate_b)
    q = quote("m", route, prompt, max_new, sampled=sampled, backward=backward)
    p = int(prompt * used_prompt_frac)
    g = int(max_new * used_new_frac)
    usage = Usage(p, g, (p + g) if backward else 0, p + g, sampled)
    b = bill("m", [(h, usage) for h in route])
    assert b.total <= q.total
    assert all(isinstance(line.amount, int) for line in b.lines)
    assert b.total == sum(line.amount for line in b.lines)

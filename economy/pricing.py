"""Prices of inference and training work: quotes before a session, bills after it.

Money is always an integer amount of the chain's smallest unit (planck); no float ever touches an
amount. A provider advertises a `ProviderRate`: planck per token per billion parameters served,
separately for prompt tokens (one parallel prefill) and generated tokens (one sequential step each).
Its share of a request is

    amount = ceil( (prompt_tokens * rate.prompt
                    + generated_tokens * rate.generated
                    + backward_tokens * rate.prompt * BACKWARD_FACTOR)
                   * params_served * context_multiplier * sampling_multiplier
                   / (10**9 * BP * BP) )

where multipliers are integers in basis points (BP = 10_000 means 1.0). One final ceiling division
keeps rounding in the provider's favour by less than one planck, and makes a bill never exceed the
quote computed from larger or equal usage (the formula is monotone in every count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from chain.errors import EconomyError

BP = 10_000
"""Basis points: multipliers are integers where BP means 1.0."""

PARAMS_UNIT = 10**9
"""Rates are per billion parameters served."""

FREE_CONTEXT_TOKENS = 2048
"""Contexts up to this length cost the base rate."""

CONTEXT_DOUBLING_TOKENS = 8192
"""Each further this many tokens of context add 1.0 to the multiplier (attention cost grows with it)."""

SAMPLING_MULTIPLIER_BP = 11_000
"""Sampled (temperature > 0) sessions cost 1.1x: their steps cannot be shared between identical
greedy requests, and a spot check has to replay them from the recorded seed."""

BACKWARD_FACTOR = 2
"""A backward pass costs about twice the forward pass it differentiates (two matmuls per one)."""

PROMPT_SHARE_BP = 2_500
"""Default prompt rate as a share of the generated rate when a provider advertises one number:
prefill runs all prompt tokens in one parallel pass, far cheaper per token than decode steps."""


class PricingError(EconomyError, ValueError):
    """A price input is out of range (negative counts or rates, empty route, ...)."""


def _require_non_negative(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise PricingError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise PricingError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class ProviderRate:
    """A provider's advertised prices in planck per token per billion parameters served."""

    prompt: int
    generated: int

    def __post_init__(self) -> None:
        _require_non_negative(prompt=self.prompt, generated=self.generated)

    @classmethod
    def from_advertised(cls, generated: int) -> ProviderRate:
        """Rate from the single number a DHT `ServerRecord.rate` carries (the generated-token rate)."""
        _require_non_negative(rate=generated)
        return cls(prompt=-(-generated * PROMPT_SHARE_BP // BP), generated=generated)


@dataclass(frozen=True)
class Usage:
    """Token counts of one provider's work for one session (or one receipt's segment of it)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    backward_tokens: int = 0
    max_context: int = 0
    sampled: bool = False

    def __post_init__(self) -> None:
        _require_non_negative(
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            backward_tokens=self.backward_tokens,
            max_context=self.max_context,
        )
        if not isinstance(self.sampled, bool):
            raise PricingError("sampled must be a bool")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens + self.backward_tokens


def context_multiplier_bp(context_tokens: int) -> int:
    """Multiplier (basis points) for the longest context a session reached."""
    _require_non_negative(context_tokens=context_tokens)
    extra = max(0, context_tokens - FREE_CONTEXT_TOKENS)
    return BP + -(-extra * BP // CONTEXT_DOUBLING_TOKENS)


def sampling_multiplier_bp(sampled: bool) -> int:
    """Multiplier (basis points) for sampling (temperature > 0) versus greedy decoding."""
    return SAMPLING_MULTIPLIER_BP if sampled else BP


def provider_amount(rate: ProviderRate, params_served: int, usage: Usage) -> int:
    """Planck owed to one provider for `usage` of a span holding `params_served` parameters."""
    _require_non_negative(params_served=params_served)
    token_units = (
        usage.prompt_tokens * rate.prompt
        + usage.generated_tokens * rate.generated
        + usage.backward_tokens * rate.prompt * BACKWARD_FACTOR
    )
    numerator = (
        token_units * params_served * context_multiplier_bp(usage.max_context) * sampling_multiplier_bp(usage.sampled)
    )
    return -(-numerator // (PARAMS_UNIT * BP * BP))


def price_per_generated_token(
    rate: ProviderRate, params_served: int, context_tokens: int = 0, sampled: bool = False
) -> int:
    """Planck one generated token costs on this provider (rounded up): what routing compares."""
    return provider_amount(rate, params_served, Usage(generated_tokens=1, max_context=context_tokens, sampled=sampled))


@dataclass(frozen=True)
class RouteHop:
    """One provider on a route: which blocks it serves, how many parameters those hold, its rate."""

    provider: str
    """Chain account (ss58) that gets paid."""
    start: int
    end: int
    params_served: int
    rate: ProviderRate

    def __post_init__(self) -> None:
        _require_non_negative(start=self.start, end=self.end, params_served=self.params_served)
        if self.end <= self.start:
            raise PricingError(f"hop {self.provider}: end {self.end} must be > start {self.start}")


def route_price_per_token(hops: Sequence[RouteHop], context_tokens: int = 0, sampled: bool = False) -> int:
    """Planck per generated token for the whole route (sum over its hops)."""
    return sum(price_per_generated_token(h.rate, h.params_served, context_tokens, sampled) for h in hops)


def fits_max_price(
    hops: Sequence[RouteHop], max_price_per_token: int | None, context_tokens: int = 0, sampled: bool = False
) -> bool:
    """True if the route's per-generated-token price is within the client's cap (None = no cap).

    Routing calls this on candidate routes (or on a single hop with the budget left for it).
    """
    if max_price_per_token is None:
        return True
    _require_non_negative(max_price_per_token=max_price_per_token)
    return route_price_per_token(hops, context_tokens, sampled) <= max_price_per_token


@dataclass(frozen=True)
class Line:
    """One provider's part of a quote or bill."""

    hop: RouteHop
    usage: Usage
    amount: int


@dataclass(frozen=True)
class Quote:
    """Upper bound of what a request costs, shown to the client before it starts."""

    model: str
    lines: tuple[Line, ...]
    total: int
    price_per_token: int
    """Route price per generated token at the quoted context length."""


@dataclass(frozen=True)
class Bill:
    """What a finished request costs, from the usage actually metered."""

    model: str
    lines: tuple[Line, ...] = field(default_factory=tuple)
    total: int = 0


class PriceCapExceededError(PricingError):
    """The route's price per token exceeds the client's max price per token."""


def quote(
    model: str,
    hops: Sequence[RouteHop],
    prompt_tokens: int,
    max_new_tokens: int,
    sampled: bool = False,
    backward: bool = False,
    max_price_per_token: int | None = None,
) -> Quote:
    """Worst-case price of a request: the full prompt plus `max_new_tokens` on every hop.

    With `backward`, every token also gets one backward pass (a training step). Raises
    PriceCapExceededError when the route breaks the client's `max_price_per_token`.
    """
    if not hops:
        raise PricingError("a quote needs at least one hop")
    _require_non_negative(prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens)
    context = prompt_tokens + max_new_tokens
    per_token = route_price_per_token(hops, context, sampled)
    if max_price_per_token is not None and per_token > max_price_per_token:
        raise PriceCapExceededError(
            f"route costs {per_token} planck per generated token, above the cap of {max_price_per_token}; "
            "choose cheaper providers or raise max_price_per_token"
        )
    usage = Usage(
        prompt_tokens=prompt_tokens,
        generated_tokens=max_new_tokens,
        backward_tokens=context if backward else 0,
        max_context=context,
        sampled=sampled,
    )
    lines = tuple(Line(h, usage, provider_amount(h.rate, h.params_served, usage)) for h in hops)
    return Quote(model=model, lines=lines, total=sum(line.amount for line in lines), price_per_token=per_token)


def bill(model: str, metered: Sequence[tuple[RouteHop, Usage]]) -> Bill:
    """Final price from each hop's metered usage (a hop replaced mid-session is simply another line)."""
    lines = tuple(Line(h, u, provider_amount(h.rate, h.params_served, u)) for h, u in metered)
    return Bill(model=model, lines=lines, total=sum(line.amount for line in lines))

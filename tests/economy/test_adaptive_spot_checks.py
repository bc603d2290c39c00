"""The adaptive spot-check rate: falls with a provider's passed checks, jumps after a failure, never goes
below the probation floor over a provider's first 200 requests nor below the lower floor after them (the
detection bounds rest on the floors), starts high for an unknown provider; and the client's billing keeps
that history from verdicts that verify only and from its own draws. Attackers simulated: a fresh identity
cheating from its first request (caught within 200 requests in >= 99 %), a sleeper honest through its
probation and cheating after it (the weaker bound docs/economy.md states). Simulations use fixed seeds and
count outcomes: no timing."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from economy.receipts import SignedReceipt
from economy.verification import (
    DEFAULT_MIN_SAMPLE_RATE,
    DEFAULT_PROBATION_RATE,
    DEFAULT_PROBATION_REQUESTS,
    AdaptiveSpotCheck,
    CheckHistory,
    Comparison,
    corrupted_detection,
    detection_probability,
    floor_rate,
    make_verdict,
    required_sample_rate,
)
from economy.work_sample import WorkSample
from swarm.billing import BillingConfig, ClientBilling

RULE = AdaptiveSpotCheck(b"client key")


def test_new_provider_starts_at_the_maximum_rate() -> None:
    assert RULE.rate(CheckHistory()) == RULE.max_rate == 1.0
    # a fresh identity is never checked less than any identity with a history: rotating buys nothing
    assert all(RULE.rate(CheckHistory(k, f)) <= RULE.rate(CheckHistory()) for k in range(50) for f in range(3))


def test_rate_falls_with_passed_checks_down_to_the_probation_floor_then_after_probation_to_the_floor() -> None:
    assert (RULE.probation_rate, RULE.probation_requests) == (DEFAULT_PROBATION_RATE, DEFAULT_PROBATION_REQUESTS)
    rates = [RULE.rate(CheckHistory(passed=k, requests=3 * k)) for k in range(30)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[1] < rates[0]
    assert rates[-1] == RULE.probation_rate == 0.47
    assert rates[5] == RULE.probation_rate  # five passes: a short warm-up
    # the probation is counted in requests, not in passes: 199 requests keep the probation floor
    assert RULE.rate(CheckHistory(passed=100, requests=DEFAULT_PROBATION_REQUESTS - 1)) == RULE.probation_rate
    assert RULE.rate(CheckHistory(passed=100, requests=DEFAULT_PROBATION_REQUESTS)) == RULE.min_rate == 0.25
    assert RULE.min_rate == DEFAULT_MIN_SAMPLE_RATE
    # after probation the rate still decays from the maximum with the passes: probation is a floor, no more
    assert RULE.rate(CheckHistory(passed=1, requests=10**6)) == RULE.max_rate * RULE.decay


def test_the_draw_counts_each_request_and_only_the_draw_does() -> None:
    history = CheckHistory()
    for i in range(DEFAULT_PROBATION_REQUESTS):
        assert RULE.rate(history) >= RULE.probation_rate
        _, history = RULE.draw(history, i.to_bytes(4, "big"))
    assert history == CheckHistory(requests=DEFAULT_PROBATION_REQUESTS)
    assert RULE.after(history, passed=True) == CheckHistory(passed=1, requests=DEFAULT_PROBATION_REQUESTS)
    # the draw is the lottery itself, at the rate before this request
    work = b"one request"
    assert RULE.draw(CheckHistory(passed=9, requests=7), work) == (
        RULE.selects(CheckHistory(passed=9, requests=7), work),
        CheckHistory(passed=9, requests=8),
    )


def test_a_failed_check_sends_the_rate_back_to_the_maximum_and_slows_the_next_decay() -> None:
    decayed = CheckHistory(passed=40, requests=5000)
    assert RULE.rate(decayed) == RULE.min_rate
    failed = RULE.after(decayed, passed=False)
    assert failed == CheckHistory(passed=0, failed=1, requests=0)  # the probation restarts
    assert RULE.rate(failed) == RULE.max_rate
    # a whole new probation: 200 more requests at >= the probation floor, whatever passes follow
    assert RULE.rate(CheckHistory(passed=500, failed=1, requests=DEFAULT_PROBATION_REQUESTS - 1)) == 0.47
    assert RULE.rate(CheckHistory(passed=500, failed=1, requests=DEFAULT_PROBATION_REQUESTS)) == RULE.min_rate
    # after a failure, the same number of passes leaves the rate higher than for a clean provider
    assert RULE.rate(CheckHistory(passed=3, failed=1)) > RULE.rate(CheckHistory(passed=3))
    assert RULE.after(CheckHistory(2, 1), passed=True) == CheckHistory(3, 1)


@given(
    st.integers(0, 10_000),
    st.integers(0, 100),
    st.integers(0, 1_000),
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    st.floats(0.01, 1.0),
    st.integers(0, 500),
)
def test_rate_never_falls_below_the_floors(
    passed: int, failed: int, requests: int, rates: list[float], decay: float, probation: int
) -> None:
    low, middle, high = sorted(rates)
    rule = AdaptiveSpotCheck(b"k", high, low, decay, probation_rate=middle, probation_requests=probation)
    rate = rule.rate(CheckHistory(passed, failed, requests))
    assert rule.min_rate <= rate <= rule.max_rate
    if requests < probation:
        assert rate >= rule.probation_rate


def test_rule_refuses_a_floor_above_the_maximum_and_bad_rates() -> None:
    with pytest.raises(ValueError, match="above max_rate"):
        AdaptiveSpotCheck(b"k", max_rate=0.3, min_rate=0.5)
    with pytest.raises(ValueError):
        AdaptiveSpotCheck(b"k", max_rate=1.5)
    with pytest.raises(ValueError, match="decay"):
        AdaptiveSpotCheck(b"k", decay=0.0)
    with pytest.raises(ValueError, match="probation_rate"):
        AdaptiveSpotCheck(b"k", min_rate=0.3, probation_rate=0.2)  # probation below the floor after it
    with pytest.raises(ValueError, match="probation_rate"):
        AdaptiveSpotCheck(b"k", max_rate=0.4, min_rate=0.1)  # the default probation 0.47 above the maximum
    with pytest.raises(ValueError, match="probation_rate"):
        AdaptiveSpotCheck(b"k", probation_rate=1.2)
    with pytest.raises(ValueError, match="probation_requests"):
        AdaptiveSpotCheck(b"k", probation_requests=-1)
    AdaptiveSpotCheck(b"k", min_rate=0.47, probation_rate=0.47)  # equal floors: no probation in effect


def test_fixed_rule_ignores_history() -> None:
    fixed = AdaptiveSpotCheck.fixed(0.5, b"k")
    assert {fixed.rate(CheckHistory(k, f, n)) for k in (0, 7, 300) for f in (0, 2) for n in (0, 10**4)} == {0.5}


def test_default_floors_give_the_bounds_docs_economy_states() -> None:
    # over its probation (its first 200 requests) a cheater drawing each request's corruption independently with
    # f = 5 % is checked with >= 0.47 per request: the 99 % target
    assert required_sample_rate(0.05, 200, 0.99) == pytest.approx(0.45526, abs=1e-5)
    assert RULE.probation_rate >= required_sample_rate(0.05, 200, 0.99)
    assert detection_probability(RULE.probation_rate, 0.05, 200) == pytest.approx(0.99140, abs=1e-5)
    assert RULE.fresh_detection_bound(0.05, 200) == pytest.approx(0.99186, abs=1e-5)
    assert RULE.fresh_detection_bound(0.05, 200) >= detection_probability(RULE.probation_rate, 0.05, 200)
    # exactly 10 corrupted requests within the probation, whenever it likes:
    assert floor_rate(10, 0.99) == pytest.approx(0.36904, abs=1e-5)
    assert corrupted_detection(RULE.probation_rate, 10) == pytest.approx(0.99825, abs=1e-5)
    # a sleeper (any timing, honest through its probation included) meets the floor 0.25 on every request:
    assert RULE.detection_bound(10) == pytest.approx(0.94369, abs=1e-5)
    assert RULE.detection_bound(17) == pytest.approx(0.99248, abs=1e-5) and RULE.detection_bound(16) < 0.99
    assert RULE.requests_to_catch(0.05, 0.99) == 367
    assert detection_probability(RULE.min_rate, 0.05, 367) >= 0.99 > detection_probability(RULE.min_rate, 0.05, 366)
    assert RULE.requests_to_catch(0.05, 0.99) <= 368.5  # ln(100) / (min_rate x f), the estimate docs quote
    with pytest.raises(ValueError):
        AdaptiveSpotCheck.fixed(0.0, b"k").requests_to_catch(0.05, 0.99)


AFTER_PROBATION = CheckHistory(passed=DEFAULT_PROBATION_REQUESTS // 2, requests=DEFAULT_PROBATION_REQUESTS)
"""Where an honest probation leaves a provider (about 0.47 x 200 passes in 200 requests; the honest-cost test
below reaches it through the real draws): its rate is at the floor, min_rate."""


def _sleeper(rng: random.Random, corrupts: Any, limit: int) -> int | None:
    """A provider honest through its probation, then corrupting its j-th request from there (j from 0) if
    `corrupts(j)`, through the real lottery and draw: the j at which it is caught, None if it escapes `limit`."""
    rule = replace(RULE, secret=rng.randbytes(16))
    history = AFTER_PROBATION
    assert rule.rate(history) == rule.min_rate
    for j in range(limit):
        selected, history = rule.draw(history, (DEFAULT_PROBATION_REQUESTS + j).to_bytes(4, "big"))
        if selected:
            if corrupts(j):
                return j
            history = rule.after(history, passed=True)
    return None


def test_a_sleeper_that_cheats_at_5_percent_after_its_probation_is_caught_within_the_stated_requests() -> None:
    """Honest through its probation (200 requests), then each request corrupted with probability 5 %: caught
    within `requests_to_catch(0.05, 0.99)` = 367 requests from its first chance to cheat, as the bound says."""
    rng = random.Random(20261201)
    n = RULE.requests_to_catch(0.05, 0.99)
    trials = 10_000
    caught = sum(_sleeper(rng, lambda _j: rng.random() < 0.05, n) is not None for _ in range(trials))
    bound = detection_probability(RULE.min_rate, 0.05, n)
    assert bound >= 0.99
    sigma = (bound * (1 - bound) / trials) ** 0.5
    assert caught / trials >= bound - 4 * sigma
    # and no better than the floor allows: the rate after probation is min_rate, not the probation's 0.47
    assert caught / trials <= detection_probability(RULE.probation_rate, 0.05, n) - 0.005


def test_lottery_is_keyed_by_the_client_and_runs_at_the_rate() -> None:
    ids = [i.to_bytes(4, "big") for i in range(4000)]
    at_floor = CheckHistory(passed=100, requests=10**4)
    picked = {w for w in ids if RULE.selects(at_floor, w)}
    assert abs(len(picked) / len(ids) - RULE.min_rate) < 0.03
    other = {w for w in ids if AdaptiveSpotCheck(b"another key").selects(at_floor, w)}
    assert abs(len(picked & other) / len(ids) - RULE.min_rate**2) < 0.03  # independent draws without the key
    assert all(RULE.selects(CheckHistory(), w) for w in ids[:200])  # rate 1: everything


def _caught(rule: AdaptiveSpotCheck, rng: random.Random, corrupt: list[bool]) -> tuple[bool, int]:
    """Serves `corrupt` requests as one provider through the real lottery; (caught, checks run)."""
    history, checks = CheckHistory(), 0
    secret_rule = replace(rule, secret=rng.randbytes(16))
    for i, bad in enumerate(corrupt):
        selected, history = secret_rule.draw(history, i.to_bytes(4, "big"))
        if selected:
            checks += 1
            if bad:
                return True, checks
            history = secret_rule.after(history, passed=True)
    return False, checks


def test_a_sleeper_that_corrupts_17_requests_after_its_probation_is_caught_in_99_percent_of_trials() -> None:
    """The attacker's best timing: honest until its rate is at the floor after probation, then 17 corrupted
    requests, the least count the floor 0.25 catches with >= 99 % (0.75^17 = 0.75 % escape)."""
    rng = random.Random(20240611)
    trials = 20_000
    caught = sum(_sleeper(rng, lambda _j: True, RULE.requests_to_catch(1.0, 0.99)) is not None for _ in range(trials))
    assert RULE.requests_to_catch(1.0, 0.99) == 17
    assert caught / trials >= 0.99


def test_a_fresh_identity_cheating_at_5_percent_from_its_first_request_is_caught_within_200_in_99_percent() -> None:
    """The issue's target, through the real lottery and draw: 20,000 fresh identities, each of their first 200
    requests corrupted independently with probability 5 % (bound 99.19 %)."""
    rng = random.Random(20261202)
    trials = 20_000
    caught = sum(_caught(RULE, rng, [rng.random() < 0.05 for _ in range(200)])[0] for _ in range(trials))
    assert caught / trials >= 0.99


def test_a_fresh_identity_cheating_from_its_first_request_is_caught_at_least_as_the_bound_says() -> None:
    rng = random.Random(7)
    for f in (0.05, 0.20):
        trials = 2_000
        caught = sum(_caught(RULE, rng, [rng.random() < f for _ in range(200)])[0] for _ in range(trials))
        bound = RULE.fresh_detection_bound(f, 200)
        sigma = (bound * (1 - bound) / trials) ** 0.5
        assert caught / trials >= bound - 4 * sigma - 1e-9


def test_honest_providers_cost_the_probation_rate_over_200_requests_then_the_floor() -> None:
    rng = random.Random(11)
    trials, requests = 100, 1_000
    first = later = 0
    for _ in range(trials):
        rule, history = replace(RULE, secret=rng.randbytes(16)), CheckHistory()
        for i in range(requests):
            selected, history = rule.draw(history, i.to_bytes(4, "big"))
            if selected:
                history = rule.after(history, passed=True)
                if i < DEFAULT_PROBATION_REQUESTS:
                    first += 1
                else:
                    later += 1
        assert rule.rate(history) == rule.min_rate  # the steady state of an honest provider
    per_request = first / (trials * DEFAULT_PROBATION_REQUESTS)
    assert RULE.probation_rate <= per_request < RULE.probation_rate + 0.03  # the warm-up: about 1.5 checks per 200
    steady = later / (trials * (requests - DEFAULT_PROBATION_REQUESTS))
    assert abs(steady - RULE.min_rate) < 0.015
    assert per_request < AdaptiveSpotCheck.fixed(0.5, b"").rate(CheckHistory())


# --------------------------------------------------------------------------- the client's billing state


def _billing(**config: Any) -> ClientBilling:
    billing = ClientBilling(BillingConfig("ws://127.0.0.1:1", "//Alice", **config), None, None, "tiny")  # type: ignore[arg-type]
    return billing


def test_billing_config_chooses_the_adaptive_rule_unless_a_fixed_rate_is_given() -> None:
    assert _billing().spot_check.min_rate == DEFAULT_MIN_SAMPLE_RATE
    assert _billing(sample_rate=0.0).spot_check.rate(CheckHistory()) == 0.0
    assert _billing(sample_rate=1.0).spot_check.rate(CheckHistory(passed=99)) == 1.0
    assert _billing(sample_rate=0.3).spot_check.rate(CheckHistory(passed=99, requests=3)) == 0.3  # no probation
    rule = _billing(sample_probation_rate=0.6, sample_probation_requests=50).spot_check
    assert (rule.probation_rate, rule.probation_requests, rule.min_rate) == (0.6, 50, DEFAULT_MIN_SAMPLE_RATE)
    with pytest.raises(ValueError):
        BillingConfig("ws://127.0.0.1:1", "//Alice", sample_rate_min=0.9, sample_rate_max=0.5)
    with pytest.raises(ValueError, match="probation_rate"):
        BillingConfig("ws://127.0.0.1:1", "//Alice", sample_rate_min=0.5)  # above the default probation floor


def test_billing_history_counts_only_verdicts_that_verify(keys: dict[str, Any], make_receipt: Any) -> None:
    charlie, dave = keys["charlie"], keys["dave"]
    billing = _billing(verifiers=(charlie.ss58_address, dave.ss58_address))  # both authorized
    receipt: SignedReceipt = make_receipt()
    provider = receipt.receipt.provider
    sample = WorkSample(receipt, ())
    passing = make_verdict(charlie, sample, Comparison(True, 1e-7, 0, 5))
    failing = make_verdict(dave, sample, Comparison(False, 0.3, 2, 5))
    assert billing.selects_for_check(receipt)  # a provider the client has no history of: rate 1
    assert billing.check_history[provider] == CheckHistory(requests=1)  # the draw counts one request

    billing._record_check(sample, [(dave.ss58_address, passing)])  # signed by charlie, announced as dave
    billing._record_check(sample, [("", passing)])
    other = WorkSample(make_receipt(session=b"session-2"), ())
    billing._record_check(other, [(charlie.ss58_address, make_verdict(charlie, sample, Comparison(True, 0, 0, 5)))])
    assert billing.check_history[provider] == CheckHistory(requests=1)
    assert len(billing.sample_failures) == 3

    billing._record_check(sample, [(charlie.ss58_address, passing)])
    assert billing.check_history[provider] == CheckHistory(passed=1, requests=1)
    assert billing.spot_check.rate(billing.check_history[provider]) < 1.0

    # one failing verdict outweighs a passing one on the same sample: back to the maximum, probation restarts
    billing._record_check(sample, [(charlie.ss58_address, passing), (dave.ss58_address, failing)])
    assert billing.check_history[provider] == CheckHistory(passed=0, failed=1, requests=0)
    assert billing.selects_for_check(receipt)


def test_billing_counts_each_drawn_request_toward_probation_and_a_failure_restarts_it(
    keys: dict[str, Any], make_receipt: Any
) -> None:
    charlie = keys["charlie"]
    billing = _billing(verifiers=(charlie.ss58_address,))
    provider = make_receipt().receipt.provider
    for i in range(DEFAULT_PROBATION_REQUESTS):
        billing.selects_for_check(make_receipt(session=f"s-{i}".encode()))
    sample = WorkSample(make_receipt(), ())
    for _ in range(30):  # passes enough to decay from the maximum to the floors
        billing._record_check(
            sample, [(charlie.ss58_address, make_verdict(charlie, sample, Comparison(True, 0, 0, 5)))]
        )
    assert billing.check_history[provider] == CheckHistory(passed=30, requests=DEFAULT_PROBATION_REQUESTS)
    assert billing.spot_check.rate(billing.check_history[provider]) == DEFAULT_MIN_SAMPLE_RATE
    # another provider's draws are its own: its probation is untouched
    assert billing.check_history.get(keys["dave"].ss58_address) is None
    billing._record_check(sample, [(charlie.ss58_address, make_verdict(charlie, sample, Comparison(False, 0.3, 2, 5)))])
    assert billing.check_history[provider] == CheckHistory(passed=0, failed=1, requests=0)
    assert billing.spot_check.rate(billing.check_history[provider]) == 1.0

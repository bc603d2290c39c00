"""The adaptive spot-check rate: falls with a provider's passed checks, jumps after a failure, never goes
below the floor its detection bound rests on, starts high for an unknown provider; and the client's
billing keeps that history from verdicts that verify only. Simulations use fixed seeds and count
outcomes: no timing."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from economy.receipts import SignedReceipt
from economy.verification import (
    DEFAULT_MIN_SAMPLE_RATE,
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


def test_rate_falls_with_passed_checks_down_to_the_floor() -> None:
    rates = [RULE.rate(CheckHistory(passed=k)) for k in range(30)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[1] < rates[0]
    assert rates[-1] == RULE.min_rate == DEFAULT_MIN_SAMPLE_RATE
    assert rates[5] == RULE.min_rate  # five passes: a short warm-up


def test_a_failed_check_sends_the_rate_back_to_the_maximum_and_slows_the_next_decay() -> None:
    decayed = CheckHistory(passed=40)
    failed = RULE.after(decayed, passed=False)
    assert failed == CheckHistory(passed=0, failed=1)
    assert RULE.rate(failed) == RULE.max_rate
    # after a failure, the same number of passes leaves the rate higher than for a clean provider
    assert RULE.rate(CheckHistory(passed=3, failed=1)) > RULE.rate(CheckHistory(passed=3))
    assert RULE.after(CheckHistory(2, 1), passed=True) == CheckHistory(3, 1)


@given(
    st.integers(0, 10_000),
    st.integers(0, 100),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.floats(0.01, 1.0),
)
def test_rate_never_falls_below_the_floor(passed: int, failed: int, a: float, b: float, decay: float) -> None:
    rule = AdaptiveSpotCheck(b"k", max_rate=max(a, b), min_rate=min(a, b), decay=decay)
    rate = rule.rate(CheckHistory(passed, failed))
    assert rule.min_rate <= rate <= rule.max_rate


def test_rule_refuses_a_floor_above_the_maximum_and_bad_rates() -> None:
    with pytest.raises(ValueError, match="above max_rate"):
        AdaptiveSpotCheck(b"k", max_rate=0.3, min_rate=0.5)
    with pytest.raises(ValueError):
        AdaptiveSpotCheck(b"k", max_rate=1.5)
    with pytest.raises(ValueError, match="decay"):
        AdaptiveSpotCheck(b"k", decay=0.0)


def test_fixed_rule_ignores_history() -> None:
    fixed = AdaptiveSpotCheck.fixed(0.5, b"k")
    assert {fixed.rate(CheckHistory(k, f)) for k in (0, 7, 300) for f in (0, 2)} == {0.5}


def test_default_floor_gives_the_99_percent_bound_for_a_5_percent_cheater_over_200_requests() -> None:
    # a cheater drawing each request's corruption independently with f = 5 %, even from the floor on:
    assert required_sample_rate(0.05, 200, 0.99) == pytest.approx(0.45526, abs=1e-5)
    assert RULE.min_rate >= required_sample_rate(0.05, 200, 0.99)
    assert detection_probability(RULE.min_rate, 0.05, 200) == pytest.approx(0.99140, abs=1e-5)
    assert RULE.fresh_detection_bound(0.05, 200) >= detection_probability(RULE.min_rate, 0.05, 200)
    # one that corrupts exactly 10 of 200 requests (5 %), whenever it likes:
    corrupted = 10
    assert floor_rate(corrupted, 0.99) == pytest.approx(0.36904, abs=1e-5)
    assert RULE.detection_bound(corrupted) == pytest.approx(0.99825, abs=1e-5)
    assert corrupted_detection(RULE.min_rate, 2) == pytest.approx(0.7191, abs=1e-4)  # 1 %
    assert corrupted_detection(RULE.min_rate, 40) > 0.999_999  # 20 %


def test_a_provider_that_waits_for_the_floor_then_cheats_independently_at_5_percent_is_caught_in_99_percent() -> None:
    """Honest until its rate is at the floor, then each of the next 200 requests corrupted with probability 5 %."""
    rng = random.Random(20261130)
    trials, caught = 20_000, 0
    for _ in range(trials):
        secret_rule = AdaptiveSpotCheck(rng.randbytes(16))
        history, i, window, seen = CheckHistory(), 0, 0, False
        while window < 200 and not seen:
            at_floor = secret_rule.rate(history) == secret_rule.min_rate
            selected = secret_rule.selects(history, i.to_bytes(4, "big"))
            i += 1
            if at_floor:
                window += 1
                seen = selected and rng.random() < 0.05
            elif selected:
                history = secret_rule.after(history, passed=True)
        caught += seen
    assert caught / trials >= 0.99


def test_lottery_is_keyed_by_the_client_and_runs_at_the_rate() -> None:
    ids = [i.to_bytes(4, "big") for i in range(4000)]
    at_floor = CheckHistory(passed=100)
    picked = {w for w in ids if RULE.selects(at_floor, w)}
    assert abs(len(picked) / len(ids) - RULE.min_rate) < 0.03
    other = {w for w in ids if AdaptiveSpotCheck(b"another key").selects(at_floor, w)}
    assert abs(len(picked & other) / len(ids) - RULE.min_rate**2) < 0.03  # independent draws without the key
    assert all(RULE.selects(CheckHistory(), w) for w in ids[:200])  # rate 1: everything


def _caught(rule: AdaptiveSpotCheck, rng: random.Random, corrupt: list[bool]) -> tuple[bool, int]:
    """Serves `corrupt` requests as one provider through the real lottery; (caught, checks run)."""
    history, checks = CheckHistory(), 0
    secret_rule = AdaptiveSpotCheck(rng.randbytes(16), rule.max_rate, rule.min_rate, rule.decay)
    for i, bad in enumerate(corrupt):
        if secret_rule.selects(history, i.to_bytes(4, "big")):
            checks += 1
            if bad:
                return True, checks
            history = secret_rule.after(history, passed=True)
    return False, checks


def test_a_provider_that_waits_for_the_floor_then_corrupts_5_percent_is_caught_in_99_percent_of_trials() -> None:
    """The attacker's best timing: honest until its rate is at the floor, then 10 corrupted requests (5 % of
    200). It needs at most 5 passed checks to get there, so all fits in 200 requests."""
    rng = random.Random(20240611)
    trials, caught = 20_000, 0
    for _ in range(trials):
        secret_rule = AdaptiveSpotCheck(rng.randbytes(16))
        history, i, bad_left, seen = CheckHistory(), 0, 10, False
        while bad_left and not seen:
            at_floor = secret_rule.rate(history) == secret_rule.min_rate
            selected = secret_rule.selects(history, i.to_bytes(4, "big"))
            i += 1
            if at_floor:
                bad_left -= 1
                seen = selected
            elif selected:
                history = secret_rule.after(history, passed=True)
        assert i <= 200
        caught += seen
    assert caught / trials >= 0.99


def test_a_fresh_identity_cheating_from_its_first_request_is_caught_at_least_as_the_bound_says() -> None:
    rng = random.Random(7)
    for f in (0.05, 0.20):
        trials = 2_000
        caught = sum(_caught(RULE, rng, [rng.random() < f for _ in range(200)])[0] for _ in range(trials))
        bound = RULE.fresh_detection_bound(f, 200)
        sigma = (bound * (1 - bound) / trials) ** 0.5
        assert caught / trials >= bound - 4 * sigma - 1e-9


def test_honest_providers_cost_about_the_floor() -> None:
    rng = random.Random(11)
    trials, requests = 300, 200
    checks = sum(_caught(RULE, rng, [False] * requests)[1] for _ in range(trials))
    per_request = checks / (trials * requests)
    assert RULE.min_rate <= per_request < RULE.min_rate + 0.03  # the warm-up adds about 1.5 checks per 200
    fixed = AdaptiveSpotCheck.fixed(0.5, b"")
    assert per_request < fixed.rate(CheckHistory())


# --------------------------------------------------------------------------- the client's billing state


def _billing(**config: Any) -> ClientBilling:
    billing = ClientBilling(BillingConfig("ws://127.0.0.1:1", "//Alice", **config), None, None, "tiny")  # type: ignore[arg-type]
    return billing


def test_billing_config_chooses_the_adaptive_rule_unless_a_fixed_rate_is_given() -> None:
    assert _billing().spot_check.min_rate == DEFAULT_MIN_SAMPLE_RATE
    assert _billing(sample_rate=0.0).spot_check.rate(CheckHistory()) == 0.0
    assert _billing(sample_rate=1.0).spot_check.rate(CheckHistory(passed=99)) == 1.0
    with pytest.raises(ValueError):
        BillingConfig("ws://127.0.0.1:1", "//Alice", sample_rate_min=0.9, sample_rate_max=0.5)


def test_billing_history_counts_only_verdicts_that_verify(keys: dict[str, Any], make_receipt: Any) -> None:
    charlie, dave = keys["charlie"], keys["dave"]
    billing = _billing(verifiers=(charlie.ss58_address, dave.ss58_address))  # both authorized
    receipt: SignedReceipt = make_receipt()
    provider = receipt.receipt.provider
    sample = WorkSample(receipt, ())
    passing = make_verdict(charlie, sample, Comparison(True, 1e-7, 0, 5))
    failing = make_verdict(dave, sample, Comparison(False, 0.3, 2, 5))
    assert billing.selects_for_check(receipt)  # a provider the client has no history of: rate 1

    billing._record_check(sample, [(dave.ss58_address, passing)])  # signed by charlie, announced as dave
    billing._record_check(sample, [("", passing)])
    other = WorkSample(make_receipt(session=b"session-2"), ())
    billing._record_check(other, [(charlie.ss58_address, make_verdict(charlie, sample, Comparison(True, 0, 0, 5)))])
    assert provider not in billing.check_history
    assert len(billing.sample_failures) == 3

    billing._record_check(sample, [(charlie.ss58_address, passing)])
    assert billing.check_history[provider] == CheckHistory(passed=1)
    assert billing.spot_check.rate(billing.check_history[provider]) < 1.0

    # one failing verdict outweighs a passing one on the same sample: back to the maximum
    billing._record_check(sample, [(charlie.ss58_address, passing), (dave.ss58_address, failing)])
    assert billing.check_history[provider] == CheckHistory(passed=0, failed=1)
    assert billing.selects_for_check(receipt)

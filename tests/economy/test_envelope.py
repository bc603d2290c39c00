"""Gossip envelopes, price announcements and the per-sender rate limiter (in-process parts)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from economy.envelope import ForgedEnvelopeError, MalformedEnvelopeError, StaleEnvelopeError, open_envelope, seal
from economy.price_announcement import MalformedAnnouncementError, PriceAnnouncement
from economy.rate_limit import SenderRateLimiter

TOPIC = "dllm/quotes/1"


def test_envelope_roundtrip_and_rejections(keys) -> None:
    env = seal(keys["alice"], TOPIC, b"payload")
    assert open_envelope(env.encode(), TOPIC) == env
    with pytest.raises(MalformedEnvelopeError, match="arrived on"):
        open_envelope(env.encode(), "dllm/verdicts/1")
    with pytest.raises(ForgedEnvelopeError):
        open_envelope(dataclasses.replace(env, payload=b"other").encode(), TOPIC)
    with pytest.raises(ForgedEnvelopeError):
        open_envelope(dataclasses.replace(env, sender=keys["bob"].ss58_address).encode(), TOPIC)
    old = seal(keys["alice"], TOPIC, b"p", now_ms=env.timestamp_ms - 3_600_000)
    with pytest.raises(StaleEnvelopeError):
        open_envelope(old.encode(), TOPIC)


def test_announcement_must_be_senders_own(keys) -> None:
    ask = PriceAnnouncement(
        "ask", keys["alice"].ss58_address, "12D3Koo", "tiny", 0, 4, 800_000, 250, 1000, 0, 2_000_000_000
    )
    assert PriceAnnouncement.from_envelope(seal(keys["alice"], TOPIC, ask.encode())) == ask
    with pytest.raises(MalformedAnnouncementError, match="was sent by"):
        PriceAnnouncement.from_envelope(seal(keys["bob"], TOPIC, ask.encode()))
    with pytest.raises(MalformedAnnouncementError):
        dataclasses.replace(ask, role="sell").encode()


def test_rate_limiter_isolates_senders() -> None:
    now = [0.0]
    limiter = SenderRateLimiter(rate=2.0, burst=3, max_keys=2, clock=lambda: now[0])
    assert [limiter.allow("flood") for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("honest")
    now[0] += 1.0  # two tokens refill
    assert [limiter.allow("flood") for _ in range(3)] == [True, True, False]
    limiter.allow("third")  # evicts the least recently seen key; memory stays bounded
    assert len(limiter._buckets) == 2
    with pytest.raises(ValueError):
        SenderRateLimiter(rate=0, burst=1)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_fuzz_envelope_and_announcement_decoding(data: bytes) -> None:
    with contextlib.suppress(MalformedEnvelopeError, ForgedEnvelopeError, StaleEnvelopeError):
        open_envelope(data, TOPIC)
    with contextlib.suppress(MalformedAnnouncementError):
        PriceAnnouncement.decode(data)

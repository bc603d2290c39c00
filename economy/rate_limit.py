"""Per-sender token buckets: a flooding sender is throttled, everyone else is untouched."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class SenderRateLimiter:
    """Allows each key `rate` messages per second on average, in bursts of up to `burst`.

    Keeps at most `max_keys` buckets (least recently seen evicted), so a sender inventing keys
    cannot grow memory without bound.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst >= 1, max_keys >= 1")
        self.rate, self.burst, self.max_keys, self._clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, key: str) -> bool:
        """Takes one token from `key`'s bucket; False if it is empty (the message is dropped)."""
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        self._buckets[key] = bucket
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

"""The server-side attention cache: budget, idle expiry, overflow and rollback."""

from __future__ import annotations

import time

import pytest
import torch

from peer.kv_cache import CacheFullError, CacheManager, CacheOverflowError, SessionNotFoundError, SpanKVCache


def cache(max_length=4):
    return SpanKVCache(range(2, 4), batch=1, kv_heads=2, head_dim=8, max_length=max_length, dtype=torch.float32)


def test_budget_refuses_sessions_that_do_not_fit():
    manager = CacheManager(max_bytes=1000)
    manager.open("a", cache(), 600, timeout=60)
    with pytest.raises(CacheFullError, match="MiB"):
        manager.open("b", cache(), 600, timeout=60)
    manager.close("a")
    manager.open("b", cache(), 600, timeout=60)
    assert manager.used_bytes == 600


def test_idle_sessions_expire_and_free_their_budget():
    manager = CacheManager(max_bytes=1000)
    manager.open("idle", cache(), 900, timeout=0.05)
    time.sleep(0.1)
    manager.open("fresh", cache(), 900, timeout=60)  # evicts the idle one to make room
    with pytest.raises(SessionNotFoundError, match="expired"):
        manager.get("idle")


def test_overflow_and_rollback():
    c = cache(max_length=4)
    k = torch.zeros(1, 2, 3, 8)
    c.update(k, k, 2)
    c.commit()
    with pytest.raises(CacheOverflowError):
        c.update(k, k, 2)
    c.rollback_to(1)
    assert c.get_seq_length() == 1
    with pytest.raises(CacheOverflowError):
        c.rollback_to(2)

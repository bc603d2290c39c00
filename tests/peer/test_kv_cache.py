"""The server-side attention cache: budget, idle expiry, overflow and rollback."""

from __future__ import annotations

import time

import pytest
import torch

from peer.blocks import load_span_layers
from peer.kv_cache import CacheFullError, CacheManager, CacheOverflowError, SessionNotFoundError, SpanKVCache
from peer.span import SpanRunner
from swarm.model_files import load_config


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


def test_budget_counts_bytes_of_the_span_dtype(tiny_model_path):
    """A bfloat16 span's sessions hold half the bytes per token: the same budget fits twice as many tokens."""
    config = load_config(tiny_model_path)
    tokens_fitted = {}
    for dtype in (torch.float32, torch.bfloat16):
        span = SpanRunner(config, load_span_layers(tiny_model_path, config, 0, 4, dtype=dtype), 0, 4)
        held = span.new_cache(1, 64, range(0, 4))
        assert held.keys[0].dtype == dtype
        allocated = sum(t.nbytes for t in (*held.keys.values(), *held.values.values()))
        assert span.cache_bytes(1, 64) == allocated  # the budget counts what the buffers really take
        manager = CacheManager(max_bytes=2**20)
        with pytest.raises(CacheFullError):
            for n in range(1000):
                manager.open(f"s{n}", span.new_cache(1, 64, range(0, 4)), span.cache_bytes(1, 64), timeout=60)
        tokens_fitted[dtype] = 64 * len(manager)
    assert tokens_fitted[torch.float32] == 256  # 2 (k, v) x 4 blocks x 4 heads x 32 dims x 4 bytes per token
    assert tokens_fitted[torch.bfloat16] == 2 * tokens_fitted[torch.float32]

"""Server-side attention caches for inference sessions, under a memory budget with idle expiry.

Each session gets a preallocated key/value buffer per layer of the span (no per-token re-allocation).
The manager refuses a session that does not fit the budget instead of letting the process run out of
memory, and evicts sessions that have been idle past their timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from swarm.protocol import CacheFullError, ProtocolError, SessionNotFoundError


class SessionExistsError(ProtocolError):
    """A client tried to open a session id that is already open."""


class CacheOverflowError(ProtocolError):
    """A session tried to store more tokens than it reserved when it opened."""


class SpanKVCache:
    """Key/value buffers for layers of one span, one session; quacks like a transformers Cache.

    transformers' attention calls `update(key, value, layer_idx)` with the new positions' keys and
    values and expects the whole prefix back. `commit(n)` advances the length once all layers ran.
    """

    def __init__(
        self,
        layer_indices: range,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (batch, kv_heads, max_length, head_dim)
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_indices}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_indices}
        self.max_length = max_length
        self.length = 0
        self._pending = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        new = key.shape[2]
        end = self.length + new
        if end > self.max_length:
            raise CacheOverflowError(f"session would hold {end} tokens but reserved {self.max_length}")
        self.keys[layer_idx][:, :, self.length : end] = key
        self.values[layer_idx][:, :, self.length : end] = value
        self._pending = new
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    def rollback_to(self, length: int) -> None:
        """Forgets tokens after `length` (a client re-sending a step after a lost reply)."""
        if not 0 <= length <= self.length:
            raise CacheOverflowError(f"cannot roll back to {length}: the session holds {self.length} tokens")
        self.length = length


@dataclass
class _Entry:
    cache: SpanKVCache
    nbytes: int
    timeout_s: float
    last_used: float = field(default_factory=time.monotonic)


class CacheManager:
    """All inference sessions' caches on one peer, within `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._sessions: dict[str, _Entry] = {}

    @property
    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self._sessions.values())

    def free_bytes(self) -> int:
        return self.max_bytes - self.used_bytes

    def __len__(self) -> int:
        return len(self._sessions)

    def reserve(self, nbytes: int) -> None:
        """Raises CacheFullError unless `nbytes` fit the budget (after evicting idle sessions)."""
        if nbytes > self.free_bytes():
            self.expire_idle()
        if nbytes > self.free_bytes():
            raise CacheFullError(
                f"session needs {nbytes / 2**20:.1f} MiB of attention cache but only "
                f"{self.free_bytes() / 2**20:.1f} MiB of {self.max_bytes / 2**20:.1f} MiB are free; "
                "retry later, ask for a shorter max_length, or use another peer"
            )

    def open(self, session_id: str, cache: SpanKVCache, nbytes: int, timeout: float) -> None:
        if session_id in self._sessions:
            raise SessionExistsError(f"session {session_id!r} is already open on this peer; use a new id or resume it")
        self.reserve(nbytes)
        self._sessions[session_id] = _Entry(cache, nbytes, timeout)

    def get(self, session_id: str) -> SpanKVCache:
        entry = self._sessions.get(session_id)
        if entry is None:
            raise SessionNotFoundError(f"no open session {session_id!r} on this peer (closed or expired)")
        entry.last_used = time.monotonic()
        return entry.cache

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def expire_idle(self) -> list[str]:
        """Drops sessions idle longer than their timeout; returns their ids."""
        now = time.monotonic()
        expired = [sid for sid, e in self._sessions.items() if now - e.last_used > e.timeout_s]
        for sid in expired:
            del self._sessions[sid]
        return expired

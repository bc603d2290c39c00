"""Choosing a chain of peers that covers every block of the model.

A route is a list of hops, each one peer serving a contiguous run of blocks. Among all routes over
the announced spans we pick the one with the lowest estimated time per token (network round trips
plus compute), breaking ties by price. Banned peers and peers above the client's price cap are left out;
a learning route (a feedback pass) uses only peers that announce they learn, since a frozen peer refuses
the training backward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from chain.errors import UnavailableError
from swarm.records import ServerRecord

DEFAULT_LATENCY_S = 0.005  # until a peer has been pinged


class NoRouteError(UnavailableError, RuntimeError):
    """No combination of reachable, affordable peers covers the requested blocks."""


@dataclass(frozen=True)
class Hop:
    """One leg of a route: `record`'s peer runs blocks `start..end-1`."""

    record: ServerRecord
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.record.peer_id

    def __repr__(self) -> str:
        return f"Hop({self.peer_id[-6:]}, {self.start}:{self.end})"


class BanList:
    """Peers that failed recently, each excluded from routing until its ban expires."""

    def __init__(self, duration: float = 60.0):
        self.duration = duration
        self._until: dict[str, float] = {}

    def ban(self, peer_id: str, duration: float | None = None) -> None:
        """Excludes `peer_id` for `duration` seconds (default: the list's duration); never shortens a ban."""
        until = time.monotonic() + (self.duration if duration is None else duration)
        self._until[peer_id] = max(until, self._until.get(peer_id, 0.0))

    def seconds_until_next_release(self) -> float | None:
        """How long until the soonest ban ends (None if no one is banned)."""
        now = time.monotonic()
        pending = [until - now for until in self._until.values() if until > now]
        return min(pending) if pending else None

    def is_banned(self, peer_id: str) -> bool:
        until = self._until.get(peer_id)
        if until is None:
            return False
        if until < time.monotonic():
            del self._until[peer_id]
            return False
        return True


def hop_cost(record: ServerRecord, start: int, end: int, latency: dict[str, float]) -> tuple[float, int]:
    """(seconds per token, price per token) of running blocks start..end-1 on `record`'s peer."""
    span = record.end - record.start
    compute = (end - start) / (max(record.throughput, 1e-3) * span)
    seconds = latency.get(record.peer_id, DEFAULT_LATENCY_S) + compute
    price = record.rate * (end - start) * max(record.params_per_block, 1)
    return seconds, price


def plan_route(
    records: list[ServerRecord],
    start: int,
    end: int,
    *,
    latency: dict[str, float] | None = None,
    banned: BanList | None = None,
    max_rate: int | None = None,
    learning: bool = False,
) -> list[Hop]:
    """The cheapest-in-time, then cheapest-in-price route over blocks start..end-1.

    Dynamic programming over block boundaries: best[b] is the best route from block b to `end`.
    A hop may use any contiguous part of a peer's span, so overlapping spans combine freely.
    `learning`: only peers whose record says they learn (a feedback pass's route).
    """
    latency = latency or {}
    usable = [
        r
        for r in records
        if not (banned and banned.is_banned(r.peer_id))
        and (max_rate is None or r.rate <= max_rate)
        and (r.learning or not learning)
    ]
    INF = (float("inf"), 0)
    best: dict[int, tuple[tuple[float, int], list[Hop]]] = {end: ((0.0, 0), [])}
    for b in range(end - 1, start - 1, -1):
        candidate: tuple[tuple[float, int], list[Hop]] = (INF, [])
        for r in usable:
            if not (r.start <= b < r.end):
                continue
            for e in range(b + 1, min(r.end, end) + 1):
                if e not in best or best[e][0] == INF:
                    continue
                (s_rest, p_rest), rest = best[e]
                s_hop, p_hop = hop_cost(r, b, e, latency)
                cost = (round(s_hop + s_rest, 6), p_hop + p_rest)
                if cost < candidate[0]:
                    candidate = (cost, [Hop(r, b, e)] + rest)
        best[b] = candidate
    cost, hops = best[start]
    if cost == INF:
        missing = [b for b in range(start, end) if not any(r.start <= b < r.end for r in usable)]
        detail = (
            f"no reachable peer serves block(s) {missing}" if missing else "the available spans do not chain together"
        )
        if max_rate is not None:
            detail += f" within the price cap of {max_rate}"
        if learning:
            detail += " among peers that learn (--adapter-rank > 0)"
        raise NoRouteError(f"cannot route blocks {start}:{end}: {detail} ({len(records)} peers announced)")
    return hops

"""Choosing which blocks a joining peer should serve: the least-served span of the model."""

from __future__ import annotations

from swarm.records import ServerRecord


def coverage(records: list[ServerRecord], num_blocks: int) -> list[float]:
    """Total announced throughput serving each block (0 where no one serves it)."""
    served = [0.0] * num_blocks
    for r in records:
        for i in range(max(0, r.start), min(num_blocks, r.end)):
            served[i] += max(r.throughput, 1e-3)
    return served


def choose_blocks(records: list[ServerRecord], num_blocks: int, span_length: int) -> tuple[int, int]:
    """The `span_length` consecutive blocks with the weakest service: lowest minimum, then lowest sum.

    Ties go to the earliest span, so peers joining an empty swarm fill it from block 0 upwards.
    """
    span_length = min(span_length, num_blocks)
    served = coverage(records, num_blocks)
    best = min(
        range(num_blocks - span_length + 1),
        key=lambda s: (min(served[s : s + span_length]), sum(served[s : s + span_length]), s),
    )
    return best, best + span_length

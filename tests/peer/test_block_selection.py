"""A peer joining without --blocks serves the least-served span."""

from __future__ import annotations

from peer.block_selection import choose_blocks
from swarm.records import ServerRecord


def record(start, end, throughput=100.0, peer="p"):
    return ServerRecord(
        peer_id=f"{peer}{start}{end}",
        model="m",
        start=start,
        end=end,
        throughput=throughput,
        cache_tokens_free=1000,
        rate=1,
    )


def test_empty_swarm_fills_from_block_zero():
    assert choose_blocks([], 8, 4) == (0, 4)


def test_gap_is_filled_first():
    assert choose_blocks([record(0, 4)], 8, 4) == (4, 8)
    assert choose_blocks([record(0, 3), record(5, 8)], 8, 2) == (3, 5)


def test_weakest_coverage_wins():
    records = [record(0, 4, 500.0), record(4, 8, 20.0), record(0, 8, 100.0)]
    assert choose_blocks(records, 8, 4) == (4, 8)


def test_span_longer_than_model_is_clamped():
    assert choose_blocks([], 8, 20) == (0, 8)


def test_real_peer_without_blocks_takes_the_gap(local_swarm):
    local_swarm.start_peer("0:4")
    auto = local_swarm.start_peer(None, "--num-blocks", "4", name="peer-auto")
    assert (auto.info["start"], auto.info["end"]) == (4, 8)

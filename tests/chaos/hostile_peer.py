"""Test-only launcher: a real `dllm` peer that misbehaves in one chosen way. Never part of the product.

Usage: python -m tests.chaos.hostile_peer MODE <dllm arguments...>
Modes:
  nan          every output it returns holds NaN
  wrong_shape  outputs have twice as many tokens as the inputs
  lie_blocks   announces the whole model (at a huge throughput) but serves only its --blocks
"""

from __future__ import annotations

import sys

import torch

MODES = ("nan", "wrong_shape", "lie_blocks")


def _corrupt_outputs(mode: str) -> None:
    from peer.span import SpanRunner

    honest_forward = SpanRunner.forward

    def forward(self, hidden, *args, **kwargs):
        out = honest_forward(self, hidden, *args, **kwargs)
        if mode == "nan":
            out = out.clone()
            out[..., 0] = float("nan")
            return out
        return torch.cat([out, out], dim=1)

    SpanRunner.forward = forward


def _announce_attractively(whole_model: bool) -> None:
    """Every mode advertises a huge throughput so that routing tries it first; lie_blocks also claims every block."""
    import peer.server

    honest_announce = peer.server.announce

    async def announce(dht, record, owner_marker, ttl):
        record.throughput = 1e6
        if whole_model:
            record.start, record.end = 0, record.num_blocks
        return await honest_announce(dht, record, owner_marker, ttl)

    peer.server.announce = announce


def main() -> None:
    mode = sys.argv[1]
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}, got {mode!r}")
    _announce_attractively(whole_model=mode == "lie_blocks")
    if mode != "lie_blocks":
        _corrupt_outputs(mode)
    from dllm.cli import main as dllm_main

    dllm_main(sys.argv[2:])


if __name__ == "__main__":
    main()

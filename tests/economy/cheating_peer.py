"""Test-only launcher: the real peer process, except that it corrupts a fraction of its outputs.

Product code has no cheat switch. This launcher swaps the peer's SpanRunner for a subclass whose
cached (inference) forward adds noise to `--fraction` of its outputs, chosen by a seeded RNG, and
otherwise runs `peer.server.PeerService` exactly as `dllm peer join` does: registered and staked on chain,
metering, co-signing receipts and settling them like an honest peer.

    python -m tests.economy.cheating_peer --model DIR --blocks 0:4 --initial-peers MADDR \\
        --chain-url ws://... --chain-key //Key --stake-planck N --receipts FILE [--fraction 0.2]
"""

from __future__ import annotations

import argparse
import contextlib
import random
from pathlib import Path

import torch

import peer.server
from dllm.service import serve_until_signal
from peer.config import PeerConfig, parse_blocks
from peer.span import SpanRunner


def corrupting_runner(fraction: float, seed: int) -> type[SpanRunner]:
    rng = random.Random(seed)
    noise = torch.Generator().manual_seed(seed)

    class CorruptingSpanRunner(SpanRunner):
        """Returns wrong activations for about `fraction` of the inference steps it serves."""

        corrupted = 0

        def forward(self, hidden, position_ids=None, cache=None, blocks=None):
            out = super().forward(hidden, position_ids=position_ids, cache=cache, blocks=blocks)
            if cache is not None and rng.random() < fraction:
                CorruptingSpanRunner.corrupted += 1
                out = out + 0.5 * out.std() * torch.randn(out.shape, generator=noise, dtype=out.dtype)
            return out

    return CorruptingSpanRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--blocks", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--chain-url", required=True)
    parser.add_argument("--chain-key", required=True)
    parser.add_argument("--stake-planck", type=int, required=True)
    parser.add_argument("--receipts", type=Path, required=True)
    parser.add_argument("--rate", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--settle-interval", type=float, default=30.0)
    # A learning cheater: adapters as `dllm peer join` makes them (training and canary passes run uncached,
    # so they stay honest; the served inference steps are corrupted with or without adapters).
    parser.add_argument("--adapter-rank", type=int, default=0)
    parser.add_argument("--averaging-period", type=float, default=30.0)
    parser.add_argument("--train-step-batch", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--canary-file", type=Path, default=None)
    args = parser.parse_args()

    from chain.errors import AlreadyRegisteredError
    from chain.ledger import ComputeLedger
    from economy.signing import load_keypair

    with ComputeLedger(args.chain_url) as ledger:
        key = load_keypair(args.chain_key, ledger.ss58_format)
        with contextlib.suppress(AlreadyRegisteredError):  # a rerun keeps its registration
            ledger.register_provider(key, args.stake_planck)
    peer.server.SpanRunner = corrupting_runner(args.fraction, args.seed)
    service = peer.server.PeerService(
        PeerConfig(
            model=args.model,
            blocks=parse_blocks(args.blocks),
            initial_peers=args.initial_peers,
            rate=args.rate,
            chain_account=load_keypair(args.chain_key).ss58_address,
            chain_key=args.chain_key,
            chain_url=args.chain_url,
            receipts_path=args.receipts,
            settle_interval_s=args.settle_interval,
            adapter_rank=args.adapter_rank,
            averaging_period_s=args.averaging_period,
            train_step_batch=args.train_step_batch,
            learning_rate=args.learning_rate,
            canary_file=args.canary_file,
        )
    )
    serve_until_signal(service, on_ready=lambda: print(service.ready_line, flush=True))


if __name__ == "__main__":
    main()

"""Test-only launcher: the real `dllm verify` process, except that every verdict it signs says "failed".

Product code has no lying switch. This launcher wraps `dllm.verifier.make_verdict` so the comparison it
signs always fails the provider (whatever the re-run found), then runs the CLI exactly as `dllm verify`:
the sample and the false verdict are persisted, published on gossip and served as evidence like any other.

    python -m tests.economy.lying_verifier verify --model DIR --initial-peers MADDR --chain-key //Key ...
"""

from __future__ import annotations

import dataclasses

import dllm.verifier
from dllm.cli import main
from economy.verification import Comparison, SignedVerdict

_honest_make_verdict = dllm.verifier.make_verdict


def lying_make_verdict(keypair, sample, comparison: Comparison, issued_at: int | None = None) -> SignedVerdict:  # type: ignore[no-untyped-def]
    false = dataclasses.replace(comparison, passed=False, worst_rel_error=max(comparison.worst_rel_error, 0.5))
    return _honest_make_verdict(keypair, sample, false, issued_at)


if __name__ == "__main__":
    dllm.verifier.make_verdict = lying_make_verdict
    main()

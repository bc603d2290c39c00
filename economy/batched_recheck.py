"""Spot checks of several work samples in one padded forward, with the same verdicts as one at a time.

A verifier re-runs each selected sample as one causal forward over its whole session (`verification.recheck`).
Samples of the same span, re-run with the same weights (base, or the same adapters by digest), can share
one forward: each sample's rows are right-padded to the longest session with zeros and stacked along the
batch dimension, the span runs once, and each sample's rows and positions are cut back out and compared at
its own tolerance (`compare_activations`, per position).

Invariants:
- every sample in a batch is validated alone first (`prepare_rerun`: the weights its receipt states, the
  commitment chain, positions tiling 0..T-1): a sample that is not evidence never enters a forward;
- a sample's recomputed outputs depend on its own rows only: decoder layers mix positions only through
  causal attention (a position sees itself and earlier ones, so the padding after a session is never
  seen) and never mix batch rows; batch-mates change only the float blocking of the matmuls (measured
  below 1e-6 relative in float32, far under every tolerance), so a batched verdict is the unbatched one;
- every position of every sample is compared, exactly as unbatched: batching hides nothing.

Threats: a cheater's sample in a batch cannot make an honest batch-mate fail, nor pass itself (rows are
independent; non-finite claimed outputs fail per sample); a client that sends long samples to slow a
verifier gains nothing by batching: `plan_batch` bounds the padded positions of a batch (`max_tokens`), and a
sample longer than the bound runs alone, as before.

Cost (scripts/bench/verification.py, docs/economy.md): on this project's 2-core CPU a forward over 128
positions already runs its matmuls at the core's float32 peak, so batching 64+64-token sessions saves nothing
on a quiet core (1.02-1.15x per sample for 2-8 of them; hence DEFAULT_BATCH_TOKENS); sessions of 16 positions,
whose check is memory-bound like a serving step, cost about half per sample in batches of 4-8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from economy.verification import Comparison, SpanForward, Tolerance, compare_activations
from economy.work_sample import WorkSample

DEFAULT_BATCH_TOKENS = 128
"""Padded positions (rows x longest session) one batched forward may hold: on a CPU, matmuls over ~128
positions are at the core's peak, so larger batches only add padding and cache misses (measured)."""


@dataclass(frozen=True)
class Rerun:
    """One validated sample, ready for a forward: what the span must reproduce, and how closely."""

    inputs: torch.Tensor
    """[rows, positions, hidden], float32, the steps' inputs concatenated along the sequence."""
    claimed: torch.Tensor
    """[rows, positions, hidden]: the outputs the provider returned."""
    tolerance: Tolerance

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def positions(self) -> int:
        return int(self.inputs.shape[1])


def prepare_rerun(sample: WorkSample, tolerance: Tolerance, adapter_digest: bytes | None = None) -> Rerun:
    """The sample's rerun, validated as `recheck` validates it: raises UnverifiableSampleError unless the
    receipt states the weights of `adapter_digest` (None: base weights), EvidenceMismatchError unless the steps
    are what the provider committed to and tile the context."""
    sample.check_weights(adapter_digest)
    sample.check_commitment()
    inputs, _, claimed = sample.forward_batch()
    return Rerun(inputs, claimed, tolerance)


def plan_batch(positions: Sequence[tuple[int, int]], max_tokens: int) -> int:
    """How many of the queued reruns, given as (rows, positions) in queue order, the next forward takes: the
    longest prefix whose padded size (rows x longest) stays within `max_tokens`, and at least one."""
    rows = longest = 0
    for taken, (r, p) in enumerate(positions):
        if taken and (rows + r) * max(longest, p) > max_tokens:
            return taken
        rows, longest = rows + r, max(longest, p)
    return len(positions)


def rerun_batch(reruns: Sequence[Rerun], forward: SpanForward) -> list[Comparison]:
    """Re-runs the samples in one forward (one sample: no padding, exactly `recheck`'s forward) and compares
    each with what its provider returned, in order. All must be for the weights `forward` runs."""
    if not reruns:
        return []
    if len(reruns) == 1:
        inputs = reruns[0].inputs
    else:
        longest = max(r.positions for r in reruns)
        inputs = torch.cat([torch.nn.functional.pad(r.inputs, (0, 0, 0, longest - r.positions)) for r in reruns])
    rows, length = inputs.shape[:2]
    positions = torch.arange(length).unsqueeze(0).expand(rows, length)
    with torch.no_grad():
        recomputed = forward(inputs, positions)
    comparisons, row = [], 0
    for r in reruns:
        own = recomputed[row : row + r.rows, : r.positions]
        comparisons.append(compare_activations(r.claimed, own, r.tolerance))
        row += r.rows
    return comparisons

"""Robust aggregation of updates: norm clipping, coordinate-wise trimmed mean, centered clipping.

Used twice: on one peer across its contributors' gradients (peer/training.py), and across replicas of a
span (peer/averaging.py runs one centered-clipping step around the last agreed adapter version).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from swarm.protocol import ProtocolError


class AggregationError(ProtocolError):
    """Updates that cannot be aggregated: none given, mismatched shapes, non-finite values, bad bounds."""


def _stack(updates: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(updates) == 0:
        raise AggregationError("no updates to aggregate")
    shape = updates[0].shape
    for i, u in enumerate(updates):
        if u.shape != shape:
            raise AggregationError(f"update {i} has shape {tuple(u.shape)}, update 0 has {tuple(shape)}")
    stacked = torch.stack([u.detach().float() for u in updates])
    if not torch.isfinite(stacked).all():
        raise AggregationError("updates contain NaN or infinite values; reject the contributor that sent them")
    return stacked


def clip_by_norm(update: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`update` scaled down (never up) so that its L2 norm is at most `max_norm`."""
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise AggregationError(f"max_norm must be a positive finite number, got {max_norm!r}")
    norm = float(update.norm())
    if not math.isfinite(norm):
        raise AggregationError("update has a non-finite norm")
    return update if norm <= max_norm else update * (max_norm / norm)


def weighted_mean(updates: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    stacked = _stack(updates)
    if weights is None:
        return stacked.mean(0)
    w = torch.tensor([float(x) for x in weights])
    if w.numel() != stacked.shape[0] or not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        raise AggregationError(f"weights must be {stacked.shape[0]} non-negative finite numbers with a positive sum")
    return (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(0) / w.sum()


def trimmed_mean(updates: Sequence[torch.Tensor], trim_fraction: float = 0.2) -> torch.Tensor:
    """Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values.

    With n updates, floor(trim_fraction * n) values are dropped at each end (at least one value kept).
    """
    if not 0 <= trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    stacked = _stack(updates)
    n = stacked.shape[0]
    k = int(math.floor(trim_fraction * n))
    if k == 0:
        return stacked.mean(0)
    ordered, _ = torch.sort(stacked, dim=0)
    return ordered[k : n - k].mean(0)


def centered_clip(
    updates: Sequence[torch.Tensor],
    tau: float,
    iterations: int = 3,
    center: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """CenteredClip (Karimireddy et al., 2021): v <- v + mean_i clip(x_i - v, tau), repeated.

    Each update moves the result by at most tau / n per iteration, so a few outliers of any size
    shift it by a bounded amount. `center` defaults to the coordinate-wise median (a robust start).
    """
    if not (tau > 0 and math.isfinite(tau)):
        raise AggregationError(f"tau must be a positive finite number, got {tau!r}")
    if iterations < 1:
        raise AggregationError(f"iterations must be >= 1, got {iterations}")
    stacked = _stack(updates)
    n = stacked.shape[0]
    w = torch.ones(n) if weights is None else torch.tensor([float(x) for x in weights])
    if w.numel() != n or not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        raise AggregationError(f"weights must be {n} non-negative finite numbers with a positive sum")
    w = w / w.sum()
    v = stacked.median(0).values if center is None else center.detach().float().clone()
    if v.shape != stacked.shape[1:]:
        raise AggregationError(f"center has shape {tuple(v.shape)}, updates have {tuple(stacked.shape[1:])}")
    flat = stacked.reshape(n, -1)
    for _ in range(iterations):
        diff = flat - v.reshape(1, -1)
        norms = diff.norm(dim=1).clamp_min(1e-12)
        scale = torch.clamp(tau / norms, max=1.0)
        v = v + (w.view(-1, 1) * scale.view(-1, 1) * diff).sum(0).view_as(v)
    return v

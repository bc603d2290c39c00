"""Local training of a span's adapters from contributors' feedback passes.

A training pass arrives as (hidden states in, gradient of the loss w.r.t. hidden states out). The peer
recomputes its span with the working adapters, back-propagates, and files the adapter gradient under
the contributor who signed the pass (its chain account: swarm/contributors.py; the handler refuses
unsigned passes). Defences against a
single contributor: a rate limit on passes, a norm bound on each pass's gradient, and a robust
aggregate across contributors at each optimizer step, so no one contributor can move the adapters by
more than a bounded amount per step, however large or numerous its gradients. The peer may add its own
term to each step's aggregate (`regularizer`: the rehearsal of peer/rehearsal.py, computed on the peer's
own data, which no contributor sends or shapes).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chain.errors import ConfigError
from peer.adapters import AdapterSet, flatten, unflatten
from peer.aggregation import centered_clip, clip_by_norm, trimmed_mean, weighted_mean
from swarm.protocol import ProtocolError

logger = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "trimmed_mean", "centered_clip")


class TrainingConfigError(ConfigError, ValueError):
    """A training setting is out of range."""


class RateLimitExceededError(ProtocolError, RuntimeError):
    """A contributor sent training passes faster than its allowance; retry after `retry_after` seconds."""

    def __init__(self, contributor: str, retry_after: float):
        super().__init__(f"contributor {contributor!r} exceeded its training rate limit; retry in {retry_after:.1f} s")
        self.contributor = contributor
        self.retry_after = retry_after


class GradientError(ProtocolError):
    """A training pass produced gradients that cannot be used (wrong names or shapes, NaN/inf)."""


@dataclass(frozen=True)
class TrainingConfig:
    """How a peer trains its adapters from feedback."""

    learning_rate: float = 1e-3
    optimizer: str = "adam"  # "adam" or "sgd"
    max_grad_norm: float = 1.0  # bound on one pass's adapter-gradient L2 norm
    passes_per_minute: float = 120.0  # per contributor
    burst: int = 16  # passes a contributor may send back to back
    aggregation: str = "centered_clip"  # across contributors: mean | trimmed_mean | centered_clip
    trim_fraction: float = 0.2
    clip_tau: float = 1.0  # centered clipping radius across contributors

    def __post_init__(self) -> None:
        for name in ("learning_rate", "max_grad_norm", "passes_per_minute", "clip_tau"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise TrainingConfigError(f"{name} must be a positive finite number, got {value!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise TrainingConfigError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.aggregation not in AGGREGATIONS:
            raise TrainingConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not (isinstance(self.burst, int) and self.burst >= 1):
            raise TrainingConfigError(f"burst must be a positive integer, got {self.burst!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise TrainingConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")


class ContributorRateLimiter:
    """Token bucket per contributor: `burst` passes at once, refilled at `per_minute`."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, contributor: str) -> None:
        """Consumes one pass for `contributor` or raises RateLimitExceededError."""
        now = self.clock()
        tokens, last = self._buckets.get(contributor, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[contributor] = (tokens, now)
            raise RateLimitExceededError(contributor, (1.0 - tokens) / self.rate)
        self._buckets[contributor] = (tokens - 1.0, now)


@dataclass
class StepReport:
    """What one optimizer step used."""

    contributors: int
    passes: int
    update_norm: float
    clipped_passes: int
    per_contributor_passes: dict[str, int] = field(default_factory=dict)


def span_backward(
    run_span: Callable[[torch.Tensor], torch.Tensor],
    adapters: AdapterSet,
    hidden: torch.Tensor,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Recomputes `run_span(hidden)` with the working adapters and back-propagates `grad_output`.

    Returns (gradient w.r.t. `hidden`, for the previous span; adapter gradients by name). Uses
    torch.autograd.grad, never `.grad`, so concurrent passes of different contributors never mix.
    Holds the adapters' lock from forward to backward: an averaging round that promotes a version
    rewrites the working tensors in place, which would invalidate the saved graph half-way.
    """
    if grad_output.shape[:-1] != hidden.shape[:-1]:
        raise GradientError(f"grad_output shape {tuple(grad_output.shape)} does not match hidden {tuple(hidden.shape)}")
    hidden = hidden.detach().requires_grad_(True)
    params = adapters.parameters()
    with adapters.lock, torch.enable_grad(), adapters.training():
        out = run_span(hidden)
        grads = torch.autograd.grad(out, [hidden, *params], grad_outputs=grad_output.to(out.dtype))
    return grads[0], dict(zip(adapters.names, grads[1:], strict=True))


class AdapterTrainer:
    """Accumulates contributors' adapter gradients and steps the working adapters."""

    def __init__(
        self, adapters: AdapterSet, config: TrainingConfig | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self.adapters = adapters
        self.config = config or TrainingConfig()
        self.limiter = ContributorRateLimiter(self.config.passes_per_minute, self.config.burst, clock)
        params = adapters.parameters()
        if self.config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.config.learning_rate)
        else:
            self.optimizer = torch.optim.SGD(params, lr=self.config.learning_rate)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._clipped = 0
        # The peer's own term added to every step's aggregate (peer/rehearsal.py); None adds nothing.
        self.regularizer: Callable[[], dict[str, torch.Tensor] | None] | None = None

    @property
    def pending_passes(self) -> int:
        return sum(self._counts.values())

    def admit(self, contributor: str) -> None:
        """Call before running a training pass: raises RateLimitExceededError when over the allowance."""
        if not isinstance(contributor, str) or not contributor:
            raise GradientError("a training pass needs a contributor id (the chain account that signed it)")
        self.limiter.take(contributor)

    def accumulate(self, contributor: str, grads: dict[str, torch.Tensor]) -> float:
        """Files one pass's adapter gradients under `contributor`, clipped to max_grad_norm.

        Returns the gradient's norm before clipping.
        """
        if set(grads) != set(self.adapters.names):
            raise GradientError("gradient names do not match this span's adapters")
        flat = flatten(grads, self.adapters.names)
        norm = float(flat.norm())
        if not math.isfinite(norm):
            raise GradientError(f"training pass from {contributor!r} produced non-finite gradients")
        if norm > self.config.max_grad_norm:
            self._clipped += 1
        flat = clip_by_norm(flat, self.config.max_grad_norm)
        self._sums[contributor] = self._sums.get(contributor, 0) + flat
        self._counts[contributor] = self._counts.get(contributor, 0) + 1
        return norm

    def step(self) -> StepReport | None:
        """Aggregates pending gradients across contributors and takes one optimizer step (None if idle)."""
        if not self._counts:
            return None
        contributors = sorted(self._counts)
        means = [self._sums[c] / self._counts[c] for c in contributors]
        if len(means) == 1 or self.config.aggregation == "mean":
            aggregate = weighted_mean(means)
        elif self.config.aggregation == "trimmed_mean":
            aggregate = trimmed_mean(means, self.config.trim_fraction)
        else:
            aggregate = centered_clip(means, self.config.clip_tau)
        grads = unflatten(aggregate, self.adapters.working, self.adapters.names)
        extra = self.regularizer() if self.regularizer is not None else None
        if extra is not None:
            grads = {name: grads[name] + extra[name].to(grads[name].device) for name in grads}
        with self.adapters.lock:
            for name, p in self.adapters.working.items():
                p.grad = grads[name].to(p.device)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        report = StepReport(
            contributors=len(contributors),
            passes=self.pending_passes,
            update_norm=float(aggregate.norm()),
            clipped_passes=self._clipped,
            per_contributor_passes=dict(self._counts),
        )
        self._sums.clear()
        self._counts.clear()
        self._clipped = 0
        logger.debug("adapter step: %s", report)
        return report

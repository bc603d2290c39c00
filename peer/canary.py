"""Held-out canary evaluation: an adapter update goes live only if it does not hurt the canary loss.

A peer holds one span, so it cannot compute a language-model loss alone. The gate therefore takes an
`evaluate(version)` coroutine that returns the mean loss on the canary examples of the whole model with
adapter `version` pinned on this span (live versions elsewhere). In the swarm that coroutine runs the
canary examples through a route as a client, with this span served by this peer; in tests it can run a
route assembled in one process. Both versions are evaluated in the same call so that drifts elsewhere
in the route affect both sides equally. An evaluator object with `losses(versions)` (see
peer/canary_eval.py) evaluates them in one pass, pinning the same versions everywhere else.

The gate fails closed: if the canary cannot be evaluated (no route, a peer down, a timeout), the
candidate does not go live, but the local progress is kept since nothing shows it is harmful.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from chain.errors import ConfigError
from peer.adapters import AdapterSet

logger = logging.getLogger(__name__)

LossOfVersion = Callable[[int], Awaitable[float]]


class VersionsEvaluator(Protocol):
    """Canary losses of several versions of this span, evaluated on the same route in one call."""

    async def losses(self, versions: Sequence[int]) -> list[float]: ...


class CanaryConfigError(ConfigError, ValueError):
    """A canary threshold is out of range."""


@dataclass(frozen=True)
class CanaryConfig:
    """An update is rejected when candidate_loss > live_loss * (1 + max_relative_rise) + max_absolute_rise."""

    max_relative_rise: float = 0.01
    max_absolute_rise: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_relative_rise", "max_absolute_rise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise CanaryConfigError(f"{name} must be a non-negative finite number, got {value!r}")

    def limit(self, live_loss: float, rounds: int = 1) -> float:
        """The highest accepted candidate loss; `rounds` > 1 compounds the allowed rise (a catch-up over
        several committed rounds)."""
        return live_loss * (1.0 + self.max_relative_rise) ** rounds + self.max_absolute_rise * rounds


@dataclass
class CanaryVerdict:
    """The outcome of one canary evaluation."""

    accepted: bool
    live_version: int
    candidate_version: int
    live_loss: float
    candidate_loss: float
    limit: float
    at: float = field(default_factory=time.time)
    error: str | None = None  # set when the canary could not be evaluated (rejected, fail-closed)

    @property
    def reason(self) -> str:
        if self.error is not None:
            return f"canary could not evaluate candidate v{self.candidate_version}: {self.error}"
        relation = "<=" if self.accepted else ">"
        return (
            f"canary loss {self.candidate_loss:.4f} (candidate v{self.candidate_version}) {relation} "
            f"limit {self.limit:.4f} (live v{self.live_version}: {self.live_loss:.4f})"
        )


class CanaryGate:
    """Evaluates candidate adapter versions on held-out canary examples and keeps the rollback log."""

    def __init__(self, evaluate: LossOfVersion | VersionsEvaluator, config: CanaryConfig | None = None):
        self.evaluate = evaluate
        self.config = config or CanaryConfig()
        self.rollbacks: list[CanaryVerdict] = []
        self.verdicts: list[CanaryVerdict] = []  # every evaluation, accepted or not (newest last)

    async def _losses(self, versions: Sequence[int]) -> list[float]:
        if hasattr(self.evaluate, "losses"):
            return [float(x) for x in await self.evaluate.losses(versions)]
        return [float(await self.evaluate(v)) for v in versions]

    async def check(self, live_version: int, candidate_version: int, rounds: int = 1) -> CanaryVerdict:
        """Canary loss of both versions; accepted unless the candidate's rises beyond the threshold
        (compounded over `rounds` rounds: see CanaryConfig.limit).

        Never raises for a failed evaluation: the verdict is then a rejection carrying `error`.
        """
        try:
            live_loss, candidate_loss = await self._losses([live_version, candidate_version])
        except Exception as e:  # fail closed: an update nobody could check does not go live
            logger.warning("canary evaluation failed: %s: %s", type(e).__name__, e)
            verdict = CanaryVerdict(
                False, live_version, candidate_version, math.nan, math.nan, math.nan, error=f"{type(e).__name__}: {e}"
            )
        else:
            limit = self.config.limit(live_loss, rounds)
            accepted = math.isfinite(candidate_loss) and math.isfinite(live_loss) and candidate_loss <= limit
            verdict = CanaryVerdict(accepted, live_version, candidate_version, live_loss, candidate_loss, limit)
        self.verdicts = self.verdicts[-31:] + [verdict]
        return verdict

    def record_rollback(self, verdict: CanaryVerdict) -> None:
        """Logs a rejected update (the audit trail operators read) and keeps it in `rollbacks`."""
        self.rollbacks.append(verdict)
        logger.warning("adapter update rolled back: %s", verdict.reason)

    async def apply(self, adapters: AdapterSet, tensors: Mapping[str, torch.Tensor]) -> CanaryVerdict:
        """Proposes `tensors`, evaluates them, then promotes them or rolls back to the live version."""
        live = adapters.live_version
        candidate = adapters.propose(tensors)
        try:
            verdict = await self.check(live, candidate)
        except BaseException:
            adapters.discard(candidate)
            adapters.reset_working()
            raise
        if verdict.accepted:
            adapters.promote(candidate)
            logger.info("adapter update accepted: %s", verdict.reason)
        else:
            adapters.discard(candidate)
            if verdict.error is None:  # measured harmful: drop the local progress that produced it
                adapters.reset_working()
                self.record_rollback(verdict)
        return verdict

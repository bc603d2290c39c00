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

Categories (canary file sections, peer/canary_examples.py): an evaluator with `category_losses(versions)`
returns each version's total and per-category losses from the same pass. The candidate is rejected when the
total rises past `max_relative_rise` OR any category rises past its own limit (`category_limits[name]`, else
`category_max_rise`): a drift confined to a small category (the stereotype probe) would be diluted in the
total. A category the live version was not measured on cannot block (there is nothing to compare with).
The gate keeps the per-category losses of the last versions that went live (`by_version`), which version
commits record on chain (peer/version_commits.py) and rpc_info shows.
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
from peer.canary_examples import CanaryLosses

logger = logging.getLogger(__name__)

LossOfVersion = Callable[[int], Awaitable[float]]


class VersionsEvaluator(Protocol):
    """Canary losses of several versions of this span, evaluated on the same route in one call."""

    async def losses(self, versions: Sequence[int]) -> list[float]: ...


KEPT_VERSIONS = 16
"""How many live versions' canary losses the gate keeps (rpc_info shows them)."""


class CanaryConfigError(ConfigError, ValueError):
    """A canary threshold is out of range."""


DEFAULT_CATEGORY_MAX_RISE = 0.05
"""The allowed relative rise of one category's loss: looser than the total's, since a category of a few examples
moves more per round than the whole set."""


@dataclass(frozen=True)
class CanaryConfig:
    """An update is rejected when candidate_loss > live_loss * (1 + max_relative_rise) + max_absolute_rise, or when
    a category's loss rises past live * (1 + its limit) (`category_limits`, else `category_max_rise`)."""

    max_relative_rise: float = 0.01
    max_absolute_rise: float = 0.0
    category_max_rise: float = DEFAULT_CATEGORY_MAX_RISE
    category_limits: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rises = {name: getattr(self, name) for name in ("max_relative_rise", "max_absolute_rise", "category_max_rise")}
        rises.update({f"category_limits[{k!r}]": v for k, v in self.category_limits.items()})
        for name, value in rises.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise CanaryConfigError(f"{name} must be a non-negative finite number, got {value!r}")

    def category_rise(self, category: str) -> float:
        return float(self.category_limits.get(category, self.category_max_rise))

    def category_limit(self, category: str, live_loss: float, rounds: int = 1) -> float:
        """The highest accepted candidate loss of `category` (compounded over `rounds` as `limit`)."""
        return live_loss * (1.0 + self.category_rise(category)) ** rounds

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
    live_categories: dict[str, float] = field(default_factory=dict)
    candidate_categories: dict[str, float] = field(default_factory=dict)
    category_limits: dict[str, float] = field(default_factory=dict)
    blocked_categories: list[str] = field(default_factory=list)  # categories that rose past their limit

    @property
    def reason(self) -> str:
        if self.error is not None:
            return f"canary could not evaluate candidate v{self.candidate_version}: {self.error}"
        if self.blocked_categories and self.candidate_loss <= self.limit:
            return "; ".join(
                f"canary category {c!r} loss {self.candidate_categories[c]:.4f} (candidate v{self.candidate_version})"
                f" > limit {self.category_limits[c]:.4f} (live v{self.live_version}: {self.live_categories[c]:.4f})"
                for c in self.blocked_categories
            )
        relation = "<=" if self.candidate_loss <= self.limit else ">"
        return (
            f"canary loss {self.candidate_loss:.4f} (candidate v{self.candidate_version}) {relation} "
            f"limit {self.limit:.4f} (live v{self.live_version}: {self.live_loss:.4f})"
        )

    def losses(self, of: str) -> dict[str, float]:
        """{"total": ..., category: ...} of the live ("before") or the candidate ("after") version."""
        if of not in ("before", "after"):
            raise ValueError(f"of must be 'before' or 'after', got {of!r}")
        total, categories = (
            (self.live_loss, self.live_categories)
            if of == "before"
            else (self.candidate_loss, self.candidate_categories)
        )
        return {"total": total, **categories}


class CanaryGate:
    """Evaluates candidate adapter versions on held-out canary examples and keeps the rollback log."""

    def __init__(self, evaluate: LossOfVersion | VersionsEvaluator, config: CanaryConfig | None = None):
        self.evaluate = evaluate
        self.config = config or CanaryConfig()
        self.rollbacks: list[CanaryVerdict] = []
        self.verdicts: list[CanaryVerdict] = []  # every evaluation, accepted or not (newest last)
        # {"total": loss, category: loss} of the last KEPT_VERSIONS versions that went live, measured when each
        # was the candidate (and v0 when it was first measured as live)
        self.by_version: dict[int, dict[str, float]] = {}

    async def _losses(self, versions: Sequence[int]) -> list[CanaryLosses]:
        if hasattr(self.evaluate, "category_losses"):
            return list(await self.evaluate.category_losses(versions))
        if hasattr(self.evaluate, "losses"):
            return [CanaryLosses(float(x)) for x in await self.evaluate.losses(versions)]
        return [CanaryLosses(float(await self.evaluate(v))) for v in versions]

    def went_live(self, verdict: CanaryVerdict) -> None:
        """Keeps the losses of a candidate that went live under its version (the averager calls this)."""
        if verdict.error is None:
            self._keep(verdict.candidate_version, verdict.losses("after"))

    def _keep(self, version: int, losses: dict[str, float]) -> None:
        self.by_version[version] = losses
        for old in sorted(self.by_version)[:-KEPT_VERSIONS]:
            del self.by_version[old]

    async def check(self, live_version: int, candidate_version: int, rounds: int = 1) -> CanaryVerdict:
        """Canary loss of both versions; accepted unless the candidate's rises beyond the threshold
        (compounded over `rounds` rounds: see CanaryConfig.limit).

        Never raises for a failed evaluation: the verdict is then a rejection carrying `error`.
        """
        try:
            live, candidate = await self._losses([live_version, candidate_version])
        except Exception as e:  # fail closed: an update nobody could check does not go live
            logger.warning("canary evaluation failed: %s: %s", type(e).__name__, e)
            verdict = CanaryVerdict(
                False, live_version, candidate_version, math.nan, math.nan, math.nan, error=f"{type(e).__name__}: {e}"
            )
        else:
            verdict = self._judge(live_version, candidate_version, live, candidate, rounds)
            if live_version not in self.by_version:  # v0, or a version adopted from a replica
                self._keep(live_version, verdict.losses("before"))
        self.verdicts = self.verdicts[-31:] + [verdict]
        return verdict

    def _judge(
        self, live_version: int, candidate_version: int, live: CanaryLosses, candidate: CanaryLosses, rounds: int
    ) -> CanaryVerdict:
        limit = self.config.limit(live.total, rounds)
        accepted = math.isfinite(candidate.total) and math.isfinite(live.total) and candidate.total <= limit
        limits = {
            c: self.config.category_limit(c, loss, rounds) for c, loss in live.categories.items() if math.isfinite(loss)
        }
        blocked = [
            c
            for c, bound in limits.items()
            if not (math.isfinite(candidate.categories.get(c, math.nan)) and candidate.categories[c] <= bound)
        ]
        return CanaryVerdict(
            accepted and not blocked,
            live_version,
            candidate_version,
            live.total,
            candidate.total,
            limit,
            live_categories=dict(live.categories),
            candidate_categories=dict(candidate.categories),
            category_limits=limits,
            blocked_categories=blocked,
        )

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
            self.went_live(verdict)
            logger.info("adapter update accepted: %s", verdict.reason)
        else:
            adapters.discard(candidate)
            if verdict.error is None:  # measured harmful: drop the local progress that produced it
                adapters.reset_working()
                self.record_rollback(verdict)
        return verdict

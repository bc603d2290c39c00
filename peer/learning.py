"""A peer's learning service: adapters on its span, training passes from clients, averaging with replicas.

The handler asks it which adapter version a request runs with (`version_scope`), sends it training
backward passes (`train_backward`), and reports `info()`; `run()` keeps the periodic work going: joining
replicas' averaging rounds, which are the only way an update goes live. Every adapter version a
receipt names is archived by digest (`retain_version`) for verifiers to fetch (peer/adapter_exchange.py).
A version that goes live through a round is announced (`on_live`, the peer re-announces its DHT record with
the new `adapter_version`) and, on a peer with a chain key, committed on chain (`version_commits`,
peer/version_commits.py) in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind import DHT

from peer.adapters import ATTENTION_TARGETS, AdapterArchive, AdapterSet, LoraConfig, flatten, retain_version
from peer.average_check import AverageSketcher
from peer.averaging import AdapterAverager, AveragingConfig, RoundOutcome
from peer.canary import CanaryGate
from peer.config import DEFAULT_REHEARSAL_ROWS, DEFAULT_REHEARSAL_WEIGHT
from peer.rehearsal import SpanRehearsal
from peer.replica_auth import ReplicaIdentity
from peer.span import SpanRunner
from peer.training import AdapterTrainer, TrainingConfig, span_backward
from peer.version_commits import VersionCommitter
from swarm.protocol import ProtocolError

logger = logging.getLogger(__name__)


@dataclass
class LearningConfig:
    """How a peer learns: adapter shape, local training, averaging cadence."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    training: TrainingConfig = field(default_factory=TrainingConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    step_batch: int = 4  # optimizer step once this many training passes are pending
    averaging_period_s: float = 30.0  # seconds between averaging rounds (aligned to DHT time)
    fetch_state_timeout_s: float = 10.0
    rehearsal_weight: float = DEFAULT_REHEARSAL_WEIGHT  # peer/rehearsal.py; 0: no rehearsal term
    rehearsal_rows: int = DEFAULT_REHEARSAL_ROWS

    def __post_init__(self) -> None:
        if self.step_batch < 1:
            raise ValueError(f"step_batch must be >= 1, got {self.step_batch}")
        if not (
            math.isfinite(self.averaging_period_s)
            and self.averaging_period_s > self.averaging.min_matchmaking_time_s + 1
        ):
            raise ValueError("averaging_period_s must exceed the averaging's min_matchmaking_time_s by over a second")


class SpanLearner:
    """Adapters, trainer and averager of one served span."""

    def __init__(self, span: SpanRunner, config: LearningConfig, canary: CanaryGate | None = None):
        self.config = config
        self.span = span
        self.adapters = AdapterSet(
            span.layers, span.start, LoraConfig(rank=config.rank, alpha=config.alpha, targets=config.targets)
        )
        for tensor in self.adapters.working.values():  # adapters live where the span runs
            tensor.data = tensor.data.to(span.device)
        self.trainer = AdapterTrainer(self.adapters, config.training)
        self.rehearsal = SpanRehearsal(config.rehearsal_weight, config.rehearsal_rows)
        self.trainer.regularizer = lambda: self.rehearsal.gradients(self.adapters, self._whole_span)
        self.canary = canary
        self.archive = AdapterArchive()
        """Versions named in receipts, kept for verifiers (ADAPTER_RETENTION_S after their last use)."""
        self._receipt_digests: dict[str, bytes] = {}  # AdapterSet.digest (cached per held version) -> ours
        self.averager: AdapterAverager | None = None
        self.last_round: RoundOutcome | None = None
        self.version_commits: VersionCommitter | None = None  # set by a peer with a chain key
        self.on_live: Callable[[int], None] | None = None  # called with each version a round makes live
        self._fingerprint = AverageSketcher(self.adapters.num_parameters(), blocks=8)

    # ---- used by the handler -----------------------------------------------------------------

    @staticmethod
    def requested_version(metadata: dict) -> int | None:
        """The adapter version a request pins (`adapter_version` in its metadata), None for live."""
        version = metadata.get("adapter_version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
            raise ProtocolError(f"adapter_version must be a non-negative integer, got {version!r}")
        return version

    @contextlib.contextmanager
    def version_scope(self, version: int | None) -> Iterator[int]:
        """Forward passes inside use adapter `version` (None: live); yields the version used."""
        with self.adapters.use(version) as used:
            yield used

    def retain_version(self, version: int) -> bytes:
        """Archives held adapter `version` for verifiers (a receipt will name it); returns its digest.

        Hashing a span's adapters costs a pass over them, so it runs once per version; later sessions on
        the same version only extend its retention."""
        held = self.adapters.digest(version)  # raises AdapterVersionUnavailableError for a version not held
        digest = self._receipt_digests.get(held)
        if digest is not None and self.archive.touch(digest):
            return digest
        digest = retain_version(self.adapters, self.archive, version)
        self._receipt_digests[held] = digest
        return digest

    def train_backward(
        self, hidden: torch.Tensor, grad_out: torch.Tensor, blocks: range, contributor: str
    ) -> torch.Tensor:
        """One training pass on this span (compute thread): adapter gradients filed under `contributor`."""
        self.trainer.admit(contributor)
        grad_in, grads = span_backward(
            lambda x: self.span.forward(x, blocks=blocks),
            self.adapters,
            hidden.to(self.span.device, self.span.dtype),
            grad_out,
        )
        self.trainer.accumulate(contributor, grads)
        if self.trainer.pending_passes >= self.config.step_batch:
            self.trainer.step()
        return grad_in

    def _whole_span(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.span.forward(hidden.to(self.span.device, self.span.dtype))

    async def prepare_rehearsal(
        self,
        span_inputs: Callable[[torch.Tensor], Awaitable[torch.Tensor]],
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        retry_s: float = 5.0,
    ) -> None:
        """Sets up the rehearsal term once `span_inputs(input_ids)` (this span's input for the rehearsal text) can
        be had: a later span needs the peers before it, which may not be up yet, so failures are retried."""
        if self.config.rehearsal_weight <= 0:
            return
        while True:
            try:
                inputs = await span_inputs(input_ids)
                await asyncio.to_thread(self.rehearsal.prepare, inputs, mask, self.adapters, self._whole_span)
                return
            except Exception as e:  # no route yet, a peer failing, non-finite inputs: retried, never stops the peer
                logger.info(
                    "rehearsal inputs not available yet (%s: %s); retrying in %.0f s", type(e).__name__, e, retry_s
                )
                await asyncio.sleep(retry_s)

    def training_forward(self, hidden: torch.Tensor, blocks: range) -> torch.Tensor:
        """The forward of a training pass: with the working adapters the backward will differentiate."""
        with torch.inference_mode(), self.adapters.training():
            return self.span.forward(hidden, blocks=blocks)

    def pinned_forward(self, hidden: torch.Tensor, version: int) -> torch.Tensor:
        """The whole span with adapter `version` (a candidate included): what the canary evaluator runs."""
        with torch.inference_mode(), self.adapters.use(version):
            return self.span.forward(hidden.to(self.span.device, self.span.dtype)).to("cpu", torch.float32)

    def info(self) -> dict[str, Any]:
        live = flatten(self.adapters.state().tensors, self.adapters.names)
        info: dict[str, Any] = {
            "adapter_version": self.adapters.live_version,
            "adapter_fingerprint": [round(float(x), 7) for x in self._fingerprint.sketch(live).sums],
            "adapter_parameters": self.adapters.num_parameters(),
            "adapters_retained": len(self.archive),
            "adapters_served": self.archive.handed_over,
            "rehearsal": {
                "ready": self.rehearsal.ready,
                "weight": self.rehearsal.weight,
                "last_change": self.rehearsal.last_change,
            },
        }
        if self.canary is not None:
            info["canary_rollbacks"] = len(self.canary.rollbacks)
            # Versions that went live on a canary loss below the live one they replaced: "last_canary" alone
            # can be a later round's verdict (the progress a round clipped off is promoted in later rounds).
            info["canary_improvements"] = sum(
                v.accepted and v.candidate_loss < v.live_loss for v in self.canary.verdicts
            )
            if self.canary.verdicts:
                last = self.canary.verdicts[-1]
                info["last_canary"] = {
                    "accepted": last.accepted,
                    "live_loss": last.live_loss,
                    "candidate_loss": last.candidate_loss,
                    "live_categories": last.live_categories,
                    "candidate_categories": last.candidate_categories,
                    "blocked_categories": last.blocked_categories,
                    "reason": last.reason,
                }
            # {version: {"total": loss, category: loss}} of the versions that went live here (str keys: msgpack)
            info["canary_by_version"] = {str(v): losses for v, losses in sorted(self.canary.by_version.items())}
        if self.version_commits is not None:
            info["version_commits"] = self.version_commits.info()
        if self.averager is not None and self.averager.refused_states:
            info["refused_adapter_states"] = len(self.averager.refused_states)
            info["last_refused_adapter_state"] = self.averager.refused_states[-1]
        if self.last_round is not None:
            info["last_averaging"] = {
                "status": self.last_round.status,
                "reason": self.last_round.reason,
                "group_size": self.last_round.group_size,
            }
        return info

    # ---- background work ----------------------------------------------------------------------

    async def start(self, dht: DHT, model: str, identity: ReplicaIdentity) -> None:
        """Joins the span's averaging group and, if replicas exist, loads their live adapters first (if they
        pass the norm bound and the canary: AdapterAverager.adoption_refusal). `identity` is the DHT's
        libp2p key, which signs this replica's declarations and votes."""
        # On this (main) thread: hivemind installs signal handlers while starting its averager process.
        self.averager = AdapterAverager(
            dht,
            self.adapters,
            model=model,
            start=self.span.start,
            end=self.span.end,
            identity=identity,
            config=self.config.averaging,
            canary=self.canary,
        )
        others = await self.averager.declared_replicas() - {self.averager.peer_id}
        if others:
            await self.averager.load_state_from_replicas(self.config.fetch_state_timeout_s)
        await self.averager.declare_replica()

    async def run(self) -> None:
        """Periodic averaging rounds until cancelled; a failing round never stops the peer."""
        assert self.averager is not None, "call start() first"

        def remember(outcome: RoundOutcome) -> None:
            self.last_round = outcome
            if not outcome.averaged:
                return
            if self.on_live is not None:
                self.on_live(outcome.version)
            if self.version_commits is not None:
                self.version_commits.went_live(outcome)

        await self.averager.run_periodically(self.config.averaging_period_s, remember)

    def close(self) -> None:
        if self.averager is not None:
            self.averager.close()

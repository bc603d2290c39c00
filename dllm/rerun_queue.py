"""The verifier's queue of validated spot-check reruns: samples for the same weights share one forward.

`RerunQueue.run(key, rerun)` waits for the sample's comparison. Reruns are grouped by `key` (the blocks, the
adapter digest and the hidden size: whatever makes two samples need the same forward); the oldest key's queue
runs first, as many of its reruns as `economy.batched_recheck.plan_batch` fits in `max_tokens` padded
positions, on the single compute thread the caller hands in (the only thread touching the span). Samples that
arrive while a forward runs wait for the next one: under load, batches form with no added wait.

Bounds: a rerun waits for batch-mates at most `max_wait_s` after it was queued, and only while its batch has
room (a sample that fills `max_tokens` alone never waits); after that it waits only for the forwards queued
before it. Verdict latency does not change detection: the client's dispatch waits for the verdict whatever
it takes, within its request timeout (seconds; `max_wait_s` is milliseconds).

Threats: one sample cannot fail its batch-mates: if a batched forward raises, each of its reruns is re-run
alone and gets its own outcome (a comparison or its own exception).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from economy.batched_recheck import DEFAULT_BATCH_TOKENS, Rerun, plan_batch
from economy.verification import Comparison

logger = logging.getLogger(__name__)

DEFAULT_BATCH_WAIT_S = 0.05
"""Longest a rerun waits for batch-mates (only while its batch has room)."""

RunBatch = Callable[[Hashable, list[Rerun]], list[Comparison]]
"""Runs reruns of one key in one forward on the compute thread (economy.batched_recheck.rerun_batch with the
key's weights applied); returns their comparisons in order."""


@dataclass
class _Queued:
    rerun: Rerun
    future: asyncio.Future[Comparison]
    queued_at: float


@dataclass
class RerunQueue:
    """Batches reruns by key onto one compute thread; see the module docstring."""

    run_batch: RunBatch
    compute: Executor
    max_tokens: int = DEFAULT_BATCH_TOKENS
    max_wait_s: float = DEFAULT_BATCH_WAIT_S
    forwards: int = 0
    """Forwards run so far (a batch counts once)."""
    batched: int = 0
    """Reruns that shared a forward with at least one other."""
    _queued: dict[Hashable, list[_Queued]] = field(default_factory=dict)
    _drain: asyncio.Task[None] | None = None
    _arrived: asyncio.Event | None = None
    """Set when a rerun is queued: wakes a drain waiting for batch-mates (one per event loop, as the drain)."""

    async def run(self, key: Hashable, rerun: Rerun) -> Comparison:
        """The comparison of `rerun`, once a forward (possibly shared with same-key reruns) has run it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Comparison] = loop.create_future()
        self._queued.setdefault(key, []).append(_Queued(rerun, future, time.monotonic()))
        if self._drain is None or self._drain.done() or self._drain.get_loop() is not loop:
            self._arrived = asyncio.Event()
            self._drain = loop.create_task(self._drain_queue(self._arrived))
        else:
            assert self._arrived is not None
            self._arrived.set()
        return await future

    async def _drain_queue(self, arrived: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while self._queued:
            key, queued = next(iter(self._queued.items()))  # the oldest key first
            sizes = [(q.rerun.rows, q.rerun.positions) for q in queued]
            waited = time.monotonic() - queued[0].queued_at
            taken = plan_batch(sizes, self.max_tokens)
            room = (sum(r for r, _ in sizes) + 1) * max(p for _, p in sizes) <= self.max_tokens
            if taken == len(queued) and room and waited < self.max_wait_s:
                arrived.clear()  # batch-mates may come: wait for the next arrival, at most the rest of the bound
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(arrived.wait(), self.max_wait_s - waited)
                continue
            batch, rest = queued[:taken], queued[taken:]
            if rest:
                self._queued[key] = rest
            else:
                del self._queued[key]
            try:
                outcomes = await loop.run_in_executor(self.compute, self._run, key, [q.rerun for q in batch])
            except Exception as e:  # the executor itself failed (shut down): every caller of the batch hears it
                outcomes = [e] * len(batch)
            self.forwards += 1
            self.batched += taken if taken > 1 else 0
            for q, outcome in zip(batch, outcomes, strict=True):
                if q.future.done():  # its caller went away
                    continue
                if isinstance(outcome, BaseException):
                    q.future.set_exception(outcome)
                else:
                    q.future.set_result(outcome)

    def _run(self, key: Hashable, reruns: list[Rerun]) -> list[Comparison | BaseException]:
        """On the compute thread: one forward for all; if it raises, each alone (its own outcome)."""
        try:
            return list(self.run_batch(key, reruns))
        except Exception as e:  # any failure is re-tried per sample, then handed to its caller
            if len(reruns) == 1:
                return [e]
            logger.warning("a batched rerun of %d samples failed (%s); re-running each alone", len(reruns), e)
        outcomes: list[Comparison | BaseException] = []
        for rerun in reruns:
            try:
                outcomes.extend(self.run_batch(key, [rerun]))
            except Exception as e:  # this sample's own failure, for its own caller
                outcomes.append(e)
        return outcomes

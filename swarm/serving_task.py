"""A service whose start-up and serving run in one asyncio task, its resources on one exit stack.

`ServingTask` is the lifecycle half of a service in the sense of `dllm.service` (start / wait_ready /
wait_stopped / stop) for a service that forks what it must in `start()` and does everything else
(loading a model, joining the swarm, serving, re-announcing) in one background task: the peer
(peer/server.py), the verifier (dllm/verifier.py) and the council member (dllm/council.py). It lives
on this floor, below both, because it needs nothing but asyncio.

A subclass implements `_launch()`: acquire what forks or spawns, register each thing on `_resources`
as soon as it exists, and return the coroutine that starts up and serves. That coroutine registers
what it creates on `_resources` too, calls `_now_serving(value)` once it serves, and then loops on
`_stop_requested(period)` until stop(). Invariants:

- start() runs once per object (a second call raises) and returns as soon as `_launch()` did.
- wait_ready() returns the value given to `_now_serving`; if the task ended first it raises the task's
  error (CancelledError if stop() cancelled start-up), or RuntimeError if it ended without serving.
- wait_stopped() returns once the task ended; it re-raises the error that ended it (a task that died
  on its own is never a clean stop); a task cancelled by stop() is no error.
- stop() may be called at any time, before start() too, any number of times (idempotent). It sets
  the stop flag; a task still starting up is cancelled (nothing to finish gracefully); a serving task
  gets `finish_s` to return from its loop and is cancelled after that; then `_resources` is closed, in
  reverse order of registration. With `finish_s` half of DEFAULT_GRACE_S, closing keeps the other half
  of the grace period `dllm.service.serve_until_signal` gives stop().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
"""Longest a service's stop() may take before serve_until_signal stops waiting and kills what is left."""

T = TypeVar("T")


class ServingTask(Generic[T]):
    """The serving task, its ready and stop flags, and the exit stack of a service; see the module docstring."""

    finish_s: float = DEFAULT_GRACE_S / 2
    """How long stop() lets a serving task return from its loop before cancelling it."""

    def __init__(self, what: str) -> None:
        self.what = what  # names the service in errors, e.g. "peer"
        self._resources = contextlib.AsyncExitStack()
        self._serving: asyncio.Task[None] | None = None
        self._served: T | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()

    async def _launch(self) -> Coroutine[Any, Any, None]:
        """Acquires what forks (registered on `_resources`); returns the coroutine that starts up and serves."""
        raise NotImplementedError

    async def start(self) -> None:
        """Runs `_launch()`, then the rest of start-up and serving in the background; returns at once."""
        if self._serving is not None:
            raise RuntimeError(f"this {self.what} was started already")
        self._serving = asyncio.create_task(await self._launch())

    def _now_serving(self, served: T) -> None:
        """Called by the serving task once it serves: `served` is what wait_ready() returns."""
        self._served = served
        self._ready.set()

    async def _stop_requested(self, within_s: float) -> bool:
        """Waits up to `within_s` for stop(); whether it was called (the period of a serving loop)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), within_s)
        return self._stop.is_set()

    async def wait_ready(self) -> T:
        """What the service serves, once it serves; raises what made start-up fail."""
        assert self._serving is not None, "start() first"
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({ready, self._serving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._served is None:
            self._serving.result()
            raise RuntimeError(f"the {self.what} stopped before it served")
        return self._served

    async def wait_stopped(self) -> None:
        """Returns once the serving task ended; raises the error that ended it."""
        assert self._serving is not None, "start() first"
        await asyncio.wait({self._serving})
        error = None if self._serving.cancelled() else self._serving.exception()
        if error is not None:
            raise error

    async def stop(self) -> None:
        """Stops serving (cancels start-up if still starting), then frees every resource; idempotent, bounded."""
        self._stop.set()
        serving = self._serving
        if serving is not None and not serving.done():
            if self._served is None:  # still starting: nothing to finish gracefully
                serving.cancel()
            done, _ = await asyncio.wait({serving}, timeout=self.finish_s)
            if not done:
                logger.warning("%s did not stop serving within %.0f s; cancelling it", self.what, self.finish_s)
                await cancel_task(serving)
        await self._resources.aclose()


async def cancel_task(task: asyncio.Task[Any]) -> None:
    """Cancels `task` and waits until it ended, whatever it raises (for exit stacks: a task beside serving)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task

"""`ServingTask`'s invariants without any process: stop() idempotent, callable before start() and during
start-up, bounded when the serving task ignores the stop flag; wait_ready/wait_stopped raise what ended the
task; the exit stack closes in reverse order of registration."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from swarm.serving_task import ServingTask

pytestmark = pytest.mark.timeout(30)


class Toy(ServingTask[str]):
    """Serves "served" after `delay_s`; MODE: "serve" loops until stop(), "fail" raises, "return" just ends,
    "stubborn" ignores the stop flag."""

    def __init__(self, mode: str, delay_s: float = 0.0) -> None:
        super().__init__("toy")
        self.mode = mode
        self.delay_s = delay_s
        self.closed: list[str] = []
        self.periods = 0

    async def _launch(self) -> Coroutine[Any, Any, None]:
        self._resources.callback(self.closed.append, "launched")
        return self._serve()

    async def _serve(self) -> None:
        await asyncio.sleep(self.delay_s)
        self._resources.callback(self.closed.append, "serving")
        if self.mode == "fail":
            raise ValueError("died")
        if self.mode == "return":
            return
        self._now_serving("served")
        if self.mode == "stubborn":
            await asyncio.sleep(3600)
        while not await self._stop_requested(0.01):
            self.periods += 1


async def test_serves_until_stopped_and_closes_in_reverse_order() -> None:
    toy = Toy("serve")
    await toy.start()
    assert await toy.wait_ready() == "served"
    await asyncio.sleep(0.1)
    assert toy.periods > 0
    await toy.stop()
    await toy.wait_stopped()  # a stop() is a clean end
    assert toy.closed == ["serving", "launched"]
    await toy.stop()  # idempotent
    assert toy.closed == ["serving", "launched"]


async def test_start_twice_is_refused() -> None:
    toy = Toy("serve")
    await toy.start()
    with pytest.raises(RuntimeError, match="this toy was started already"):
        await toy.start()
    await toy.stop()


async def test_stop_before_start_and_during_start_up() -> None:
    await Toy("serve").stop()
    toy = Toy("serve", delay_s=3600)
    await toy.start()
    await toy.stop()  # cancels start-up at once
    assert toy.closed == ["launched"]
    with pytest.raises(asyncio.CancelledError):
        await toy.wait_ready()
    await toy.wait_stopped()


async def test_a_task_that_dies_raises_from_wait_ready_and_wait_stopped() -> None:
    toy = Toy("fail")
    await toy.start()
    with pytest.raises(ValueError, match="died"):
        await toy.wait_ready()
    with pytest.raises(ValueError, match="died"):
        await toy.wait_stopped()
    await toy.stop()
    assert toy.closed == ["serving", "launched"]


async def test_a_task_that_ends_without_serving_is_an_error() -> None:
    toy = Toy("return")
    await toy.start()
    with pytest.raises(RuntimeError, match="the toy stopped before it served"):
        await toy.wait_ready()
    await toy.stop()


async def test_stop_is_bounded_when_serving_ignores_the_flag() -> None:
    toy = Toy("stubborn")
    toy.finish_s = 0.2
    await toy.start()
    await toy.wait_ready()
    started = asyncio.get_running_loop().time()
    await toy.stop()
    assert asyncio.get_running_loop().time() - started < 2.0
    assert toy.closed == ["serving", "launched"]
    await toy.wait_stopped()  # cancelled by stop(): not an error

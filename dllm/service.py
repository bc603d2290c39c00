"""One lifecycle for every long-running process: the `Service` protocol and `serve_until_signal`.

A service is what one `dllm` command keeps running: a peer, a verifier, the bootstrap node, the HTTP
API, the dashboard, the dev chain, a gossip node. Each is an object with four coroutines:

    start()         acquires what forks or spawns (the hivemind DHT process, chopsticks, p2pd, ...)
                    and begins the rest of start-up; returns quickly, and from then on stop() frees
                    everything it acquired. Raises (having freed what it took) if it cannot start.
    wait_ready()    returns once the service serves; raises the error that made start-up fail.
    wait_stopped()  returns once the service no longer serves: after stop(), or on its own (its
                    child died, its server loop ended); raises the error that ended it, if any.
    stop()          frees everything the service owns; may be called at any time after start()
                    (during start-up too) and any number of times (idempotent); bounded: whatever
                    does not end within the service's grace period is killed.

Services in lower packages (chain, economy, swarm, peer) satisfy the protocol structurally and never
import this module (layers point down: chain < economy < swarm < peer < dllm). Those that serve from
one asyncio task share `swarm.serving_task.ServingTask`; the grace period `DEFAULT_GRACE_S` is defined
there (its stop() spends half of it waiting for serving to end) and re-exported here.

`serve_until_signal(service)` is the one blocking entry point the CLI commands use: it starts the
service, installs SIGINT/SIGTERM handlers, waits until it is ready (then calls `on_ready`), runs it
until a signal arrives or it ends on its own, and then stops it. Invariants:

- Signal handlers go in only after start() returned, i.e. after any hivemind DHT process was forked:
  a forked child inherits Python-level handlers, and a DHT process that ignores SIGTERM could not be
  terminated by hivemind's own shutdown. A signal during start-up (model loading) still stops cleanly.
- stop() always runs, whatever ended serving (signal, failed start-up, the service's own end), and
  is given `grace_s`; after it, any child process still alive is a leak: it is terminated, then
  killed, with a warning naming it, and the unix socket of a killed p2pd is removed from /tmp.
  The process therefore leaves no child, daemon or socket behind.
- A second signal while stopping does not interrupt the stop (which is bounded anyway).

No synchronous variant exists: a service with blocking parts (the DHT's start and shutdown) runs
them in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from chain.errors import UnavailableError
from swarm.serving_task import DEFAULT_GRACE_S

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CHILD_EXIT_S = 3.0


@runtime_checkable
class Service(Protocol):
    """A long-running process part with one lifecycle; see the module docstring for the contract."""

    async def start(self) -> None: ...

    async def wait_ready(self) -> object: ...

    async def wait_stopped(self) -> None: ...

    async def stop(self) -> None: ...


class ServiceEndedError(UnavailableError, RuntimeError):
    """The service stopped serving on its own, before any stop signal."""


def serve_until_signal(
    service: Service, on_ready: Callable[[], None] | None = None, grace_s: float = DEFAULT_GRACE_S
) -> None:
    """Runs `service` until SIGINT or SIGTERM, then stops it cleanly (blocking; the CLI's entry point).

    Returns normally after a signal. Raises what made start-up fail, or what ended the service, or
    ServiceEndedError if it ended on its own without an error; in every case after stopping it.
    """
    asyncio.run(_serve(service, on_ready, grace_s))


async def _serve(service: Service, on_ready: Callable[[], None] | None, grace_s: float) -> None:
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    try:
        await service.start()
        for sig in STOP_SIGNALS:  # only now: start() has forked whatever it forks (module docstring)
            loop.add_signal_handler(sig, signalled.set)
        await _until_signal(service.wait_ready(), signalled)
        if not signalled.is_set():
            if on_ready is not None:
                on_ready()
            await _until_signal(service.wait_stopped(), signalled)
            if not signalled.is_set():
                raise ServiceEndedError(f"{type(service).__name__} stopped serving on its own")
        logger.info("stopping %s", type(service).__name__)
    finally:
        try:
            await asyncio.wait_for(service.stop(), grace_s)
        except TimeoutError:
            logger.error("%s did not stop within %.0f s", type(service).__name__, grace_s)
        finally:
            await asyncio.to_thread(_end_leftover_children)
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)


async def _until_signal(waiting: Awaitable[object], signalled: asyncio.Event) -> None:
    """Awaits the coroutine `waiting` unless a stop signal comes first (then cancels it); raises its error."""
    work = asyncio.ensure_future(waiting)
    signal_wait = asyncio.ensure_future(signalled.wait())
    try:
        await asyncio.wait({work, signal_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signal_wait.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
    if work.done() and not work.cancelled() and not signalled.is_set():
        work.result()


_ENDS_WITH_THIS_PROCESS = ("resource_tracker", "torch_shm_manager")
"""Helpers that exit by themselves once this process (their last client) exits: not leaks."""


def _ends_with_this_process(child: object) -> bool:
    import psutil

    assert isinstance(child, psutil.Process)
    try:
        return any(name in arg for arg in child.cmdline() for name in _ENDS_WITH_THIS_PROCESS)
    except psutil.Error:
        return True


def _end_leftover_children() -> None:
    """Terminates, then kills, child processes a stopped service left (a bug: each is named in a warning)."""
    import psutil

    children = [c for c in psutil.Process().children(recursive=True) if not _ends_with_this_process(c)]
    if not children:
        return
    # A child may still be exiting after the service's own bounded wait: give it a moment first.
    _, alive = psutil.wait_procs(children, timeout=_CHILD_EXIT_S)
    sockets: list[str] = []
    for child in alive:
        with contextlib.suppress(psutil.Error):
            logger.warning("stopped service left process %d (%s) running; terminating it", child.pid, child.name())
            sockets += [arg[len("-listen=/unix") :] for arg in child.cmdline() if arg.startswith("-listen=/unix/")]
            child.terminate()
    _, alive = psutil.wait_procs(alive, timeout=_CHILD_EXIT_S)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=_CHILD_EXIT_S)
    for path in sockets:  # a killed p2pd cannot remove its control socket
        with contextlib.suppress(OSError):
            os.unlink(path)

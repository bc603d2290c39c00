"""Serving an ASGI app with uvicorn inside the caller's event loop, as a service (dllm/service.py).

`HttpServer` never installs signal handlers: uvicorn's own would catch SIGINT/SIGTERM and re-raise
them once it stopped, which (with the default SIGTERM action) kills the process before its clean-up
runs and leaves hivemind's DHT process and p2pd orphaned. The process's one signal mechanism is
`dllm.service.serve_until_signal`, which calls `stop()`. Invariants: stop() is idempotent and
bounded: in-flight requests get `grace_s`, then their tasks are cancelled; the socket is closed.

`HttpService` is the lifecycle of a command that serves one app (`dllm api`, `dllm dashboard`): it
binds the port before anything else starts (a busy port fails at once), and every resource is on one
exit stack as soon as it exists, the server last: a failed start() frees what it took, and stop()
(idempotent) stops serving first, then frees the rest in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one), so the real port is known before serving."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(128)
    return sock


class HttpServer:
    """`app` served on the listening socket `sock` (taken over: stop() closes it)."""

    def __init__(self, app: Any, sock: socket.socket, grace_s: int = 5) -> None:
        self.app = app
        self.sock = sock
        self.grace_s = grace_s
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def start(self) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield  # signals are serve_until_signal's (module docstring)

        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=self.grace_s)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]))

    async def wait_ready(self) -> None:
        """Returns once uvicorn accepts connections; raises if it stopped first."""
        assert self._task is not None, "start() first"
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"the HTTP server on {self.url} stopped before serving")
            await asyncio.sleep(0.02)

    async def wait_stopped(self) -> None:
        assert self._task is not None, "start() first"
        await asyncio.wait({self._task})
        if not self._task.cancelled() and self._task.exception() is not None:
            raise self._task.exception()  # type: ignore[misc]

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            self._server.should_exit = True
            done, _ = await asyncio.wait({task}, timeout=self.grace_s + 2.0)
            if not done:  # uvicorn bounds its own shutdown; this only guards against a hang in it
                self._server.force_exit = True
                task.cancel()
                await asyncio.wait({task})
        self.sock.close()


class HttpService:
    """A service (dllm/service.py) serving the app `_open_app()` sets up on `host`:`port`; see the module docstring.

    A subclass implements `_open_app()`: it creates what the app needs, registering each thing on
    `_resources` as soon as it exists, and returns the ASGI app.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port  # 0: a free port, known from `http.url` once started
        self.http: HttpServer | None = None
        self._resources = contextlib.AsyncExitStack()

    async def _open_app(self) -> Any:
        """What the app serves, set up (each resource on `_resources`); returns the ASGI app."""
        raise NotImplementedError

    async def start(self) -> None:
        """Binds the port, sets the app up and starts serving it; raises, having freed everything, if it cannot."""
        try:
            sock = bind_socket(self.host, self.port)
            self._resources.callback(sock.close)
            self.http = HttpServer(await self._open_app(), sock)
            await self.http.start()
            self._resources.push_async_callback(self.http.stop)
        except BaseException:
            await self.stop()
            raise

    async def wait_ready(self) -> None:
        assert self.http is not None, "start() first"
        await self.http.wait_ready()

    async def wait_stopped(self) -> None:
        assert self.http is not None, "start() first"
        await self.http.wait_stopped()

    async def stop(self) -> None:
        await self._resources.aclose()

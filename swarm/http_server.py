"""Running an ASGI app on 127.0.0.1 with uvicorn so that SIGINT/SIGTERM end it *gracefully*.

uvicorn re-raises the signal it caught once it has stopped; with the default SIGTERM action that kills
the process before its `finally` blocks run, leaving hivemind's DHT process and p2pd orphaned. Serving
through `serve_until_signal` swaps in a handler that lets the caller's clean-up run.
"""

from __future__ import annotations

import signal
import socket
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


def serve_until_signal(app: Any, sock: socket.socket) -> None:
    """Serve `app` on `sock` until SIGINT or SIGTERM, then return normally (blocking).

    Call it after any hivemind DHT has been started: handlers installed here must not be inherited
    by the DHT's forked process (it would then ignore hivemind's own terminate()).
    """
    import uvicorn

    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

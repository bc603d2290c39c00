"""The peer's listener for direct inference streams (TLS over TCP; see swarm/direct.py).

Each connection carries one inference session, served by the same `rpc_inference` generator as the
hivemind P2P stream, so validation, caches, metering and errors are identical on both transports.
A frame that breaks the framing (too large, not a protobuf) is answered with an `invalid_request`
error and the connection is dropped; nothing a connection sends can disturb the other sessions.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable

from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.direct import (
    DirectEndpoint,
    DirectStreamError,
    FrameTooLargeError,
    MalformedFrameError,
    TlsIdentity,
    encode_frame,
    read_frame,
)

logger = logging.getLogger(__name__)

# Serves one session: requests in, responses out (BlockHandler.rpc_inference without a P2P context).
SessionServer = Callable[[AsyncIterator[runtime_pb2.ExpertRequest]], AsyncIterator[runtime_pb2.ExpertResponse]]


class DirectServer:
    """Accepts direct streams for `serve`, at most `max_connections` at a time."""

    def __init__(
        self,
        serve: SessionServer,
        max_frame_bytes: int,
        identity: TlsIdentity | None = None,
        max_connections: int = 256,
        handshake_timeout: float = 10.0,
    ):
        self.serve = serve
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.identity = identity or TlsIdentity.generate()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.endpoint: DirectEndpoint | None = None  # set once listening
        self.connections_refused = 0

    async def start(self, host: str, port: int, advertised: str) -> DirectEndpoint:
        """Listens on host:port (0: a free port); clients are told to dial `advertised` at that port."""
        self._server = await asyncio.start_server(
            self._handle, host, port, ssl=self.identity.server_context(), ssl_handshake_timeout=self.handshake_timeout
        )
        self.endpoint = DirectEndpoint(advertised, self._server.sockets[0].getsockname()[1], self.identity.sha256)
        return self.endpoint

    def info(self) -> dict:
        """The `direct` field of the peer's rpc_info reply (empty until listening)."""
        return {"direct": self.endpoint.to_info()} if self.endpoint is not None else {}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_connections:
            self.connections_refused += 1
            logger.warning("refused a direct stream: %d connections open", len(self._connections))
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None  # asyncio.start_server runs each connection in its own task
        self._connections.add(task)
        try:
            await self._serve_connection(reader, writer)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            while (request := await read_frame(reader, runtime_pb2.ExpertRequest, self.max_frame_bytes)) is not None:
                yield request

        try:
            async for response in self.serve(requests()):
                writer.write(encode_frame(response))
                await writer.drain()
        except (FrameTooLargeError, MalformedFrameError) as e:
            logger.info("dropped a direct stream: %s", e)
            try:
                writer.write(encode_frame(protocol.error_response("invalid_request", str(e))))
                await asyncio.wait_for(writer.drain(), 1.0)
            except (TimeoutError, ConnectionError):
                pass
        except (DirectStreamError, ConnectionError):
            pass  # the client went away; its session stays until it idles out (it may resume)


def _ip_of(maddr: str) -> str | None:
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None


def listen_host(host_maddrs: list[str]) -> str:
    """The IP the direct listener binds: the one the peer's P2P endpoint listens on."""
    for maddr in host_maddrs:
        if (ip := _ip_of(maddr)) is not None:
            return ip
    return "127.0.0.1"


def advertised_host(listen: str, announce_maddrs: list[str] | None, visible_maddrs: list[str]) -> str:
    """The IP clients should dial: the listen IP if specific, else an announced or visible public one."""
    if listen not in ("0.0.0.0", "::"):
        return listen
    candidates = [ip for m in (announce_maddrs or []) + visible_maddrs if (ip := _ip_of(m)) is not None]
    public = [ip for ip in candidates if not ipaddress.ip_address(ip).is_loopback and ip not in ("0.0.0.0", "::")]
    return (public or candidates or ["127.0.0.1"])[0]

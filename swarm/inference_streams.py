"""The two transports of an inference stream to one peer: a direct TLS connection or a hivemind P2P stream.

Both carry the same messages (ExpertRequest out, ExpertResponse back) to the same handler on the peer;
`InferenceSession` does not care which one a hop uses. `SwarmClient.open_inference_stream` prefers the
direct one when the peer offers it and falls back to P2P when it cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.direct import END_OF_STREAM, MAX_RESPONSE_BYTES, DirectEndpoint, connect, encode_frame, read_frame


class InferenceStream(Protocol):
    transport: str  # "direct" or "p2p"

    async def send(self, request: runtime_pb2.ExpertRequest) -> None: ...

    async def receive(self) -> runtime_pb2.ExpertResponse:
        """The next reply; ConnectionError once the peer has closed the stream."""
        ...

    async def close(self) -> None:
        """Ends the stream cleanly (the peer frees the session's cache); never raises."""
        ...


class P2PInferenceStream:
    """`dllm.v1.inference` over a hivemind P2P stream."""

    transport = "p2p"

    def __init__(
        self,
        responses: AsyncGenerator[runtime_pb2.ExpertResponse, None],
        requests: asyncio.Queue[runtime_pb2.ExpertRequest | None],
    ):
        self._responses, self._requests = responses, requests

    @classmethod
    async def open(cls, p2p: P2P, peer_id: str) -> P2PInferenceStream:
        requests: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()

        async def outgoing() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            while (item := await requests.get()) is not None:
                yield item

        responses = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), protocol.HANDLER_INFERENCE, outgoing(), runtime_pb2.ExpertResponse
        )
        return cls(responses, requests)

    async def send(self, request: runtime_pb2.ExpertRequest) -> None:
        self._requests.put_nowait(request)

    async def receive(self) -> runtime_pb2.ExpertResponse:
        try:
            return await anext(self._responses)
        except StopAsyncIteration:
            raise ConnectionError("the peer closed the inference stream") from None

    async def close(self) -> None:
        self._requests.put_nowait(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._responses.aclose(), 1.0)


class DirectInferenceStream:
    """`dllm.v1.inference` over a direct TLS connection (swarm/direct.py)."""

    transport = "direct"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, endpoint: DirectEndpoint, timeout: float) -> DirectInferenceStream:
        return cls(*await connect(endpoint, timeout))

    async def send(self, request: runtime_pb2.ExpertRequest) -> None:
        self._writer.write(encode_frame(request))
        await self._writer.drain()

    async def receive(self) -> runtime_pb2.ExpertResponse:
        response = await read_frame(self._reader, runtime_pb2.ExpertResponse, MAX_RESPONSE_BYTES)
        if response is None:
            raise ConnectionError("the peer closed the inference stream")
        return response

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.write(END_OF_STREAM)
            await asyncio.wait_for(self._writer.drain(), 1.0)
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)

"""Sending tensors larger than hivemind's 4 MiB unary limit as a stream of chunks.

The first chunk of each tensor carries its dtype and shape; the rest carry only bytes. The receiver
checks the running total against a cap before buffering more, so a sender cannot exhaust its memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.protocol import ProtocolError

CHUNK_BYTES = 2 * 2**20


def split(tensor: runtime_pb2.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[runtime_pb2.Tensor]:
    """Yields the chunks of an encoded tensor (at least one, even for an empty tensor)."""
    buffer = memoryview(tensor.buffer)
    yield runtime_pb2.Tensor(
        buffer=buffer[:chunk_bytes].tobytes(),
        size=tensor.size,
        dtype=tensor.dtype,
        chunks=max(1, -(-len(buffer) // chunk_bytes)),
    )
    for start in range(chunk_bytes, len(buffer), chunk_bytes):
        yield runtime_pb2.Tensor(buffer=buffer[start : start + chunk_bytes].tobytes())


def requests(metadata: dict[str, Any], tensors: list[runtime_pb2.Tensor]) -> Iterator[runtime_pb2.ExpertRequest]:
    """The messages of a streamed request: metadata rides on the first."""
    first = True
    for tensor in tensors:
        for part in split(tensor):
            yield runtime_pb2.ExpertRequest(tensors=[part], metadata=protocol.pack_metadata(metadata) if first else b"")
            first = False


def _join(parts: list[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    heads: list[runtime_pb2.Tensor] = []
    buffers: list[list[bytes]] = []
    for part in parts:
        if part.dtype:  # the first chunk of a new tensor
            heads.append(part)
            buffers.append([part.buffer])
        elif not heads:
            raise ProtocolError("a streamed tensor must start with a chunk that names its dtype and shape")
        else:
            buffers[-1].append(part.buffer)
    return [
        runtime_pb2.Tensor(size=h.size, dtype=h.dtype, buffer=b"".join(b)) for h, b in zip(heads, buffers, strict=True)
    ]


async def receive(
    messages: AsyncIterator[runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse], max_bytes: int
) -> tuple[dict[str, Any], list[runtime_pb2.Tensor]]:
    """Collects a streamed request or response: (metadata of the first message, joined tensors)."""
    metadata: dict[str, Any] | None = None
    parts: list[runtime_pb2.Tensor] = []
    total = 0
    async for message in messages:
        if metadata is None:
            metadata = protocol.unpack_metadata(message.metadata)
            if "error" in metadata:
                return metadata, []
        for part in message.tensors:
            total += len(part.buffer)
            if total > max_bytes:
                raise ProtocolError(f"streamed tensors exceed the {max_bytes}-byte limit")
            parts.append(part)
    return metadata or {}, _join(parts)

"""The direct-stream listener in process: sessions served frame by frame, a connection cap, clean close."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.proto import runtime_pb2

from peer.direct_server import DirectServer, advertised_host, listen_host
from swarm import protocol
from swarm.direct import END_OF_STREAM, DirectStreamError, connect, encode_frame, read_frame

pytestmark = pytest.mark.timeout(60)


async def _echo(requests):
    """A session server that answers each request with its metadata."""
    async for request in requests:
        yield runtime_pb2.ExpertResponse(metadata=request.metadata)


async def _roundtrip(endpoint, metadata: dict) -> dict:
    reader, writer = await connect(endpoint, 5.0)
    try:
        writer.write(encode_frame(runtime_pb2.ExpertRequest(metadata=protocol.pack_metadata(metadata))))
        reply = await read_frame(reader, runtime_pb2.ExpertResponse, 2**20)
        writer.write(END_OF_STREAM)
        return protocol.unpack_metadata(reply.metadata)
    finally:
        writer.close()


def test_sessions_are_served_and_connections_past_the_cap_are_refused():
    async def run():
        server = DirectServer(_echo, max_frame_bytes=2**20, max_connections=1)
        endpoint = await server.start("127.0.0.1", 0, "127.0.0.1")
        try:
            assert await _roundtrip(endpoint, {"n": 1}) == {"n": 1}
            held_reader, held_writer = await connect(endpoint, 5.0)  # takes the only slot
            held_writer.write(encode_frame(runtime_pb2.ExpertRequest(metadata=protocol.pack_metadata({"n": 2}))))
            assert protocol.unpack_metadata(
                (await read_frame(held_reader, runtime_pb2.ExpertResponse, 2**20)).metadata
            ) == {"n": 2}
            with pytest.raises(DirectStreamError):  # refused: closed right after the handshake
                await _roundtrip(endpoint, {"n": 3})
            assert server.connections_refused == 1
            held_writer.write(END_OF_STREAM)
            held_writer.close()
            for _ in range(50):  # the slot frees once the held session ends
                if not server._connections:
                    break
                await asyncio.sleep(0.05)
            assert await _roundtrip(endpoint, {"n": 4}) == {"n": 4}
        finally:
            await server.close()
        with pytest.raises(DirectStreamError):  # closed: nobody listens any more
            await connect(endpoint, 2.0)

    asyncio.run(run())


def test_listen_and_advertised_hosts():
    assert listen_host(["/ip4/127.0.0.1/tcp/0"]) == "127.0.0.1"
    assert listen_host(["/ip6/::1/tcp/5"]) == "::1"
    assert advertised_host("10.1.2.3", None, []) == "10.1.2.3"
    # listening everywhere: dial the announced address, else a non-loopback visible one
    assert advertised_host("0.0.0.0", ["/ip4/203.0.113.9/tcp/31337"], ["/ip4/127.0.0.1/tcp/1"]) == "203.0.113.9"
    assert (
        advertised_host("0.0.0.0", None, ["/ip4/127.0.0.1/tcp/1/p2p/Qm", "/ip4/192.168.1.5/tcp/1/p2p/Qm"])
        == "192.168.1.5"
    )
    assert advertised_host("0.0.0.0", None, []) == "127.0.0.1"

"""Every malformed request gets a specific error back, and the peer keeps serving right after."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.dht import start_dht
from swarm.direct import END_OF_STREAM, DirectEndpoint, DirectStreamError, connect, encode_frame, read_frame
from swarm.tensors import encode

HIDDEN = 128


@pytest.fixture(scope="module")
def raw(swarm):
    """A bare P2P client of the shared swarm's first peer (0:4), on its own event loop."""
    loop = asyncio.new_event_loop()
    dht, _ = start_dht(swarm.initial_peers, client_mode=True)
    p2p = loop.run_until_complete(dht.replicate_p2p())
    peer = swarm.peers()[0]
    assert (peer.info["start"], peer.info["end"]) == (0, 4)
    yield loop, p2p, PeerID.from_base58(peer.info["peer_id"]), peer
    dht.shutdown()
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def _request(tensors, metadata=None, raw_metadata=None):
    meta = raw_metadata if raw_metadata is not None else protocol.pack_metadata(metadata or {"blocks": [0, 4]})
    return runtime_pb2.ExpertRequest(tensors=tensors, metadata=meta)


def _forward(raw, request) -> dict:
    loop, p2p, peer_id, _ = raw
    response = loop.run_until_complete(
        p2p.call_protobuf_handler(peer_id, protocol.HANDLER_FORWARD, request, runtime_pb2.ExpertResponse)
    )
    return {"meta": protocol.unpack_metadata(response.metadata), "tensors": response.tensors}


def _assert_still_serving(raw):
    ok = _forward(raw, _request([encode(torch.randn(1, 3, HIDDEN))]))
    assert "error" not in ok["meta"] and len(ok["tensors"]) == 1
    assert raw[3].alive


def _nan():
    x = torch.randn(1, 2, HIDDEN)
    x[0, 1, 5] = float("nan")
    return x


BAD_FORWARDS = {
    "wrong hidden size": ([encode(torch.randn(1, 4, 64))], None, "invalid_tensor", "shape"),
    "wrong rank": ([encode(torch.randn(4, HIDDEN))], None, "invalid_tensor", "shape"),
    "integer dtype": ([encode(torch.ones(1, 2, HIDDEN, dtype=torch.int64))], None, "invalid_tensor", "floating point"),
    "NaN values": ([encode(_nan())], None, "invalid_tensor", "NaN"),
    "oversize tensor": (
        [runtime_pb2.Tensor(size=[1, 10**6, HIDDEN], dtype="float32", buffer=b"\0" * 16)],
        None,
        "invalid_tensor",
        "limit",
    ),
    "buffer shorter than shape": (
        [runtime_pb2.Tensor(size=[1, 2, HIDDEN], dtype="float32", buffer=b"\0" * 7)],
        None,
        "invalid_tensor",
        "bytes",
    ),
    "unknown dtype": (
        [runtime_pb2.Tensor(size=[1], dtype="complex128", buffer=b"\0" * 16)],
        None,
        "invalid_tensor",
        "dtype",
    ),
    "no tensors": ([], None, "invalid_request", "exactly 1"),
    "blocks not hosted": ([encode(torch.randn(1, 2, HIDDEN))], {"blocks": [0, 8]}, "blocks_not_served", "0:4"),
    "blocks as garbage": ([encode(torch.randn(1, 2, HIDDEN))], {"blocks": "all"}, "invalid_request", "blocks"),
    "other model": ([encode(torch.randn(1, 2, HIDDEN))], {"model": "gpt-17"}, "blocks_not_served", "gpt-17"),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARDS))
def test_bad_forward_is_rejected_and_peer_keeps_serving(raw, case):
    tensors, metadata, kind, words = BAD_FORWARDS[case]
    reply = _forward(raw, _request(tensors, metadata))
    assert reply["meta"]["error"]["kind"] == kind
    assert words in reply["meta"]["error"]["message"]
    _assert_still_serving(raw)


def test_garbage_metadata_bytes(raw):
    reply = _forward(raw, _request([encode(torch.randn(1, 2, HIDDEN))], raw_metadata=b"\xc1\xff garbage"))
    assert reply["meta"]["error"]["kind"] == "invalid_request"
    reply = _forward(raw, _request([encode(torch.randn(1, 2, HIDDEN))], raw_metadata=msgpack.packb([1, 2])))
    assert "must be a map" in reply["meta"]["error"]["message"]
    _assert_still_serving(raw)


def test_garbage_protobuf_bytes(raw):
    loop, p2p, peer_id, _ = raw
    with pytest.raises(Exception) as info:
        loop.run_until_complete(
            p2p._client.call_unary_handler(peer_id, protocol.HANDLER_FORWARD, b"\xff\xfe\x00garbage")
        )
    assert (
        "pars" in str(info.value).lower() or "decode" in str(info.value).lower() or "error" in str(info.value).lower()
    )
    _assert_still_serving(raw)


def test_backward_with_mismatched_gradient(raw):
    loop, p2p, peer_id, _ = raw
    request = _request([encode(torch.randn(1, 3, HIDDEN)), encode(torch.randn(1, 2, HIDDEN))])
    response = loop.run_until_complete(
        p2p.call_protobuf_handler(peer_id, protocol.HANDLER_BACKWARD, request, runtime_pb2.ExpertResponse)
    )
    error = protocol.unpack_metadata(response.metadata)["error"]
    assert error["kind"] == "invalid_tensor" and "differs" in error["message"]
    _assert_still_serving(raw)


def _inference(raw, messages) -> list[dict]:
    loop, p2p, peer_id, _ = raw

    async def run():
        async def requests():
            for m in messages:
                yield m

        stream = await p2p.iterate_protobuf_handler(
            peer_id, protocol.HANDLER_INFERENCE, requests(), runtime_pb2.ExpertResponse
        )
        return [protocol.unpack_metadata(r.metadata) async for r in stream]

    return loop.run_until_complete(asyncio.wait_for(run(), 20))


def test_unknown_session_cannot_be_resumed(raw):
    replies = _inference(raw, [_request([], {"session_id": "no-such-session", "resume": True})])
    assert replies[0]["error"]["kind"] == "unknown_session"
    _assert_still_serving(raw)


def test_inference_rejects_bad_steps_but_keeps_the_session(raw):
    open_meta = {"blocks": [0, 4], "max_length": 8, "session_id": "bad-steps"}
    replies = _inference(
        raw,
        [
            _request([encode(torch.randn(1, 2, HIDDEN))], open_meta),
            _request([encode(_nan())], {"position": 2}),  # NaN: rejected
            _request([encode(torch.randn(1, 7, HIDDEN))], {"position": 2}),  # past max_length: rejected
            _request([encode(torch.randn(1, 1, HIDDEN))], {"position": 2}),  # fine: the session lives on
        ],
    )
    assert "error" not in replies[0]
    assert replies[1]["error"]["kind"] == "invalid_tensor"
    assert replies[2]["error"]["kind"] == "invalid_request" and "max_length" in replies[2]["error"]["message"]
    assert "error" not in replies[3] and replies[3]["position"] == 2
    _assert_still_serving(raw)


def test_session_over_the_cache_budget_is_refused(raw):
    replies = _inference(
        raw, [_request([encode(torch.randn(64, 1, HIDDEN))], {"blocks": [0, 4], "max_length": 4096, "batch": 64})]
    )
    assert replies[0]["error"]["kind"] == "cache_full" and "MiB" in replies[0]["error"]["message"]
    _assert_still_serving(raw)


# ---------------------------------------------------------------------------------- direct TLS streams
def _direct_endpoint(raw) -> DirectEndpoint:
    loop, p2p, peer_id, _ = raw
    reply = loop.run_until_complete(
        p2p.call_protobuf_handler(
            peer_id, protocol.HANDLER_INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
        )
    )
    return DirectEndpoint.from_info(protocol.unpack_metadata(reply.metadata)["direct"])


def _direct_exchange(raw, payload: bytes, tls: bool = True) -> list:
    """Sends raw bytes on a direct stream; returns the metadata of every frame the peer answered before closing."""
    loop, endpoint = raw[0], _direct_endpoint(raw)

    async def run():
        if tls:
            reader, writer = await connect(endpoint, 10)
        else:
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        writer.write(payload)
        await writer.drain()
        replies = []
        try:
            while (frame := await read_frame(reader, runtime_pb2.ExpertResponse, 2**24)) is not None:
                replies.append(protocol.unpack_metadata(frame.metadata))
        except DirectStreamError:
            pass  # the peer closed the connection
        writer.close()
        return replies

    return loop.run_until_complete(asyncio.wait_for(run(), 30))


def test_direct_stream_without_tls_is_dropped(raw):
    assert _direct_exchange(raw, b"GET / HTTP/1.1\r\n\r\n" * 10, tls=False) == []
    _assert_still_serving(raw)


@pytest.mark.parametrize(
    "payload, words",
    [
        (struct.pack(">I", 2**31) + b"\0" * 16, "exceeds"),
        (struct.pack(">I", 6) + b"\xff\xfe\x00junk", "not a valid ExpertRequest"),
    ],
)
def test_direct_stream_with_broken_framing_gets_an_error_and_is_dropped(raw, payload, words):
    replies = _direct_exchange(raw, payload)
    assert (
        len(replies) == 1
        and replies[0]["error"]["kind"] == "invalid_request"
        and words in replies[0]["error"]["message"]
    )
    _assert_still_serving(raw)


def test_direct_stream_rejects_bad_steps_like_p2p_and_keeps_the_session(raw):
    open_meta = {"blocks": [0, 4], "max_length": 8, "session_id": "direct-bad-steps"}
    steps = [
        _request([encode(torch.randn(1, 2, HIDDEN))], open_meta),
        _request([encode(_nan())], {"position": 2}),
        _request([runtime_pb2.Tensor(size=[1, 10**6, HIDDEN], dtype="float32", buffer=b"\0" * 16)], {"position": 2}),
        _request([encode(torch.randn(1, 1, HIDDEN))], {"position": 2}),
    ]
    replies = _direct_exchange(raw, b"".join(encode_frame(m) for m in steps) + END_OF_STREAM)
    assert [r.get("error", {}).get("kind") for r in replies] == [None, "invalid_tensor", "invalid_tensor", None]
    assert replies[3]["position"] == 2
    _assert_still_serving(raw)

"""Property-based fuzzing of everything a peer or client decodes from the network.

Each property says: whatever arrives, the decoder either returns a well-formed value or raises its
one documented error type (never another exception, never a crash). That includes the framing of
direct TLS inference streams and the direct endpoint a peer advertises. Receipts and verdicts are fuzzed
in tests/economy (test_receipts.py, test_verification.py) and not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import pytest
import torch
from hivemind.proto import runtime_pb2
from hypothesis import given
from hypothesis import strategies as st

from swarm import protocol, wire_errors
from swarm.direct import END_OF_STREAM, DirectEndpoint, DirectEndpointError, DirectStreamError, encode_frame, read_frame
from swarm.protocol import ProtocolError, RemotePeerError
from swarm.records import RecordError, ServerRecord
from swarm.tensors import MAX_TENSOR_BYTES, InvalidTensorError, check_hidden_states, decode, encode
from tests.fuzz.strategies import FUZZ, metadata_bytes, metadata_maps, tensor_messages, values

pytestmark = pytest.mark.timeout(600)


@FUZZ
@given(tensor_messages())
def test_decode_returns_a_consistent_tensor_or_invalid_tensor_error(message: runtime_pb2.Tensor) -> None:
    try:
        tensor = decode(message)
    except InvalidTensorError as e:
        assert str(e)
        return
    assert list(tensor.shape) == list(message.size)
    assert all(d >= 0 for d in tensor.shape)
    assert tensor.numel() * tensor.element_size() == len(message.buffer) <= MAX_TENSOR_BYTES
    if tensor.numel():
        assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == message.buffer


@FUZZ
@given(st.binary(max_size=600))
def test_decode_of_arbitrary_protobuf_bytes(raw: bytes) -> None:
    message = runtime_pb2.Tensor()
    try:
        message.ParseFromString(raw)
    except Exception:
        return  # protobuf itself refuses the bytes: the RPC layer answers a parse error
    with contextlib.suppress(InvalidTensorError):
        decode(message)


@FUZZ
@given(
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]),
    st.lists(st.integers(0, 5), max_size=4),
)
def test_encode_decode_roundtrip(dtype: torch.dtype, shape: list[int]) -> None:
    tensor = (torch.randn(shape) * 100).to(dtype)
    assert torch.equal(decode(encode(tensor)), tensor)


@FUZZ
@given(
    st.lists(st.integers(0, 5), max_size=5),
    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    st.sampled_from([None, "nan", "inf"]),
    st.integers(1, 8),
    st.integers(1, 64),
)
def test_check_hidden_states_accepts_exactly_finite_batch_tokens_hidden(
    shape, dtype, poison, hidden_size, max_tokens
) -> None:
    tensor = torch.randn(shape).to(dtype) if dtype != torch.bool else torch.ones(shape, dtype=torch.bool)
    if poison and tensor.numel() and tensor.is_floating_point():
        tensor.view(-1)[tensor.numel() // 2] = float(poison)
    try:
        out = check_hidden_states(tensor, hidden_size, max_tokens)
    except InvalidTensorError as e:
        assert str(e)
        return
    assert out is tensor and out.is_floating_point() and out.ndim == 3 and out.shape[-1] == hidden_size
    assert 1 <= out.shape[0] * out.shape[1] <= max_tokens and bool(torch.isfinite(out).all())


@FUZZ
@given(metadata_bytes)
def test_unpack_metadata_returns_a_map_or_protocol_error(raw: bytes) -> None:
    try:
        value = protocol.unpack_metadata(raw)
    except ProtocolError as e:
        assert str(e)
        return
    assert isinstance(value, dict)


@FUZZ
@given(
    metadata_maps,
    st.sampled_from(["blocks", "position", "max_length", "session_id", "resume"]),
    st.sampled_from([int, str, bool, list, dict]),
    st.booleans(),
)
def test_get_field_returns_the_type_asked_or_protocol_error(metadata, name, kind, with_default) -> None:
    try:
        value = (
            protocol.get_field(metadata, name, kind, default=None)
            if with_default
            else protocol.get_field(metadata, name, kind)
        )
    except ProtocolError as e:
        assert name in str(e)
        return
    if name not in metadata:
        assert with_default and value is None
    else:
        assert isinstance(value, kind) and not (kind is int and isinstance(value, bool))


@FUZZ
@given(metadata_maps, st.tuples(st.integers(0, 8), st.integers(0, 8)))
def test_get_block_range_returns_integer_range_or_protocol_error(metadata, default) -> None:
    try:
        blocks = protocol.get_block_range(metadata, default)
    except ProtocolError as e:
        assert "blocks" in str(e)
        return
    assert isinstance(blocks, range) and type(blocks.start) is int and type(blocks.stop) is int


@FUZZ
@given(metadata_bytes)
def test_client_error_parsing_raises_only_remote_peer_errors(raw: bytes) -> None:
    """What a client does with any reply's metadata: a map, then maybe a typed RemotePeerError."""
    try:
        metadata = protocol.unpack_metadata(raw)
        wire_errors.raise_if_error(metadata, "peer-x")
    except (ProtocolError, RemotePeerError) as e:
        assert str(e)


@FUZZ
@given(st.one_of(values, st.fixed_dictionaries({"error": values}), st.fixed_dictionaries({"error": metadata_maps})))
def test_raise_if_error_on_any_error_shape(metadata) -> None:
    if not isinstance(metadata, dict):
        return
    try:
        wire_errors.raise_if_error(metadata)
    except RemotePeerError as e:
        assert isinstance(e.remote_message, str)
        return
    assert metadata.get("error") is None


_GOOD_RECORD = {
    "peer_id": "QmPeer",
    "model": "tiny",
    "start": 0,
    "end": 4,
    "throughput": 10.0,
    "cache_tokens_free": 100,
    "rate": 1,
    "chain_account": None,
    "adapter_version": 0,
    "addrs": ["/ip4/127.0.0.1/tcp/1"],
    "num_blocks": 8,
    "params_per_block": 1000,
}


@FUZZ
@given(
    st.one_of(
        values,
        metadata_maps,
        # a valid record with one to three fields replaced by anything
        st.dictionaries(st.sampled_from(sorted(_GOOD_RECORD)), values, min_size=1, max_size=3).map(
            lambda d: {**_GOOD_RECORD, **d}
        ),
        # a valid record with fields missing
        st.sets(st.sampled_from(sorted(_GOOD_RECORD)), min_size=1, max_size=3).map(
            lambda drop: {k: v for k, v in _GOOD_RECORD.items() if k not in drop}
        ),
    )
)
def test_server_record_from_wire_is_valid_or_record_error(value) -> None:
    try:
        record = ServerRecord.from_wire(value, expires_at=1.0, owner="[owner:x]")
    except RecordError as e:
        assert str(e)
        return
    assert 0 <= record.start < record.end and type(record.start) is int and type(record.end) is int
    assert isinstance(record.throughput, (int, float)) and math.isfinite(record.throughput) and record.throughput >= 0
    assert isinstance(record.peer_id, str) and isinstance(record.model, str)
    assert record.rate >= 0 and record.cache_tokens_free >= 0 and record.owner == "[owner:x]"
    assert ServerRecord.from_wire(record.to_wire(), 1.0, "[owner:x]") == record


@FUZZ
@given(st.binary(max_size=400))
def test_server_record_from_arbitrary_msgpack_bytes(raw: bytes) -> None:
    """Records arrive msgpack-encoded through the DHT: garbage bytes never reach from_wire as anything but a value."""
    import msgpack

    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:
        return
    with contextlib.suppress(RecordError):
        ServerRecord.from_wire(value)


# ------------------------------------------------------------------------------ direct stream framing
def _read_all_frames(raw: bytes, limit: int) -> tuple[list[runtime_pb2.ExpertRequest], bool]:
    """(frames read, whether the stream ended cleanly) from `raw`, as a direct-stream listener reads them."""

    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        frames = []
        while True:
            try:
                frame = await read_frame(reader, runtime_pb2.ExpertRequest, limit)
            except DirectStreamError as e:
                assert str(e)
                return frames, False
            if frame is None:
                return frames, True
            frames.append(frame)

    return asyncio.run(run())


_frames = st.lists(
    st.builds(
        lambda t, m: runtime_pb2.ExpertRequest(tensors=t, metadata=m),
        st.lists(tensor_messages(), max_size=2),
        metadata_bytes,
    ),
    max_size=3,
)


@FUZZ
@given(
    st.one_of(st.binary(max_size=300), _frames.map(lambda fs: b"".join(encode_frame(f) for f in fs))),
    st.integers(0, 2048),
    st.integers(0, 16),
)
def test_read_frame_yields_messages_a_clean_end_or_a_direct_stream_error(raw: bytes, limit: int, cut: int) -> None:
    frames, _ = _read_all_frames(raw[: max(0, len(raw) - cut)], limit)
    assert all(isinstance(f, runtime_pb2.ExpertRequest) for f in frames)


@FUZZ
@given(_frames)
def test_encode_frame_read_frame_roundtrip(frames: list[runtime_pb2.ExpertRequest]) -> None:
    raw = b"".join(encode_frame(f) for f in frames) + END_OF_STREAM
    assert _read_all_frames(raw, 2**20) == (frames, True)


@FUZZ
@given(
    st.one_of(
        values,
        metadata_maps,
        st.fixed_dictionaries(
            {
                "host": st.one_of(st.sampled_from(["127.0.0.1", "::1", "10.0.0.7", "example.org", ""]), values),
                "port": st.one_of(st.integers(-5, 70000), values),
                "tls_sha256": st.one_of(
                    st.binary(min_size=32, max_size=32).map(bytes.hex), st.text(max_size=70), values
                ),
            }
        ),
    )
)
def test_direct_endpoint_from_info_is_valid_or_direct_endpoint_error(value) -> None:
    try:
        endpoint = DirectEndpoint.from_info(value)
    except DirectEndpointError as e:
        assert str(e)
        return
    assert 0 < endpoint.port < 65536 and len(endpoint.tls_sha256) == 32
    assert DirectEndpoint.from_info(endpoint.to_info()) == endpoint

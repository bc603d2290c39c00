"""Hypothesis strategies for hostile RPC inputs, shared by the CI fuzz tests and scripts/fuzz."""

from __future__ import annotations

import os

import msgpack
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# CI runs each property on at least 1,000 inputs; scripts/fuzz raises this for a long run.
EXAMPLES = int(os.environ.get("DLLM_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)

DTYPE_NAMES = [
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "float64",
    "complex128",
    "uint8",
    "",
    "FLOAT32",
    "float32\x00",
]

# Dimensions (uint32 on the wire) around the edges a decoder gets wrong: zero, huge, overflowing products.
dims = st.one_of(st.integers(0, 6), st.sampled_from([2**16, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))


@st.composite
def tensor_messages(draw) -> runtime_pb2.Tensor:
    """A `runtime_pb2.Tensor` that is sometimes well-formed and often subtly not."""
    dtype = draw(st.one_of(st.sampled_from(DTYPE_NAMES), st.text(max_size=12)))
    size = draw(st.lists(dims, max_size=10))
    item = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}.get(dtype, 4)
    count = 1
    for d in size:
        count *= d
    if draw(st.booleans()) and 0 <= count * item <= 4096:
        buffer = draw(st.binary(min_size=count * item, max_size=count * item))  # consistent with the shape
    else:
        buffer = draw(st.binary(max_size=256))
    compression = draw(st.sampled_from([0, 0, 0, 1, 2, 3, 5]))
    return runtime_pb2.Tensor(
        buffer=buffer,
        size=size,
        dtype=dtype,
        compression=compression,
        requires_grad=draw(st.booleans()),
        chunks=draw(st.integers(0, 3)),
    )


# msgpack-able values as a hostile client would send them: nesting, odd key types, big ints, bytes.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-5, 5)), children, max_size=5),
    ),
    max_leaves=20,
)
FIELD_NAMES = ["blocks", "position", "max_length", "batch", "session_id", "resume", "model", "error", "kind", "message"]
metadata_maps = st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)), values, max_size=8)


def packed(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# Raw metadata bytes: garbage, truncated or corrupted valid msgpack, and valid msgpack of any shape.
metadata_bytes = st.one_of(
    st.binary(max_size=512),
    values.map(packed),
    metadata_maps.map(packed),
    st.tuples(metadata_maps.map(packed), st.integers(0, 64)).map(lambda t: t[0][: max(0, len(t[0]) - t[1])]),
)

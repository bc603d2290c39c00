"""Tensors on the wire: encoding to hivemind's protobuf `Tensor` and strict, safe decoding.

Decoding never trusts the sender: the dtype must be on an allow-list, the declared shape must match
the buffer byte for byte and stay under a size cap, and hidden states must be finite. Every failure
raises InvalidTensorError with what was wrong, so a peer can answer it and keep serving.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hivemind.proto import runtime_pb2

from swarm.protocol import ENVELOPE_ROOM_BYTES, MAX_UNARY_MESSAGE_BYTES, ProtocolError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}

# 4 MiB is hivemind's unary message limit; one tensor must leave room for its message envelope.
MAX_TENSOR_BYTES = MAX_UNARY_MESSAGE_BYTES - ENVELOPE_ROOM_BYTES


class InvalidTensorError(ProtocolError):
    """A tensor in a request is malformed, of the wrong shape or dtype, too large, or not finite."""


def encode(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """Serialises a CPU tensor without compression."""
    tensor = tensor.detach()
    if tensor.dtype not in _NAMES:
        raise InvalidTensorError(f"dtype {tensor.dtype} cannot be sent; use one of {sorted(_DTYPES)}")
    tensor = tensor.contiguous().cpu()
    buffer = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return runtime_pb2.Tensor(buffer=buffer, size=list(tensor.shape), dtype=_NAMES[tensor.dtype])


def decode(message: runtime_pb2.Tensor, *, max_bytes: int = MAX_TENSOR_BYTES) -> torch.Tensor:
    """Restores a tensor from `message`, validating dtype, shape and size against the buffer."""
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise InvalidTensorError(f"unsupported dtype {message.dtype!r}; expected one of {sorted(_DTYPES)}")
    if message.compression != runtime_pb2.CompressionType.NONE:
        raise InvalidTensorError("compressed tensors are not accepted; send CompressionType.NONE")
    shape = tuple(int(s) for s in message.size)
    if len(shape) > 8:
        raise InvalidTensorError(f"tensor has {len(shape)} dimensions; at most 8 are accepted")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise InvalidTensorError(f"tensor of shape {shape} needs {nbytes} bytes, over the {max_bytes}-byte limit")
    if math.prod(max(s, 1) for s in shape) * dtype.itemsize > max_bytes:
        # A zero-sized dim must not hide huge others: torch would overflow computing their strides.
        raise InvalidTensorError(f"tensor of shape {shape} has dimensions over the {max_bytes}-byte limit")
    if len(message.buffer) != nbytes:
        raise InvalidTensorError(
            f"tensor buffer has {len(message.buffer)} bytes but shape {shape} {message.dtype} needs {nbytes}"
        )
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(message.buffer), dtype=dtype).view(shape)


def check_hidden_states(
    tensor: torch.Tensor, hidden_size: int, max_tokens: int, name: str = "hidden states"
) -> torch.Tensor:
    """Checks a [batch, tokens, hidden_size] floating tensor of finite values; returns it unchanged."""
    if not tensor.is_floating_point():
        raise InvalidTensorError(f"{name} must be floating point, got {tensor.dtype}")
    if tensor.ndim != 3 or tensor.shape[-1] != hidden_size:
        raise InvalidTensorError(f"{name} must have shape [batch, tokens, {hidden_size}], got {list(tensor.shape)}")
    if tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise InvalidTensorError(f"{name} is empty: shape {list(tensor.shape)}")
    if tensor.shape[0] * tensor.shape[1] > max_tokens:
        raise InvalidTensorError(
            f"{name} hold {tensor.shape[0] * tensor.shape[1]} tokens, "
            f"over this peer's limit of {max_tokens} per request"
        )
    if not _all_finite(tensor):
        raise InvalidTensorError(f"{name} contain NaN or infinite values")
    return tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float16, torch.float64):
        # Every message is checked on both ends: numpy costs a third of torch's per-call overhead here.
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())

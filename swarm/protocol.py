"""The peer RPC protocol: handler names, message metadata, and the errors a peer can answer with.

Requests and responses are hivemind `ExpertRequest`/`ExpertResponse` protobufs: tensors in `tensors`,
everything else as a msgpack dict in `metadata`. A peer that rejects a request answers with
`{"error": {"kind": ..., "message": ...}}`; the client raises the matching RemotePeerError subclass
(swarm/wire_errors.py holds the table between exceptions and kinds).
"""

from __future__ import annotations

from typing import Any

import msgpack
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from chain.errors import DLLMError, UnavailableError

PROTOCOL_VERSION = 1

HANDLER_INFO = "dllm.v1.info"
HANDLER_FORWARD = "dllm.v1.forward"
HANDLER_BACKWARD = "dllm.v1.backward"
HANDLER_INFERENCE = "dllm.v1.inference"
HANDLER_FORWARD_STREAM = "dllm.v1.forward_stream"
HANDLER_BACKWARD_STREAM = "dllm.v1.backward_stream"
HANDLER_RECEIPT = "dllm.v1.receipt"
HANDLER_VERIFY = "dllm.v1.verify"
HANDLER_ADAPTERS = "dllm.v1.adapters"
"""A learning peer's adapters of one version, by digest (request {"digest": 32 bytes}; streamed reply)."""
HANDLER_FEEDBACK_FETCH = "dllm.v1.feedback_fetch"
"""Published feedback by content hash: {"hashes": [32 bytes...]} -> {"examples": [record...], "missing": [...]}."""
HANDLER_FEEDBACK_PUSH = "dllm.v1.feedback_push"
"""A peer replicating its new feedback (peer/feedback_store.py): {"examples": [record...]} -> {"stored", "had"}."""
HANDLER_FEEDBACK_SHARE = "dllm.v1.feedback_share"
"""A client publishing an inference prompt it opted to share: {"example": record of kind "shared-prompt"}."""
HANDLER_EVIDENCE = "dllm.v1.evidence"
"""Served by verifiers: {"evidence": sha256} or {"sample": hash} -> the stored bytes (the fetcher re-hashes them)."""

VERIFIERS_KEY = "dllm/verifiers"
"""DHT key under which verifiers announce themselves and their gossip node (subkey: peer id + record owner)."""
GOSSIP_KEY = "dllm/gossip"
"""DHT key under which providers announce their gossip node (subkey: peer id + record owner)."""

MAX_UNARY_MESSAGE_BYTES = 4 * 2**20
"""hivemind's limit on one unary P2P message: anything larger must be streamed."""
ENVELOPE_ROOM_BYTES = 64 * 2**10
"""Room left in a unary message for metadata and protobuf framing around its payload."""

MAX_METADATA_BYTES = 64 * 2**10


class ProtocolError(DLLMError, ValueError):
    """A request or reply breaks the protocol (malformed metadata, missing fields): its sender is at fault."""


class BlocksNotServed(ProtocolError):
    """A request names blocks (or a model) this peer does not serve."""


class SessionNotFoundError(ProtocolError, KeyError):
    """A request names a session this peer does not hold (never opened, closed or expired)."""


class CacheFullError(UnavailableError, RuntimeError):
    """The peer's attention-cache budget cannot take this session now."""


class RemotePeerError(DLLMError, RuntimeError):
    """A peer answered a request with an error, or the call to it failed; `peer_id` says which peer.

    `kind` is the wire error kind (swarm/wire_errors.py maps each to its subclass)."""

    kind = "internal"

    def __init__(
        self, message: str, peer_id: str | None = None, kind: str | None = None, details: dict[str, Any] | None = None
    ):
        super().__init__(f"peer {peer_id}: {message}" if peer_id else message)
        self.remote_message = message
        self.peer_id = peer_id
        self.details = details or {}  # extra fields of the error reply, as the remote peer sent them
        if kind is not None:
            self.kind = kind


class InvalidRequestError(RemotePeerError):
    kind = "invalid_request"


class InvalidTensorRemoteError(RemotePeerError):
    kind = "invalid_tensor"


class UnknownSessionError(RemotePeerError):
    kind = "unknown_session"


class BlocksNotServedError(RemotePeerError):
    kind = "blocks_not_served"


class PeerBusyError(RemotePeerError):
    """The peer cannot take this session now (its attention-cache budget is full)."""

    kind = "cache_full"


class ReceiptRefusedError(RemotePeerError):
    """A provider refused a receipt RPC; `kind` names why (forged_receipt, replayed_receipt, ...)."""


class SampleRefusedError(RemotePeerError):
    """A verifier refused a work sample or abstained; `kind` names why (malformed_sample, unverifiable, ...)."""


class PaymentRequiredError(RemotePeerError):
    """A billing peer refused work until it is paid: no billing identity (`missing`), or the client owes it
    its credit limit (`owed`, `limit` in planck). Paying on chain and retrying is the way on."""

    kind = "payment_required"

    def _number(self, name: str) -> int:
        value = self.details.get(name)
        return value if type(value) is int and value >= 0 else 0

    @property
    def owed(self) -> int:
        return self._number("owed")

    @property
    def limit(self) -> int:
        return self._number("limit")

    @property
    def missing(self) -> str | None:
        value = self.details.get("missing")
        return value[:64] if isinstance(value, str) else None


class HopFailedError(RemotePeerError):
    """A call to this peer failed without an error reply: transport, timeout, or a reply that breaks the protocol."""

    kind = "hop_failed"


CALL_FAILURES: tuple[type[Exception], ...] = (
    TimeoutError,
    OSError,
    EOFError,
    P2PDaemonError,
    P2PHandlerError,
    ProtocolError,
)
"""How a call to a peer fails without an error reply: the stream breaks or times out, or the reply breaks the
protocol (InvalidTensorError is a ProtocolError). The client raises each as a HopFailedError naming the peer."""


def pack_metadata(metadata: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(metadata, use_bin_type=True)
    return packed


def unpack_metadata(raw: bytes) -> dict[str, Any]:
    """Decodes request metadata, raising ProtocolError for anything but a small msgpack map."""
    if not raw:
        return {}
    if len(raw) > MAX_METADATA_BYTES:
        raise ProtocolError(f"metadata of {len(raw)} bytes exceeds the {MAX_METADATA_BYTES}-byte limit")
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # msgpack's errors, and unhashable keys
        raise ProtocolError(f"metadata is not valid msgpack: {e}") from e
    if not isinstance(value, dict):
        raise ProtocolError(f"metadata must be a map, got {type(value).__name__}")
    return value


def error_response(kind: str, message: str, details: dict[str, Any] | None = None) -> runtime_pb2.ExpertResponse:
    """An error reply; `details` (small fields the kind defines, e.g. owed/limit of payment_required) go beside."""
    error: dict[str, Any] = {"kind": kind, "message": message}
    if details:
        error["details"] = details
    return runtime_pb2.ExpertResponse(metadata=pack_metadata({"error": error}))


def get_field(metadata: dict[str, Any], name: str, kind: type, *, default: Any = ...) -> Any:
    """Reads a typed field from request metadata, raising ProtocolError if absent or mistyped."""
    if name not in metadata:
        if default is ...:
            raise ProtocolError(f"request metadata lacks the field {name!r}")
        return default
    value = metadata[name]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def get_block_range(metadata: dict[str, Any], default: tuple[int, int]) -> range:
    """Reads `blocks: [start, end]` (defaults to the peer's whole span)."""
    value = metadata.get("blocks", list(default))
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value)):
        raise ProtocolError(f"field 'blocks' must be [start, end] integers, got {value!r}")
    return range(value[0], value[1])

"""The one table between exceptions and the error kinds peers answer with, both ways.

A serving process (the peer's block and receipt RPCs, the verifier's `dllm.v1.verify`) that refuses a
request answers `{"error": {"kind", "message", "details"?}}` (swarm/protocol.py `error_response`; details: the
local exception's `wire_details`, e.g. what a client owes); `reply_for` picks the kind from the exception's
class with this table. A caller reading such a reply raises the table's RemotePeerError subclass for the kind
(`raise_if_error`), with the peer id and the kind on it.

Invariants: the first row whose local classes match an exception wins, so specific rows come before
their bases (ProtocolError, the catch-all for "the request is bad", is last); an exception matching
no row is a bug on the serving side and goes out as `internal`, logged with its traceback; a kind
the table does not know (a newer peer) is raised as a plain RemotePeerError carrying that kind.
Threat: the message and kind come from a remote peer; both are only ever shown, never interpreted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hivemind.proto import runtime_pb2

from chain.errors import ChainConnectionError
from economy.credit import PaymentDueError
from economy.evidence_store import EvidenceNotFoundError, MalformedEvidenceError
from economy.presigned_settlement import SettlementOfferError
from economy.receipts import (
    ForgedReceiptError,
    MalformedReceiptError,
    NothingToBillError,
    ReceiptError,
    ReplayedReceiptError,
    UnexpectedReceiptError,
    WrongSignerError,
)
from economy.work_sample import (
    EvidenceMismatchError,
    MalformedWorkSampleError,
    SampleRejectedError,
    UnverifiableSampleError,
)
from swarm.feedback_records import FeedbackRecordError, FeedbackStoreFullError
from swarm.protocol import (
    BlocksNotServed,
    BlocksNotServedError,
    CacheFullError,
    InvalidRequestError,
    InvalidTensorRemoteError,
    PaymentRequiredError,
    PeerBusyError,
    ProtocolError,
    ReceiptRefusedError,
    RemotePeerError,
    SampleRefusedError,
    SessionNotFoundError,
    UnknownSessionError,
    error_response,
)
from swarm.tensors import InvalidTensorError

INTERNAL = "internal"
"""The kind of a failure the serving side did not expect (a bug there, not the caller's fault)."""


@dataclass(frozen=True)
class WireError:
    """One error kind: what a serving process raises for it, and what the caller raises on reading it."""

    kind: str
    local: tuple[type[Exception], ...]
    remote: type[RemotePeerError]


WIRE_ERRORS: tuple[WireError, ...] = (
    WireError("invalid_tensor", (InvalidTensorError,), InvalidTensorRemoteError),
    WireError("unknown_session", (SessionNotFoundError,), UnknownSessionError),
    WireError("blocks_not_served", (BlocksNotServed,), BlocksNotServedError),
    WireError("cache_full", (CacheFullError,), PeerBusyError),
    WireError("feedback_store_full", (FeedbackStoreFullError,), PeerBusyError),  # nothing evictable yet
    WireError("payment_required", (PaymentDueError,), PaymentRequiredError),  # details: owed, limit, missing
    WireError("malformed_receipt", (MalformedReceiptError,), ReceiptRefusedError),
    WireError("forged_receipt", (ForgedReceiptError,), ReceiptRefusedError),
    WireError("wrong_signer", (WrongSignerError,), ReceiptRefusedError),
    WireError("replayed_receipt", (ReplayedReceiptError,), ReceiptRefusedError),
    WireError("unexpected_receipt", (UnexpectedReceiptError,), ReceiptRefusedError),
    WireError("nothing_to_bill", (NothingToBillError,), ReceiptRefusedError),
    WireError("invalid_receipt", (ReceiptError,), ReceiptRefusedError),  # after its specific subclasses
    WireError("invalid_settlement", (SettlementOfferError,), ReceiptRefusedError),
    WireError("chain_unavailable", (ChainConnectionError,), ReceiptRefusedError),  # the client may retry later
    WireError("malformed_sample", (MalformedWorkSampleError,), SampleRefusedError),
    WireError("evidence_mismatch", (EvidenceMismatchError,), SampleRefusedError),
    WireError("invalid_sample", (SampleRejectedError,), SampleRefusedError),
    WireError("unverifiable", (UnverifiableSampleError,), SampleRefusedError),  # an abstention, not a verdict
    WireError("malformed_evidence", (MalformedEvidenceError,), SampleRefusedError),
    WireError("evidence_not_found", (EvidenceNotFoundError,), SampleRefusedError),  # dllm.v1.evidence: not held here
    WireError("invalid_feedback", (FeedbackRecordError,), InvalidRequestError),  # oversized, non-UTF-8, forged
    WireError("invalid_request", (ProtocolError,), InvalidRequestError),  # last: the rows above are ProtocolErrors too
)

_BY_KIND: dict[str, WireError] = {row.kind: row for row in WIRE_ERRORS}


def kind_of(error: BaseException) -> str | None:
    """The wire kind for an exception a serving process raised, or None if no row covers it (a bug)."""
    for row in WIRE_ERRORS:
        if isinstance(error, row.local):
            return row.kind
    return None


def reply_for(error: Exception, what: str, logger: logging.Logger) -> runtime_pb2.ExpertResponse:
    """The error reply refusing a request that raised `error`; a refusal is logged at INFO, a bug with its traceback."""
    kind = kind_of(error)
    if kind is None:
        logger.error("%s failed", what, exc_info=error)
        return error_response(INTERNAL, f"{type(error).__name__}: {error}")
    logger.info("rejected %s: %s", what, error)
    return error_response(kind, str(error), getattr(error, "wire_details", None))


def remote_class(kind: str) -> type[RemotePeerError]:
    """The exception a caller raises for an error reply of this kind (RemotePeerError for unknown kinds)."""
    row = _BY_KIND.get(kind)
    return row.remote if row is not None else RemotePeerError


def raise_if_error(metadata: dict[str, Any], peer_id: str | None = None) -> None:
    """Raises the RemotePeerError subclass for an error reply (with the peer and the kind); returns otherwise."""
    error = metadata.get("error")
    if error is None:
        return
    if not isinstance(error, dict):
        raise RemotePeerError(f"malformed error reply: {error!r:.200}", peer_id)
    kind = error.get("kind")
    if not isinstance(kind, str):
        raise RemotePeerError(f"error reply without a kind: {error!r:.200}", peer_id)
    details = error.get("details")
    raise remote_class(kind)(
        str(error.get("message", "no message")),
        peer_id,
        kind=kind[:64],
        details=details if isinstance(details, dict) else None,
    )

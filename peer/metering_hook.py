"""The peer's usage meters: one `UsageMeter` per metered inference session.

`BlockHandler` calls `open` when a client opens a session naming its chain account, and `record`
after each step with the step's input and output exactly as they crossed the wire, so the meter's
commitment equals the one the client computes. A peer that charges (`require_client`, rate > 0)
refuses a session without a client account with PaymentDueError (`payment_required`, missing "client");
a free peer serves it unmetered. Meters outlive the stream for a while so that the client can ask for
the final receipt after its last step; a meter dropped with work never receipted is handed to `on_drop`
(the credit guard keeps that amount against the client: peer/credit_guard.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from economy.canonical import CanonicalFormatError, check_ss58
from economy.credit import PaymentDueError
from economy.metering import StepKind, UsageMeter, step_kind_at
from economy.receipts import BASE_WEIGHTS, NO_ADAPTER_DIGEST, TRAINING_ADAPTERS, UsageReceipt
from swarm.protocol import ProtocolError, SessionNotFoundError

logger = logging.getLogger(__name__)

MAX_METERED_SESSIONS = 10_000


class MeteringRequestError(ProtocolError):
    """A session's billing fields (client account, sampling flag) are malformed."""


class UnknownMeteredSessionError(SessionNotFoundError):
    """No metered session has this id (never opened with a client account, or expired)."""


@dataclass
class MeteredSession:
    """A session's meter, the client it bills, and the receipt proposed but not yet countersigned."""

    meter: UsageMeter
    client: str
    adapter_version: int = BASE_WEIGHTS
    """Weights the session ran with, stated in its receipts."""
    adapter_digest: bytes = NO_ADAPTER_DIGEST
    """sha256 of that adapter version's tensors (peer.adapters.adapter_digest), stated in its receipts."""
    sequence: int = 0
    pending: UsageReceipt | None = None
    last_used: float = field(default_factory=time.monotonic)


class SessionMeters:
    """All metered sessions of one peer, expired `idle_s` after their last use."""

    def __init__(self, model: str, params_per_block: int, idle_s: float, dtype: str = "float32"):
        self.model = model
        self.params_per_block = params_per_block
        self.idle_s = idle_s
        self.dtype = dtype
        """The span's compute dtype (PeerConfig.dtype), stated in every receipt as in the peer's DHT record."""
        self._sessions: dict[str, MeteredSession] = {}
        self._by_client: dict[str, set[str]] = {}
        self.require_client = False  # set by a peer that charges: a session must name who pays
        self.on_drop: Callable[[MeteredSession], None] | None = None
        self.retain_adapters: Callable[[int], bytes] | None = None
        """Set by a learning peer: archives an adapter version a receipt will name, returns its digest."""

    def __len__(self) -> int:
        return len(self._sessions)

    def open(
        self, session_id: str, blocks: range, metadata: dict, adapter_version: int = BASE_WEIGHTS
    ) -> MeteredSession | None:
        """Starts metering a session whose opening metadata names a `client` account; else None.

        `adapter_version` is the weights the request runs with (receipts state it)."""
        client = self.client_of(metadata)
        if client is None:
            return None
        try:
            check_ss58(client, "client")
        except CanonicalFormatError as e:
            raise MeteringRequestError(f"{e}: name the paying client's chain account") from None
        sampled = metadata.get("sampled", False)
        if type(sampled) is not bool:
            raise MeteringRequestError("field 'sampled' must be a bool")
        raw_id = session_id.encode()
        if len(raw_id) > 64:
            raise MeteringRequestError("a metered session_id must be at most 64 bytes")
        if session_id in self._sessions:
            session = self._sessions[session_id]
            if adapter_version != BASE_WEIGHTS:  # once any step ran with adapters, a base re-run cannot match
                session.adapter_version = adapter_version
                session.adapter_digest = self._digest_of(adapter_version)
            return session
        self.expire_idle()
        if len(self._sessions) >= MAX_METERED_SESSIONS:
            raise MeteringRequestError("too many metered sessions are open; retry later")
        meter = UsageMeter(
            raw_id,
            self.model,
            blocks.start,
            blocks.stop,
            (blocks.stop - blocks.start) * self.params_per_block,
            sampled=sampled,
        )
        session = MeteredSession(meter, client, adapter_version, self._digest_of(adapter_version))
        self._sessions[session_id] = session
        self._by_client.setdefault(client, set()).add(session_id)
        return session

    def _digest_of(self, adapter_version: int) -> bytes:
        """The digest a receipt states for `adapter_version`, the version archived for verifiers first."""
        if adapter_version in (BASE_WEIGHTS, TRAINING_ADAPTERS):
            return NO_ADAPTER_DIGEST
        if self.retain_adapters is None:
            raise MeteringRequestError(
                f"adapter version {adapter_version} cannot be metered by a peer without adapters"
            )
        return self.retain_adapters(adapter_version)

    def client_of(self, metadata: dict) -> str | None:
        """The request's `client` field; a peer that charges refuses a request without one (PaymentDueError)."""
        client = metadata.get("client")
        if client is None and self.require_client:
            raise PaymentDueError(
                "this peer charges for its work: open the session with a 'client' chain account (and pay its receipts)",
                missing="client",
            )
        return client

    def sessions_of(self, client: str) -> list[MeteredSession]:
        """The client's metered sessions held here (open, or kept for their final receipt)."""
        return [self._sessions[sid] for sid in self._by_client.get(client, ())]

    def record(
        self, session_id: str, inputs: torch.Tensor, outputs: torch.Tensor, position: int, kind: StepKind | None = None
    ) -> None:
        """Meters one served step (no-op for a session that is not metered); `kind` defaults by position."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        tokens = int(inputs.shape[0] * inputs.shape[1])
        session.meter.record_step(kind or step_kind_at(position), tokens, inputs, outputs, position)
        session.last_used = time.monotonic()

    def get(self, session_id: str) -> MeteredSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownMeteredSessionError(
                f"no metered session {session_id!r} here (not opened with a client account, or expired)"
            )
        session.last_used = time.monotonic()
        return session

    def expire_idle(self) -> int:
        """Drops sessions idle longer than idle_s; returns how many."""
        cutoff = time.monotonic() - self.idle_s
        stale = [sid for sid, s in self._sessions.items() if s.last_used < cutoff]
        for sid in stale:
            session = self._sessions.pop(sid)
            others = self._by_client.get(session.client)
            if others is not None:
                others.discard(sid)
                if not others:
                    del self._by_client[session.client]
            if self.on_drop is not None:
                self.on_drop(session)
        if stale:
            logger.info("dropped %d idle metered sessions", len(stale))
        return len(stale)

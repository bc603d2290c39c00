"""Inference sessions through a route of peers, with failover that replays the session's history.

Each hop holds an inference stream to one peer (direct TLS or hivemind P2P: swarm/inference_streams.py);
the peer keeps the attention cache for its blocks. The client
keeps every hidden state it sent to each hop, so when a peer dies, stalls or answers garbage, the
session bans it, routes those blocks through other peers, replays the history there to rebuild their
caches, and carries on: greedy output is the same as without the failure. A peer that refuses a step
with `payment_required` is first handed to `on_payment_required` (billing pays what it owes and says
whether to retry): the step is retried once on the same stream, then the peer is routed around.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from chain.errors import UnavailableError
from swarm import protocol, wire_errors
from swarm.direct import MAX_RESPONSE_BYTES
from swarm.inference_streams import InferenceStream
from swarm.routing import Hop, NoRouteError
from swarm.tensors import InvalidTensorError, check_hidden_states, decode, encode

logger = logging.getLogger(__name__)

# Plans a route for blocks start..end-1, avoiding banned peers.
RoutePlanner = Callable[[int, int], Awaitable[list[Hop]]]
# Tells whether a peer still answers a cheap request (used when a step is slower than usual).
LivenessProbe = Callable[[str], Awaitable[bool]]
# Opens an inference stream to a peer (SwarmClient.open_inference_stream picks the transport).
StreamOpener = Callable[[str], Awaitable[InferenceStream]]

# Told of every completed step of a hop: (hop stream, inputs sent, outputs received, position).
# Billing meters steps through it (swarm/billing.py).
StepObserver = Callable[["_HopStream", torch.Tensor, torch.Tensor, int], None]

# Told when a hop refuses a step until it is paid; returns True once paid, to retry the step there once.
PaymentHandler = Callable[["_HopStream", protocol.PaymentRequiredError], Awaitable[bool]]

# A step slower than this many times the usual step time makes us check that the peer is alive.
_SUSPICION_FACTOR = 8.0
_MIN_SUSPICION_S = 0.25


class SessionFailedError(UnavailableError, RuntimeError):
    """The session could not continue: every failover attempt failed."""


class _HopStream:
    """One open inference stream to one peer, with the inputs it has been sent so far."""

    def __init__(
        self,
        open_stream: StreamOpener,
        hop: Hop,
        model: str,
        max_length: int,
        batch: int,
        timeout: float,
        probe: LivenessProbe,
        observer: StepObserver | None = None,
        open_extra: dict[str, Any] | None = None,
    ):
        self.session_id = uuid.uuid4().hex
        self.observer, self.open_extra = observer, open_extra or {}
        self.open_stream, self.hop, self.model, self.probe = open_stream, hop, model, probe
        self._step_time: float | None = None  # moving average of recent step round trips
        self.max_length, self.batch, self.timeout = max_length, batch, timeout
        self.history: list[torch.Tensor] = []
        self.position = 0
        self._stream: InferenceStream | None = None

    @property
    def transport(self) -> str | None:
        """ "direct" or "p2p" once the stream is open."""
        return self._stream.transport if self._stream is not None else None

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        metadata: dict[str, Any] = {"position": self.position}
        if self._stream is None:
            metadata.update(
                model=self.model,
                blocks=[self.hop.start, self.hop.end],
                max_length=self.max_length,
                batch=self.batch,
                session_id=self.session_id,
                **self.open_extra,
            )
        request = runtime_pb2.ExpertRequest(tensors=[encode(hidden)], metadata=protocol.pack_metadata(metadata))
        if self._stream is None:
            self._stream = await asyncio.wait_for(self.open_stream(self.hop.peer_id), self.timeout)
        await self._stream.send(request)
        started = time.perf_counter()
        response = await self._await_response(self._stream)
        elapsed = time.perf_counter() - started
        if hidden.shape[1] == 1:
            self._step_time = elapsed if self._step_time is None else 0.8 * self._step_time + 0.2 * elapsed
        meta = protocol.unpack_metadata(response.metadata)
        wire_errors.raise_if_error(meta, self.hop.peer_id)
        if len(response.tensors) != 1:
            raise InvalidTensorError(f"peer {self.hop.peer_id} returned {len(response.tensors)} tensors, expected 1")
        output = decode(response.tensors[0], max_bytes=MAX_RESPONSE_BYTES)  # a failover replay can be large
        check_hidden_states(output, hidden.shape[-1], 2**31, f"output of peer {self.hop.peer_id}")
        if output.shape != hidden.shape:
            raise InvalidTensorError(
                f"peer {self.hop.peer_id} returned shape {list(output.shape)} for input {list(hidden.shape)}"
            )
        if self.observer is not None:
            self.observer(self, hidden, output, self.position)
        self.history.append(hidden)
        self.position += hidden.shape[1]
        return output.to(hidden.dtype)

    async def _await_response(self, stream: InferenceStream) -> runtime_pb2.ExpertResponse:
        """The next reply, failing fast if the peer died.

        hivemind's stream does not always end when the remote process dies, so a step that takes
        much longer than usual triggers a cheap liveness probe; a dead or frozen peer fails the probe
        within about a second, while a merely slow peer gets the full timeout.
        """
        pending = asyncio.ensure_future(stream.receive())
        deadline = time.perf_counter() + self.timeout
        suspicion = max(_MIN_SUSPICION_S, _SUSPICION_FACTOR * (self._step_time or _MIN_SUSPICION_S))
        try:
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError(f"peer {self.hop.peer_id} did not answer within {self.timeout:.1f} s")
                done, _ = await asyncio.wait({pending}, timeout=min(suspicion, remaining))
                if done:
                    return pending.result()
                if not await self.probe(self.hop.peer_id):
                    raise ConnectionError(f"peer {self.hop.peer_id} stopped answering")
                suspicion *= 2
        finally:
            if not pending.done():
                pending.cancel()

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()


class InferenceSession:
    """A generation session over the swarm: `await step(hidden)` runs new tokens through every block."""

    def __init__(
        self,
        open_stream: StreamOpener,
        model: str,
        num_blocks: int,
        plan: RoutePlanner,
        on_failure: Callable[[str, Exception], None],
        probe: LivenessProbe,
        *,
        max_length: int,
        batch: int = 1,
        timeout: float = 10.0,
        max_failovers: int = 8,
        observer: StepObserver | None = None,
        open_extra: dict[str, Any] | None = None,
        on_payment_required: PaymentHandler | None = None,
    ):
        self.observer, self.open_extra = observer, open_extra
        self.on_payment_required = on_payment_required
        self.open_stream, self.model, self.num_blocks = open_stream, model, num_blocks
        self.plan, self.on_failure, self.probe = plan, on_failure, probe
        self.max_length, self.batch, self.timeout = max_length, batch, timeout
        self.max_failovers = max_failovers
        self.hops: list[_HopStream] = []
        self.failovers = 0
        self.stall_seconds: list[float] = []  # per failover: from the failing step's start to recovery

    def _new_hops(self, hops: list[Hop]) -> list[_HopStream]:
        return [
            _HopStream(
                self.open_stream,
                h,
                self.model,
                self.max_length,
                self.batch,
                self.timeout,
                self.probe,
                self.observer,
                self.open_extra,
            )
            for h in hops
        ]

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.hops:
            self.hops = self._new_hops(await self.plan(0, self.num_blocks))
        i = 0
        while i < len(self.hops):
            hop = self.hops[i]
            step_started = time.perf_counter()
            try:
                hidden = await self._step_or_pay(hop, hidden)
                i += 1
            except (protocol.InvalidRequestError, protocol.InvalidTensorRemoteError):
                raise  # our own request is bad: another peer would reject it too
            except Exception as e:  # dead, stalled, busy, unpaid or lying peer: route around it
                replacement, output = await self._fail_over(hop, hidden, e, step_started)
                self.hops[i : i + 1] = replacement
                hidden = output
                i += len(replacement)
        return hidden

    async def _step_or_pay(self, hop: _HopStream, hidden: torch.Tensor) -> torch.Tensor:
        """One step on `hop`; refused for payment, it is retried once after billing paid (if it did)."""
        try:
            return await hop.step(hidden)
        except protocol.PaymentRequiredError as e:
            if self.on_payment_required is None or not await self.on_payment_required(hop, e):
                raise
            logger.info("peer %s wanted payment (%s); paid, retrying the step", hop.hop.peer_id, e.remote_message)
            return await hop.step(hidden)

    async def _fail_over(
        self, failed: _HopStream, current: torch.Tensor, error: Exception, started: float
    ) -> tuple[list[_HopStream], torch.Tensor]:
        """Replaces `failed` by new hops for the same blocks and replays its history through them."""
        # A busy peer (cache budget full) is healthy and expected under load: not worth a warning.
        log = logger.info if isinstance(error, protocol.PeerBusyError) else logger.warning
        log(
            "peer %s failed on blocks %d:%d (%s: %s); re-routing",
            failed.hop.peer_id,
            failed.hop.start,
            failed.hop.end,
            type(error).__name__,
            error,
        )
        self.on_failure(failed.hop.peer_id, error)
        asyncio.create_task(failed.close())
        last_error: Exception = error
        while self.failovers < self.max_failovers:
            self.failovers += 1
            try:
                hops = self._new_hops(await self.plan(failed.hop.start, failed.hop.end))
            except NoRouteError as e:
                raise SessionFailedError(f"lost blocks {failed.hop.start}:{failed.hop.end} and {e}") from last_error
            # One message per new hop: the whole history plus the current step, so caches are rebuilt.
            x = torch.cat(failed.history + [current], dim=1)
            try:
                for hop in hops:
                    x = await hop.step(x)
            except Exception as e:  # as in step(): a dead, stalled, busy or lying peer, so try another route
                last_error = e
                self.on_failure(hop.hop.peer_id, e)
                for h in hops:
                    asyncio.create_task(h.close())
                continue
            self.stall_seconds.append(time.perf_counter() - started)
            return hops, x[:, -current.shape[1] :]
        raise SessionFailedError(f"gave up after {self.failovers} failovers: {last_error}") from last_error

    async def close(self) -> None:
        await asyncio.gather(*(h.close() for h in self.hops), return_exceptions=True)

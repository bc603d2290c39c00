"""The peer's RPC handlers: info, forward, backward and streaming inference over hivemind P2P.

Every handler validates its request before touching the model and answers a rejected request with a
typed error (see swarm.protocol); nothing a caller sends can take the peer down or disturb other
sessions. Compute runs on a dedicated thread so the event loop keeps serving I/O meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from economy.metering import StepKind, step_kind_at
from economy.receipts import BASE_WEIGHTS, TRAINING_ADAPTERS
from peer.config import PeerConfig
from peer.kv_cache import CacheManager, CacheOverflowError
from peer.learning import SpanLearner
from peer.metering_hook import MeteringRequestError, SessionMeters
from peer.span import SpanRunner
from swarm import chunks, protocol, wire_errors
from swarm.contributors import ContributionVerifier, ContributorAuthError
from swarm.feedback_records import FeedbackExample, FeedbackRecordError, FeedbackStoreFullError, example_from_wire
from swarm.protocol import BlocksNotServed, ProtocolError
from swarm.tensors import InvalidTensorError, check_hidden_states, decode, encode

if TYPE_CHECKING:  # only a peer that charges loads it (peer/receipt_service.py)
    from peer.credit_guard import CreditGuard
    from peer.feedback_store import FeedbackPublisher

logger = logging.getLogger(__name__)


_INLINE_COMPUTE_S = 0.004


async def _await_end(requests: AsyncIterator[runtime_pb2.ExpertRequest], timeout: float) -> None:
    """Waits (ignoring further messages) until the caller ends its stream, at most `timeout` seconds.

    A hivemind stream closed by its handler while the caller's end-of-stream marker is still unread is
    reset, and the reply just sent can be lost with it: the caller would see a bare broken stream
    instead of the error that explains it (seen in ~4% of rejected opens)."""

    async def drain() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(Exception):  # a broken or slow caller: nothing more to tell it
        await asyncio.wait_for(drain(), timeout)


class BlockHandler:
    """Serves one span of blocks to clients. `info_extra` adds fields to rpc_info's reply."""

    def __init__(
        self,
        config: PeerConfig,
        span: SpanRunner,
        model_name: str,
        info_extra: Callable[[], dict] | None = None,
        learner: SpanLearner | None = None,
    ):
        self.config = config
        self.learner = learner  # adapters on this span (None: plain frozen blocks)
        self._session_versions: dict[str, int] = {}  # adapter version each inference session pinned
        self.span = span
        self.model_name = model_name
        self.caches = CacheManager(config.cache_bytes)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-compute")
        self.info_extra = info_extra or (lambda: {})
        self.requests_served = 0
        self.requests_rejected = 0
        self._compute_time: dict[int, float] = {}
        self.metering: SessionMeters | None = None  # set by the server when this peer bills (peer/receipt_service.py)
        self.credit: CreditGuard | None = None  # set by the server when this peer charges: each step within credit
        # Training passes are filed under the chain account that signed them (swarm/contributors.py); set with
        # the P2P peer id the signatures name, in add_handlers.
        self.contributions: ContributionVerifier | None = None
        # Where the examples this peer trains on are stored and published (peer/feedback_store.py; set by the server).
        self.publisher: FeedbackPublisher | None = None

    async def add_handlers(self, p2p: P2P) -> None:
        if self.learner is not None:
            self.contributions = ContributionVerifier(self.model_name, p2p.peer_id.to_base58())
        await p2p.add_protobuf_handler(protocol.HANDLER_INFO, self.rpc_info, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(protocol.HANDLER_FORWARD, self.rpc_forward, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(protocol.HANDLER_BACKWARD, self.rpc_backward, runtime_pb2.ExpertRequest)
        for name, handler in (
            (protocol.HANDLER_FORWARD_STREAM, self.rpc_forward_stream),
            (protocol.HANDLER_BACKWARD_STREAM, self.rpc_backward_stream),
        ):
            await p2p.add_protobuf_handler(
                name, handler, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )
        await p2p.add_protobuf_handler(
            protocol.HANDLER_INFERENCE,
            self.rpc_inference,
            runtime_pb2.ExpertRequest,
            stream_input=True,
            stream_output=True,
        )

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- helpers -------------------------------------------------------------------------------

    async def _compute(self, fn, tokens: int):
        """Runs `fn` inline if work of this size has been quick so far, else on the compute thread.

        Handing a ~1 ms single-token step to a thread costs about as much as the step itself on a
        small machine, while a long prefill inline would stall every other session's I/O.
        """
        key = min(tokens, 2)  # single-token decode steps vs anything bigger
        recent = self._compute_time.get(key)
        started = time.perf_counter()
        if recent is not None and recent < _INLINE_COMPUTE_S:
            result = fn()
        else:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        elapsed = time.perf_counter() - started
        self._compute_time[key] = elapsed if recent is None else 0.7 * recent + 0.3 * elapsed
        return result

    def _blocks(self, metadata: dict) -> range:
        blocks = protocol.get_block_range(metadata, (self.span.start, self.span.end))
        if not (self.span.start <= blocks.start < blocks.stop <= self.span.end):
            raise BlocksNotServed(
                f"blocks {blocks.start}:{blocks.stop} are not served here; this peer serves "
                f"{self.span.start}:{self.span.end} of {self.model_name}"
            )
        return blocks

    def _hidden(self, message: runtime_pb2.Tensor, name: str = "hidden states") -> torch.Tensor:
        """A validated [batch, tokens, hidden] tensor, in the dtype it came in (replies use the same)."""
        tensor = decode(message, max_bytes=self.config.max_stream_bytes)
        return check_hidden_states(tensor, self.span.hidden_size, self.config.max_tokens_per_request, name)

    def _reject(self, e: Exception, what: str) -> runtime_pb2.ExpertResponse:
        self.requests_rejected += 1
        return wire_errors.reply_for(e, what, logger)

    def _check_model(self, metadata: dict) -> None:
        model = metadata.get("model")
        if model is not None and model != self.model_name:
            raise BlocksNotServed(f"this peer serves {self.model_name!r}, not {model!r}")

    # --- RPCs ----------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        info = {
            "version": protocol.PROTOCOL_VERSION,
            "model": self.model_name,
            "start": self.span.start,
            "end": self.span.end,
            "cache_free_bytes": self.caches.free_bytes(),
            "sessions": len(self.caches),
            "requests_served": self.requests_served,
            "requests_rejected": self.requests_rejected,
            **self.info_extra(),
        }
        return runtime_pb2.ExpertResponse(metadata=protocol.pack_metadata(info))

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Runs a whole sequence through the requested blocks (no cache): [hidden] -> [hidden]."""
        try:
            output = await self._forward(protocol.unpack_metadata(request.metadata), list(request.tensors))
            return runtime_pb2.ExpertResponse(tensors=[encode(output)])
        except Exception as e:  # an RPC boundary: any failure becomes an error reply, the peer serves on
            return self._reject(e, "forward")

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Gradient w.r.t. the inputs: [hidden_in, grad_out] -> [grad_in], recomputing the forward."""
        try:
            grad_in = await self._backward(protocol.unpack_metadata(request.metadata), list(request.tensors))
            return runtime_pb2.ExpertResponse(tensors=[encode(grad_in)])
        except Exception as e:  # an RPC boundary: any failure becomes an error reply, the peer serves on
            return self._reject(e, "backward")

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """rpc_forward for payloads over hivemind's 4 MiB unary limit: tensors arrive and leave in chunks."""
        async for response in self._streamed(requests, self._forward, "forward"):
            yield response

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """rpc_backward with chunked tensors, like rpc_forward_stream."""
        async for response in self._streamed(requests, self._backward, "backward"):
            yield response

    async def _streamed(self, requests, run, what: str) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            metadata, tensors = await chunks.receive(requests, self.config.max_stream_bytes)
            output = await run(metadata, tensors)
        except Exception as e:  # an RPC boundary: any failure becomes an error reply, the peer serves on
            yield self._reject(e, f"{what} (streamed)")
            await _await_end(requests, self.config.request_timeout_s)  # the rest of a refused upload is ignored
            return
        for part in chunks.split(encode(output)):
            yield runtime_pb2.ExpertResponse(tensors=[part])

    async def _forward(self, metadata: dict, tensors: list[runtime_pb2.Tensor]) -> torch.Tensor:
        self._check_model(metadata)
        blocks = self._blocks(metadata)
        if len(tensors) != 1:
            raise ProtocolError(f"forward takes exactly 1 tensor (hidden states), got {len(tensors)}")
        hidden = self._hidden(tensors[0])
        learner, train = self.learner, bool(metadata.get("train"))
        version = self._pass_version(metadata, train)

        def run() -> torch.Tensor:
            if learner is not None and train:
                return learner.training_forward(hidden, blocks)
            with torch.inference_mode(), learner.version_scope(version) if learner else contextlib.nullcontext():
                return self.span.forward(hidden, blocks=blocks)

        self._open_metered_pass(metadata, blocks, version)
        await self._admit_pass(metadata, StepKind.PROMPT, hidden)
        output = (await self._compute(run, hidden.shape[0] * hidden.shape[1])).to("cpu", hidden.dtype)
        self._meter_pass(metadata, StepKind.PROMPT, hidden, output)
        self.requests_served += 1
        return output

    async def _backward(self, metadata: dict, tensors: list[runtime_pb2.Tensor]) -> torch.Tensor:
        self._check_model(metadata)
        blocks = self._blocks(metadata)
        if len(tensors) != 2:
            raise ProtocolError(f"backward takes 2 tensors (hidden states, output gradient), got {len(tensors)}")
        hidden = self._hidden(tensors[0])
        grad_out = self._hidden(tensors[1], "output gradient")
        if grad_out.shape != hidden.shape:
            raise InvalidTensorError(
                f"output gradient shape {list(grad_out.shape)} differs from inputs {list(hidden.shape)}"
            )

        learner, train = self.learner, bool(metadata.get("train"))
        if train and learner is None:
            raise ProtocolError("this peer does not train adapters (started without --adapter-rank)")
        version = self._pass_version(metadata, train)
        example = self._training_example(metadata) if train else None
        contributor = self._contributor(metadata, blocks, tensors, example) if example is not None else ""

        def run() -> torch.Tensor:
            if train:  # a feedback pass: adapter gradients are filed under the chain account that signed it
                assert learner is not None  # a training request to a peer without a learner was refused above
                return learner.train_backward(hidden, grad_out, blocks, contributor)
            with torch.enable_grad(), learner.version_scope(version) if learner else contextlib.nullcontext():
                inputs = hidden.to(self.span.device, self.span.dtype).requires_grad_(True)
                output = self.span.forward(inputs, blocks=blocks)
                (grad_in,) = torch.autograd.grad(output, inputs, grad_out.to(output.device, output.dtype))
            return grad_in

        self._open_metered_pass(metadata, blocks, version)
        await self._admit_pass(metadata, StepKind.BACKWARD, grad_out)
        grad_in = (await self._compute(run, 2)).to("cpu", hidden.dtype)
        self._meter_pass(metadata, StepKind.BACKWARD, grad_out, grad_in)
        self.requests_served += 1
        if example is not None and self.publisher is not None:  # trained on: stored and published
            try:
                await self.publisher.add(example)
            except FeedbackStoreFullError as e:  # filled since the check above by a concurrent pass
                logger.warning("trained on feedback %s but could not store it: %s", example.hash_hex[:16], e)
        return grad_in

    def _training_example(self, metadata: dict) -> FeedbackExample:
        """The published example a training pass carries, verified, before any compute: a pass trains only on
        text that is signed, within bounds, of this model, and that this peer has room to store and publish."""
        if self.publisher is None:
            raise ProtocolError("this peer does not take training passes yet (its feedback store is not started)")
        if metadata.get("example") is None:
            raise FeedbackRecordError(
                "a training pass must carry its feedback example (metadata 'example'): what the swarm learns from is "
                "published (docs/data.md); update the client"
            )
        example = example_from_wire(metadata["example"])
        if example.kind != "feedback":
            raise FeedbackRecordError(f"a training pass's example must be of kind 'feedback', not {example.kind!r}")
        if example.model != self.model_name:
            raise FeedbackRecordError(
                f"the example is of model {example.model!r}; this peer serves {self.model_name!r}"
            )
        if not self.publisher.store.has_room(example):
            raise FeedbackStoreFullError(
                f"this peer's feedback store is full ({self.publisher.store.budget_bytes} bytes, --data-budget) with "
                "nothing committed and replicated to evict: it takes no new feedback until its records are"
            )
        return example

    def _contributor(
        self, metadata: dict, blocks: range, tensors: list[runtime_pb2.Tensor], example: FeedbackExample
    ) -> str:
        """The chain account that signed this training pass and its example (ContributorAuthError if none validly
        did, if the signature names another example, or if the pass's signer is not the example's contributor)."""
        if self.contributions is None:
            raise ProtocolError("this peer does not take training passes yet (its handlers are not added)")
        account = self.contributions.verify(
            metadata.get("contributor"), (blocks.start, blocks.stop), tensors, example=example.content_hash()
        )
        if account != example.contributor:
            raise ContributorAuthError(
                f"the pass is signed by {account} but its example by {example.contributor}: one account signs both"
            )
        return account

    def _pass_version(self, metadata: dict, train: bool) -> int | None:
        """The adapter version a forward/backward pass runs with, resolved now so its receipt states it
        exactly (None: no adapters here; TRAINING_ADAPTERS: the working adapters of a training pass)."""
        if self.learner is None:
            return None
        if train:
            return TRAINING_ADAPTERS
        with self.learner.version_scope(self.learner.requested_version(metadata)) as version:
            return version  # raises AdapterVersionUnavailableError for a version no longer held

    # A forward/backward request naming a paying `client` and a `session_id` (a training pass) is metered
    # like an inference session: the forward as a prompt step at position 0, the backward as a backward
    # step (grad_out in, grad_in out), so receipts price it with economy.pricing's backward rate.
    def _open_metered_pass(self, metadata: dict, blocks: range, version: int | None) -> None:
        if self.metering is None or self.metering.client_of(metadata) is None:  # a charging peer wants a client
            return
        session_id = protocol.get_field(metadata, "session_id", str)
        session = self.metering.open(
            session_id,
            blocks,
            metadata,  # validates before any compute
            BASE_WEIGHTS if version is None else version,
        )
        if session is not None and (session.meter.start, session.meter.end) != (blocks.start, blocks.stop):
            raise MeteringRequestError(
                f"metered session {session_id!r} covers blocks "
                f"{session.meter.start}:{session.meter.end}, not {blocks.start}:{blocks.stop}"
            )

    async def _admit_pass(self, metadata: dict, kind: StepKind, inputs: torch.Tensor) -> None:
        """A metered pass runs only within its client's credit (PaymentDueError before any compute)."""
        if self.credit is not None and metadata.get("client") is not None:
            await self.credit.admit(
                metadata["session_id"], kind, int(inputs.shape[0] * inputs.shape[1]), inputs.shape[1]
            )

    def _meter_pass(self, metadata: dict, kind: StepKind, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        if self.metering is None or metadata.get("client") is None:
            return
        self.metering.record(metadata["session_id"], inputs, outputs, 0, kind=kind)

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext | None = None
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A generation session: the first message opens it, each message appends tokens.

        Served over a hivemind P2P stream, or over a direct TLS stream (peer/direct_server.py, no context).

        Opening metadata: {session_id?, blocks?, max_length, batch?}, or {session_id, resume: true} to
        re-attach to a session whose connection broke. Each step sends the new tokens'
        hidden states [batch, new, hidden] with `position` = how many tokens the session held before
        them; a position below that rolls the cache back (the client is re-sending a lost step).
        The cache lives as long as the stream, and is dropped when it closes or idles out.
        """
        try:
            first = await asyncio.wait_for(anext(requests), self.config.session_timeout_s)
        except (TimeoutError, StopAsyncIteration):
            return
        try:
            session_id, blocks, batch = self._open_session(protocol.unpack_metadata(first.metadata))
        except Exception as e:  # an RPC boundary: any failure becomes an error reply, the peer serves on
            yield self._reject(e, "inference open")
            await _await_end(requests, self.config.request_timeout_s)
            return

        logger.debug("session %s opened on blocks %d:%d", session_id, blocks.start, blocks.stop)
        finished = False
        try:
            message = first
            while True:
                if message.tensors:
                    yield await self._inference_step(session_id, blocks, batch, message)
                try:
                    async with asyncio.timeout(self.config.session_timeout_s):  # unlike wait_for, no task per message
                        message = await anext(requests)
                except StopAsyncIteration:
                    finished = True
                    break
        except TimeoutError:
            finished = True
            logger.info("session %s idle for %.0f s: closed", session_id, self.config.session_timeout_s)
        finally:
            # A stream the client ended (or that idled out) frees its cache now. A broken connection
            # keeps it until the idle timeout so the client can reconnect with `resume`.
            if finished:
                self.caches.close(session_id)
                self._session_versions.pop(session_id, None)
            logger.debug("session %s %s", session_id, "closed" if finished else "detached")

    def _open_session(self, metadata: dict) -> tuple[str, range, int]:
        """Opens (or, with `resume`, re-attaches to) a session; returns its id, blocks and batch."""
        self._check_model(metadata)
        if metadata.get("resume"):
            session_id = protocol.get_field(metadata, "session_id", str)
            cache = self.caches.get(session_id)  # SessionNotFoundError if unknown or expired
            return session_id, range(min(cache.keys), max(cache.keys) + 1), cache.keys[min(cache.keys)].shape[0]
        blocks = self._blocks(metadata)
        max_length = protocol.get_field(metadata, "max_length", int)
        batch = protocol.get_field(metadata, "batch", int, default=1)
        if not (1 <= max_length <= self.config.max_session_length):
            raise ProtocolError(f"max_length must be in 1..{self.config.max_session_length}, got {max_length}")
        if not (1 <= batch <= 64):
            raise ProtocolError(f"batch must be in 1..64, got {batch}")
        session_id = protocol.get_field(metadata, "session_id", str, default=uuid.uuid4().hex)
        if not 0 < len(session_id) <= 128:
            raise ProtocolError("session_id must be 1..128 characters")
        version = None
        if self.learner is not None:  # the session keeps this adapter version for its whole life
            with self.learner.version_scope(self.learner.requested_version(metadata)) as version:
                pass  # raises AdapterVersionUnavailableError for a version no longer held
        if self.metering is not None:
            self.metering.open(session_id, blocks, metadata, BASE_WEIGHTS if version is None else version)
        nbytes = self.span.cache_bytes(batch, max_length, blocks)
        self.caches.reserve(nbytes)  # raises CacheFullError before any buffer is allocated
        self.caches.open(
            session_id, self.span.new_cache(batch, max_length, blocks), nbytes, self.config.session_timeout_s
        )
        if version is not None:
            self._session_versions[session_id] = version
        return session_id, blocks, batch

    async def _inference_step(
        self, session_id: str, blocks: range, batch: int, message: runtime_pb2.ExpertRequest
    ) -> runtime_pb2.ExpertResponse:
        started = time.perf_counter()
        try:
            cache = self.caches.get(session_id)
            metadata = protocol.unpack_metadata(message.metadata)
            if len(message.tensors) != 1:
                raise ProtocolError(f"an inference step takes exactly 1 tensor, got {len(message.tensors)}")
            hidden = self._hidden(message.tensors[0])
            if hidden.shape[0] != batch:
                raise InvalidTensorError(f"session was opened with batch {batch}, step has batch {hidden.shape[0]}")
            position = protocol.get_field(metadata, "position", int, default=cache.length)
            if position != cache.length:
                cache.rollback_to(position)
            if position + hidden.shape[1] > cache.max_length:
                raise CacheOverflowError(
                    f"step would grow the session to {position + hidden.shape[1]} tokens, "
                    f"over its max_length {cache.max_length}"
                )

            if self.credit is not None:  # within the client's credit, or refused before any compute
                tokens = int(hidden.shape[0] * hidden.shape[1])
                await self.credit.admit(session_id, step_kind_at(position), tokens, position + hidden.shape[1])

            learner, version = self.learner, self._session_versions.get(session_id)

            def run() -> torch.Tensor:
                with torch.inference_mode(), learner.version_scope(version) if learner else contextlib.nullcontext():
                    return self.span.forward(hidden, cache=cache, blocks=blocks)

            output = await self._compute(run, hidden.shape[0] * hidden.shape[1])
            if self.metering is not None:
                self.metering.record(session_id, hidden, output, position)
            self.requests_served += 1
            meta = {"position": position, "compute_ms": round((time.perf_counter() - started) * 1000, 3)}
            return runtime_pb2.ExpertResponse(
                tensors=[encode(output.to("cpu", hidden.dtype))], metadata=protocol.pack_metadata(meta)
            )
        except Exception as e:  # an RPC boundary: any failure becomes an error reply, the peer serves on
            return self._reject(e, "inference step")

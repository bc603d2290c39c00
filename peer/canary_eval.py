"""The in-swarm canary evaluator: a learning peer scores a candidate adapter version before it goes live.

A peer holds one span, so the canary loss of a version of its adapters needs the rest of the model.
The peer is in the swarm, so it acts as a client of it, through its own DHT and P2P (no second
daemon): it embeds the canary batch with the model's local head, runs it through the peers serving
the blocks before its span, through its own span *in process* (libp2p cannot dial itself, and the
candidate only exists here), then through the peers after its span, and scores the logits.

Both versions (live and candidate) share one route and one prefix pass, and the other hops are
pinned (`adapter_version`) to the versions they reported at the start of the evaluation, so an
update going live elsewhere mid-check shifts neither side. A failed hop is banned and the whole
evaluation retried on a new route; if that fails too the gate rejects the candidate (fail-closed).
Each version's logits give its total and per-category losses in one reduction (canary_examples.batch_losses):
categories add no forward pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import torch
from hivemind import DHT
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from chain.errors import UnavailableError
from peer.canary import DEFAULT_CATEGORY_MAX_RISE, CanaryConfig, CanaryGate
from peer.canary_examples import CanaryBatch, CanaryLosses, batch_losses, build_canary_batch, read_canary_file
from swarm import protocol
from swarm.client import ClientConfig, SwarmClient
from swarm.routing import Hop, NoRouteError

logger = logging.getLogger(__name__)

LocalForward = Callable[[torch.Tensor, int], Awaitable[torch.Tensor]]
"""(hidden states, adapter version of this span) -> this span's output, computed in this process."""

_RETRIED: tuple[type[Exception], ...] = (protocol.RemotePeerError, NoRouteError, *protocol.CALL_FAILURES)
"""Failures of one evaluation that another route may avoid: the failed peer is banned and the route re-planned."""


class CanaryEvaluationError(UnavailableError, RuntimeError):
    """The canary examples could not be run through the swarm (no route, peers failing, timeout)."""


class SwarmCanaryEvaluator:
    """Canary losses of versions of one span's adapters, measured through the live swarm.

    `client` must already be connected (its `dht` and `p2p` set); the evaluator never shuts it down.
    """

    def __init__(
        self,
        client: SwarmClient,
        *,
        peer_id: str,
        start: int,
        end: int,
        batch: CanaryBatch,
        local_forward: LocalForward,
        timeout: float = 20.0,
        attempts: int = 2,
    ):
        if attempts < 1 or timeout <= 0:
            raise ValueError("attempts must be >= 1 and timeout positive")
        self.client = client
        self.peer_id = peer_id
        self.start, self.end = start, end
        self.batch = batch
        self.local_forward = local_forward
        self.timeout = timeout
        self.attempts = attempts
        self.evaluations = 0

    async def losses(self, versions: Sequence[int]) -> list[float]:
        """Mean canary loss of the whole model with each of `versions` on this span, same route for all."""
        return [losses.total for losses in await self.category_losses(versions)]

    async def category_losses(self, versions: Sequence[int]) -> list[CanaryLosses]:
        """Total and per-category canary losses of each of `versions`, from one pass per version."""
        try:
            return await asyncio.wait_for(self._losses(list(versions)), self.timeout)
        except TimeoutError:
            raise CanaryEvaluationError(f"canary evaluation took over {self.timeout:.0f} s") from None

    async def _losses(self, versions: list[int]) -> list[CanaryLosses]:
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                result = await self._evaluate_once(versions)
                self.evaluations += 1
                return result
            except _RETRIED as e:
                last = e
                if (
                    isinstance(e, protocol.RemotePeerError)
                    and e.peer_id
                    and not isinstance(e, protocol.InvalidRequestError)
                ):
                    self.client.report_failure(e.peer_id, e)
                logger.info("canary evaluation attempt %d failed: %s: %s", attempt + 1, type(e).__name__, e)
        raise CanaryEvaluationError(
            f"canary examples could not run through the swarm: {type(last).__name__}: {last}"
        ) from last

    async def _route(self, start: int, end: int) -> list[Hop]:
        if start >= end:
            return []
        hops = await self.client.plan(start, end)
        if any(hop.peer_id == self.peer_id for hop in hops):  # cannot happen for blocks outside our span
            raise CanaryEvaluationError("the canary route passes through this peer outside its own span")
        return hops

    async def _pinned_versions(self, hops: list[Hop]) -> dict[str, int]:
        """The live adapter version each other hop reports now (learning peers only)."""

        async def version_of(hop: Hop) -> tuple[str, int | None]:
            reply = await self.client.call(hop.peer_id, protocol.HANDLER_INFO, runtime_pb2.ExpertRequest())
            version = protocol.unpack_metadata(reply.metadata).get("adapter_version")
            return hop.peer_id, version if isinstance(version, int) and not isinstance(version, bool) else None

        found = await asyncio.gather(*(version_of(hop) for hop in {h.peer_id: h for h in hops}.values()))
        return {peer: version for peer, version in found if version is not None}

    async def _through(self, hops: list[Hop], hidden: torch.Tensor, pins: dict[str, int]) -> torch.Tensor:
        for hop in hops:
            extra = {"adapter_version": pins[hop.peer_id]} if hop.peer_id in pins else None
            hidden = await self.client._hop_call(hop, protocol.HANDLER_FORWARD, [hidden], extra)  # names a failed hop
        return hidden

    async def span_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states at this span's input for `input_ids`: embedded locally, then one pass through the peers
        before the span at their live versions (the rehearsal's inputs, peer/rehearsal.py)."""
        before = await self._route(0, self.start)
        with torch.no_grad():
            embedded = self.client.head.embed_tokens(input_ids)
        return await self._through(before, embedded, {})

    async def _evaluate_once(self, versions: list[int]) -> list[CanaryLosses]:
        before = await self._route(0, self.start)
        after = await self._route(self.end, self.client.num_blocks)
        pins = await self._pinned_versions(before + after)
        # No grad-mode context spans an await: grad modes are thread-local and would leak into the
        # peer's other coroutines (its backward RPCs among them) while this one is suspended.
        with torch.no_grad():
            embedded = self.client.head.embed_tokens(self.batch.input_ids)
        prefix = await self._through(before, embedded, pins)
        losses = []
        for version in versions:
            out = await self._through(after, await self.local_forward(prefix, version), pins)
            with torch.no_grad():
                losses.append(batch_losses(self.client.head.logits(out.float()), self.batch))
        return losses


def swarm_canary_gate(
    *,
    model_dir: Path,
    model_name: str,
    dht: DHT,
    p2p: P2P,
    start: int,
    end: int,
    local_forward: LocalForward,
    canary_file: Path | None = None,
    max_relative_rise: float = 0.01,
    category_max_rise: float = DEFAULT_CATEGORY_MAX_RISE,
    category_limits: dict[str, float] | None = None,
    request_timeout_s: float = 10.0,
) -> CanaryGate:
    """The canary gate of a learning peer: its canary examples evaluated through the swarm it serves."""
    from transformers import AutoTokenizer

    examples = read_canary_file(canary_file)
    batch = build_canary_batch(examples, AutoTokenizer.from_pretrained(model_dir))
    client = SwarmClient(model_dir, [], ClientConfig(request_timeout_s=request_timeout_s))
    # The peer's own DHT and P2P replica: the evaluator is a client of the swarm it is part of.
    client.dht, client.p2p, client.model = dht, p2p, model_name
    evaluator = SwarmCanaryEvaluator(
        client,
        peer_id=dht.peer_id.to_base58(),
        start=start,
        end=end,
        batch=batch,
        local_forward=local_forward,
        timeout=2 * request_timeout_s,
    )
    config = CanaryConfig(
        max_relative_rise=max_relative_rise, category_max_rise=category_max_rise, category_limits=category_limits or {}
    )
    categories = sorted({e.category for e in examples})
    logger.info(
        "canary gate: %d examples (%d scored tokens) from %s, max rise %.1f%%; categories %s",
        len(examples),
        batch.scored_tokens,
        canary_file or "the default set",
        100 * max_relative_rise,
        ", ".join(f"{c} (max rise {100 * config.category_rise(c):.1f}%)" for c in categories),
    )
    return CanaryGate(evaluator, config)

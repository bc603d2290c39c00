"""`dllm verify`: spot-check every provider in the swarm with probe inputs recomputed locally.

For each announced span, the verifier sends random hidden states through the provider's forward RPC
(exactly as a client would) and recomputes the same blocks from the model's own weights, comparing
per position with economy.verification's tolerance for the provider's dtype. A provider cannot tell a
probe from a client's request, so one that returns wrong activations or skips blocks fails.

Receipt-bound verdicts (re-running a provider's *signed* work from its WorkSample, published on the
gossip topic and tallied for the council) need peers to publish work samples, which they do not yet;
this check is the part that works against today's peers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chain.config_bounds import bounded, check_bounds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of probing one provider's span."""

    peer_id: str
    start: int
    end: int
    chain_account: str | None
    passed: bool
    worst_rel_error: float
    error: str | None = None  # the RPC failed: unreachable or refused


async def probe_span(core: Any, record: Any, local: Any, tokens: int, generator: torch.Generator) -> ProbeResult:
    """Probe `record`'s whole span with `tokens` random positions and compare with `local` (a SpanRunner)."""
    from hivemind.proto import runtime_pb2

    from economy.verification import Tolerance, compare_activations
    from swarm import protocol
    from swarm.tensors import decode, encode

    hidden = torch.randn(1, tokens, local.hidden_size, generator=generator)
    metadata = protocol.pack_metadata({"model": record.model, "blocks": [record.start, record.end]})
    request = runtime_pb2.ExpertRequest(tensors=[encode(hidden)], metadata=metadata)
    try:
        response = await core.call(record.peer_id, protocol.HANDLER_FORWARD, request)
        claimed = decode(response.tensors[0])
    except Exception as error:  # an unreachable provider is reported, not a verifier crash
        return ProbeResult(
            record.peer_id,
            record.start,
            record.end,
            record.chain_account,
            False,
            math.inf,
            f"{type(error).__name__}: {error}",
        )
    with torch.inference_mode():
        expected = local.forward(hidden)
    if claimed.shape != expected.shape:
        return ProbeResult(
            record.peer_id,
            record.start,
            record.end,
            record.chain_account,
            False,
            math.inf,
            f"returned shape {list(claimed.shape)}, expected {list(expected.shape)}",
        )
    # The provider's announced dtype and depth set the honest noise; `local` runs in float32.
    comparison = compare_activations(claimed, expected, Tolerance.for_dtype(record.dtype, record.end - record.start))
    return ProbeResult(
        record.peer_id, record.start, record.end, record.chain_account, comparison.passed, comparison.worst_rel_error
    )


@dataclass(frozen=True)
class ProbeConfig:
    """How hard `dllm verify --probe` probes each provider."""

    rounds: int = bounded(1, ge=1, le=100)  # probes per provider
    tokens: int = bounded(8, ge=1, le=512)  # positions per probe
    seed: int | None = None  # seed of the probe inputs (None: random)

    def __post_init__(self) -> None:
        check_bounds(self)


async def probe_swarm(core: Any, model_dir: Path, config: ProbeConfig) -> list[ProbeResult]:
    """Probe every provider of `core`'s model `config.rounds` times; spans are loaded once each."""
    from peer.blocks import load_span_layers
    from peer.span import SpanRunner

    generator = torch.Generator()
    generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    records = await core.records(refresh=True)
    spans: dict[tuple[int, int], Any] = {}
    results = []
    for _ in range(config.rounds):
        for record in sorted(records, key=lambda r: (r.start, r.end, r.peer_id)):
            key = (record.start, record.end)
            if key not in spans:
                layers = await asyncio.to_thread(load_span_layers, model_dir, core.model_config, *key)
                spans[key] = SpanRunner(core.model_config, layers, *key)
            results.append(await probe_span(core, record, spans[key], config.tokens, generator))
    return results

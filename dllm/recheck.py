"""`dllm verify --recheck HASH`: fetch published evidence and re-run its checks on this machine.

Anyone can do this; it needs no key and trusts no verifier. The evidence comes from any verifier
announced under `dllm/verifiers` and is checked against the hash asked for; every sample's receipt is
checked for both signatures and its tensors against the provider's commitment (`recheck`), and the
provider's blocks are re-run here in float32 from the model's own files, as a verifier does, at the
tolerance of the dtype the receipt states. The outcome is this machine's own verdict, shown beside
the verdicts the evidence carries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from economy.evidence_store import Evidence
from economy.receipts import verify_receipt
from economy.verification import Comparison, Tolerance, recheck
from economy.work_sample import WorkSample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRecheck:
    """This machine's re-run of one sample of the evidence."""

    receipt_id: str
    provider: str
    blocks: range
    dtype: str
    comparison: Comparison
    tolerance: float


@dataclass(frozen=True)
class RecheckResult:
    evidence: Evidence
    samples: tuple[SampleRecheck, ...]

    @property
    def provider_failed(self) -> bool:
        """True if any sample's re-run fails the provider."""
        return any(not s.comparison.passed for s in self.samples)


def recheck_evidence(evidence: Evidence, model_dir: Path) -> RecheckResult:
    """Re-runs every sample of `evidence` with this machine's copy of the model (float32, every block)."""
    from peer.blocks import load_span_layers
    from peer.span import SpanRunner
    from swarm.model_files import load_config

    config = load_config(model_dir)
    layers = load_span_layers(model_dir, config, 0, config.num_hidden_layers)
    return recheck_with_span(evidence, SpanRunner(config, layers, 0, config.num_hidden_layers))


def recheck_with_span(evidence: Evidence, span: Any) -> RecheckResult:
    """Re-runs every sample of `evidence` with `span` (a float32 SpanRunner holding every block the samples name)."""
    results = []
    for sample in evidence.work_samples():
        r = sample.receipt.receipt
        verify_receipt(sample.receipt)
        sample.check_base_weights()
        if not span.start <= r.start < r.end <= span.end:
            raise ValueError(f"blocks {r.start}:{r.end} are outside the span {span.start}:{span.end} held here")
        tolerance = Tolerance.for_dtype(r.dtype, r.end - r.start)
        comparison = recheck(sample, _forward(span, range(r.start, r.end)), tolerance)
        results.append(
            SampleRecheck(
                sample.receipt.receipt_id, r.provider, range(r.start, r.end), r.dtype, comparison, tolerance.rel_l2
            )
        )
    return RecheckResult(evidence, tuple(results))


def _forward(span: Any, blocks: range) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def run(inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = span.forward(inputs.to(span.dtype), position_ids=positions, blocks=blocks)
            return out

    return run


async def fetch_and_recheck(initial_peers: list[str], digest: bytes, model_dir: Path) -> RecheckResult:
    """Joins the swarm's DHT as a client, fetches the evidence named by `digest`, and re-runs it."""
    from swarm.dht import start_dht
    from swarm.evidence import fetch_evidence

    dht, _ = start_dht(initial_peers, client_mode=True)
    try:
        p2p = await dht.replicate_p2p()
        try:
            evidence = await fetch_evidence(dht, p2p, digest)
        finally:
            await p2p.shutdown()
    finally:
        await asyncio.to_thread(dht.shutdown)
    return await asyncio.to_thread(recheck_evidence, evidence, model_dir)


def sample_of(evidence: Evidence, digest: bytes) -> WorkSample:
    """The sample of `evidence` whose hash is `digest` (KeyError if none)."""
    for sample in evidence.work_samples():
        if sample.evidence_hash == digest:
            return sample
    raise KeyError(digest.hex())

"""`dllm verify --recheck HASH`: fetch published evidence and re-run its checks on this machine.

Anyone can do this; it needs no key and trusts no verifier. The evidence comes from any verifier
announced under `dllm/verifiers` and is checked against the hash asked for; every sample's receipt is
checked for both signatures and its tensors against the provider's commitment (`recheck`), and the
provider's blocks are re-run here in float32 from the model's own files, as a verifier does, at the
tolerance of the dtype the receipt states. Adapted work is re-run with the adapters its receipt names,
fetched by digest from its span's peers (`peer.adapter_exchange.fetch_for_receipt`); without them the sample
fails, as it did for the verifier. The outcome is this machine's own verdict, shown beside
the verdicts the evidence carries.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from economy.evidence_store import Evidence
from economy.receipts import UsageReceipt, verify_receipt
from economy.verification import Comparison, Tolerance, recheck
from economy.work_sample import WorkSample
from peer.adapter_exchange import fetch_for_receipt
from peer.adapters import AdapterBundle, applied_adapters

logger = logging.getLogger(__name__)

WORST_ERROR_CAP_PPM = 10**9


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

    @property
    def worst_error_ppm(self) -> int:
        """The largest relative error of any sample's re-run, in parts per million (capped: a sample that could not
        be re-run counts as the cap), as a dispute records it."""
        worst = max((s.comparison.worst_rel_error for s in self.samples), default=0.0)
        return WORST_ERROR_CAP_PPM if not math.isfinite(worst) else min(round(worst * 1e6), WORST_ERROR_CAP_PPM)


def recheck_evidence(
    evidence: Evidence, model_dir: Path, adapters: Mapping[bytes, AdapterBundle] | None = None
) -> RecheckResult:
    """Re-runs every sample of `evidence` with this machine's copy of the model (float32, every block)."""
    from peer.blocks import load_span_layers
    from peer.span import SpanRunner
    from swarm.model_files import load_config

    config = load_config(model_dir)
    layers = load_span_layers(model_dir, config, 0, config.num_hidden_layers)
    return recheck_with_span(evidence, SpanRunner(config, layers, 0, config.num_hidden_layers), adapters)


def recheck_with_span(
    evidence: Evidence, span: Any, adapters: Mapping[bytes, AdapterBundle] | None = None
) -> RecheckResult:
    """Re-runs every sample of `evidence` with `span` (a float32 SpanRunner holding every block the samples name).

    A sample of adapted work is re-run with `adapters[receipt.adapter_digest]` (digest-checked by whoever
    fetched it) merged into the span; without it the sample fails, as it did for the verifier ("adapters
    unavailable": its provider still does not hand them over). A training pass raises UnverifiableSampleError.
    """
    results = []
    for sample in evidence.work_samples():
        r = sample.receipt.receipt
        verify_receipt(sample.receipt)
        if not span.start <= r.start < r.end <= span.end:
            raise ValueError(f"blocks {r.start}:{r.end} are outside the span {span.start}:{span.end} held here")
        tolerance = Tolerance.for_dtype(r.dtype, r.end - r.start)
        forward = _forward(span, range(r.start, r.end))
        bundle = (adapters or {}).get(r.adapter_digest) if r.published_adapters else None
        if r.published_adapters and bundle is None:
            sample.check_commitment()
            comparison = Comparison(False, math.inf, 0, 0)
        elif bundle is not None:
            with applied_adapters(span.layers, span.start, bundle):
                comparison = recheck(sample, forward, tolerance, r.adapter_digest)
        else:
            comparison = recheck(sample, forward, tolerance)
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
    """Joins the swarm's DHT as a client, fetches the evidence named by `digest` (and the adapters its adapted
    samples name, from their spans' peers), and re-runs it."""
    from swarm.dht import start_dht
    from swarm.evidence import fetch_evidence

    dht, _ = start_dht(initial_peers, client_mode=True)
    try:
        p2p = await dht.replicate_p2p()
        try:
            evidence = await fetch_evidence(dht, p2p, digest)
            adapters = await fetch_evidence_adapters(evidence, partial(fetch_for_receipt, dht, p2p))
        finally:
            await p2p.shutdown()
    finally:
        await asyncio.to_thread(dht.shutdown)
    return await asyncio.to_thread(recheck_evidence, evidence, model_dir, adapters)


async def fetch_evidence_adapters(
    evidence: Evidence, fetch: Callable[[UsageReceipt], Awaitable[AdapterBundle | None]]
) -> dict[bytes, AdapterBundle]:
    """digest -> bundle for every published adapter version the evidence's samples name that `fetch` finds."""
    found: dict[bytes, AdapterBundle] = {}
    for sample in evidence.work_samples():
        r = sample.receipt.receipt
        if r.published_adapters and r.adapter_digest not in found:
            bundle = await fetch(r)
            if bundle is not None:
                found[r.adapter_digest] = bundle
    return found


def sample_of(evidence: Evidence, digest: bytes) -> WorkSample:
    """The sample of `evidence` whose hash is `digest` (KeyError if none)."""
    for sample in evidence.work_samples():
        if sample.evidence_hash == digest:
            return sample
    raise KeyError(digest.hex())

"""A sampled piece of a provider's work, as a client hands it to a verifier.

It holds every forward step of one session on one span from the session start (inputs the client
sent, outputs it received) and the provider's co-signed receipt whose output commitment covers
them. The verifier first proves the tensors are what the provider committed to (recomputing the
commitment chain), then re-runs them. The client cannot frame a provider: inputs are committed too.

A sample is re-run with the weights its receipt states: the base model (`adapter_version` 0), or the
base model plus the LoRA adapters whose sha256 the receipt carries (`adapter_digest`), which the
verifier fetches and checks first (dllm/verifier.py). Without those exact weights it abstains
(`UnverifiableSampleError`) instead of judging honest adapted outputs as wrong; a training pass (run
with unpublished working adapters) is never re-run (docs/economy.md prices it as unverifiable).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from chain.errors import EconomyError
from economy import canonical
from economy.metering import StepKind, StepRecord, activation_digest, chain_commitment, commitment_start
from economy.receipts import TRAINING_ADAPTERS, MalformedReceiptError, SignedReceipt

WORK_SAMPLE_TAG = "dllm.work_sample.1"
MAX_SAMPLE_BYTES = 64 * 1024 * 1024
MAX_STEPS = 100_000


class MalformedWorkSampleError(EconomyError, ValueError):
    """The bytes are not a well-formed work sample."""


class EvidenceMismatchError(EconomyError, ValueError):
    """The sample's tensors do not match the provider's signed commitment: it is not evidence."""


class UnverifiableSampleError(EconomyError, ValueError):
    """The work ran with weights a verifier does not hold (adapters): no verdict either way."""


class SampleRejectedError(EconomyError, ValueError):
    """A work sample is not for the verifier's model, or its blocks are outside it."""


@dataclass(frozen=True)
class SampledStep:
    """One step's tensors and metadata, exactly as they crossed the wire."""

    kind: StepKind
    position: int
    inputs: torch.Tensor
    """[batch, seq, hidden] hidden states sent to the provider."""
    outputs: torch.Tensor
    """[batch, seq, hidden] hidden states the provider returned."""

    def record(self) -> StepRecord:
        b, s = int(self.inputs.shape[0]), int(self.inputs.shape[1])
        return StepRecord(
            self.kind, b * s, s, self.position, activation_digest(self.inputs), activation_digest(self.outputs)
        )


@dataclass(frozen=True)
class WorkSample:
    """Evidence for one spot check: the receipt and the steps it commits to."""

    receipt: SignedReceipt
    steps: tuple[SampledStep, ...]

    def check_base_weights(self) -> None:
        """Raises UnverifiableSampleError unless the receipt states the base weights served this work."""
        self.check_weights(None)

    def check_weights(self, adapter_digest: bytes | None) -> None:
        """Raises UnverifiableSampleError unless a re-run with the base weights plus the adapters of
        `adapter_digest` (None: no adapters) uses exactly the weights the receipt states."""
        r = self.receipt.receipt
        if adapter_digest is not None and r.published_adapters and adapter_digest == r.adapter_digest:
            return
        if adapter_digest is not None and r.published_adapters:
            raise UnverifiableSampleError(
                f"the re-run's adapters {adapter_digest.hex()[:16]}... are not the receipt's "
                f"{r.adapter_digest.hex()[:16]}..."
            )
        if adapter_digest is not None or not r.base_weights:
            what = (
                "a training pass" if r.adapter_version == TRAINING_ADAPTERS else f"adapter version {r.adapter_version}"
            )
            raise UnverifiableSampleError(
                f"{r.provider} served blocks {r.start}:{r.end} with {what}; only base-weight work can be re-run"
            )

    def check_commitment(self) -> None:
        """Raises EvidenceMismatchError unless the steps chain to the receipt's output commitment."""
        r = self.receipt.receipt
        digests = [s.record().digest() for s in self.steps]
        if chain_commitment(commitment_start(r.session_id), digests) != r.commitment:
            raise EvidenceMismatchError("the sampled steps do not reproduce the provider's signed output commitment")

    def forward_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, position_ids, claimed outputs) of all forward steps, concatenated along the sequence.

        One causal forward over these reproduces every step, each seeing the same prefix it saw
        when served. Raises EvidenceMismatchError if the steps do not tile the context 0..T-1.
        """
        forward = [s for s in self.steps if s.kind is not StepKind.BACKWARD]
        if not forward:
            raise EvidenceMismatchError("the sample holds no forward step to re-run")
        expected = 0
        for s in forward:
            if s.position != expected:
                raise EvidenceMismatchError(f"step at position {s.position} leaves a gap (expected {expected})")
            if s.inputs.shape != s.outputs.shape or s.inputs.shape[0] != forward[0].inputs.shape[0]:
                raise EvidenceMismatchError("steps disagree on batch size or input/output shapes")
            expected += int(s.inputs.shape[1])
        inputs = torch.cat([s.inputs.float() for s in forward], dim=1)
        outputs = torch.cat([s.outputs.float() for s in forward], dim=1)
        batch = inputs.shape[0]
        positions = torch.arange(expected).unsqueeze(0).expand(batch, expected)
        return inputs, positions, outputs

    def encode(self) -> bytes:
        steps = [
            [s.kind.value, s.position, list(s.inputs.shape), _tensor_bytes(s.inputs), _tensor_bytes(s.outputs)]
            for s in self.steps
        ]
        packed: bytes = msgpack.packb([WORK_SAMPLE_TAG, self.receipt.encode(), steps], use_bin_type=True)
        return packed

    @property
    def evidence_hash(self) -> bytes:
        """blake2b-256 of the encoded sample: what verdicts and slash proposals point to."""
        return canonical.digest(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> WorkSample:
        """Parses bytes; raises MalformedWorkSampleError on anything else."""
        if type(data) is not bytes or len(data) > MAX_SAMPLE_BYTES:
            raise MalformedWorkSampleError("a work sample must be bytes of at most 64 MiB")
        try:
            items = msgpack.unpackb(data, raw=False, max_map_len=0, max_ext_len=0, max_array_len=MAX_STEPS)
        except Exception as e:  # msgpack raises many unrelated types on garbage
            raise MalformedWorkSampleError(f"work sample is not valid msgpack ({type(e).__name__})") from None
        if type(items) is not list or len(items) != 3 or items[0] != WORK_SAMPLE_TAG:
            raise MalformedWorkSampleError(f"expected a [{WORK_SAMPLE_TAG!r}, receipt, steps] array")
        try:
            receipt = SignedReceipt.decode(items[1])
        except MalformedReceiptError as e:
            raise MalformedWorkSampleError(f"work sample receipt: {e}") from None
        if type(items[2]) is not list or not items[2]:
            raise MalformedWorkSampleError("work sample holds no steps")
        return cls(receipt, tuple(_decode_step(i, raw) for i, raw in enumerate(items[2])))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def _decode_step(index: int, raw: object) -> SampledStep:
    where = f"work sample step {index}"
    if type(raw) is not list or len(raw) != 5:
        raise MalformedWorkSampleError(f"{where}: expected [kind, position, shape, inputs, outputs]")
    kind, position, shape, inputs, outputs = raw
    try:
        step_kind = StepKind(kind)
    except ValueError:
        raise MalformedWorkSampleError(f"{where}: unknown step kind {kind!r:.40}") from None
    if type(position) is not int or not 0 <= position <= canonical.MAX_U64:
        raise MalformedWorkSampleError(f"{where}: position must be a non-negative integer")
    if type(shape) is not list or len(shape) != 3 or any(type(d) is not int or not 1 <= d <= 2**24 for d in shape):
        raise MalformedWorkSampleError(f"{where}: shape must be [batch, seq, hidden] of positive integers")
    size = 4 * shape[0] * shape[1] * shape[2]
    for name, blob in (("inputs", inputs), ("outputs", outputs)):
        if type(blob) is not bytes or len(blob) != size:
            raise MalformedWorkSampleError(f"{where}: {name} must be {size} bytes of float32 for shape {shape}")
    return SampledStep(step_kind, position, _tensor(inputs, shape), _tensor(outputs, shape))


def _tensor(blob: bytes, shape: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype="<f4").reshape(shape).copy())

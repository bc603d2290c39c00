"""Per-session usage meter and the rolling commitment to every step's inputs and outputs.

Both ends of a session run a meter: the provider over what it computed, the client over what it
sent and received. Activations cross the wire as exact bytes, so both compute the same digests and
the same commitment; a client co-signs a receipt only if the provider's claimed counts and
commitment equal its own (see receipts.check_claim). Commitments identify WHAT was claimed, bit for
bit; whether the claim was computed correctly is decided by verification.py, within a tolerance.

Commitment chain: c_0 = H("dllm/commit/1" | session_id), c_i = H(c_{i-1} | step_digest_i), where
step_digest_i = H(kind | tokens | seq | position | H(input_i) | H(output_i)). Given every step digest, a
verifier recomputes the chain and checks one step's tensors against their digests.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from chain.errors import EconomyError
from economy.pricing import Usage

COMMIT_DOMAIN = b"dllm/commit/1"


class StepKind(StrEnum):
    """What one metered step was: prompt prefill, one generated token, or a backward pass."""

    PROMPT = "prompt"
    GENERATED = "generated"
    BACKWARD = "backward"


class MeteringError(EconomyError, ValueError):
    """A step reported to the meter is inconsistent (bad token count, shape, ...)."""


def activation_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of a tensor's canonical byte form: shape, then float32 little-endian values.

    Digest the tensor exactly as it was put on (or taken off) the wire, after any compression, so
    both ends agree bit for bit.
    """
    t = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256()
    h.update(struct.pack("<B", t.dim()))
    h.update(struct.pack(f"<{t.dim()}Q", *t.shape))
    h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.digest()


@dataclass(frozen=True)
class StepRecord:
    """One metered step as the commitment sees it."""

    kind: StepKind
    tokens: int
    """Tokens processed: batch x sequence length (what is billed)."""
    seq: int
    """Sequence length of the step (how far it advances the context)."""
    position: int
    """Position of the step's first token in the session (its context length before it)."""
    input_digest: bytes
    output_digest: bytes

    def digest(self) -> bytes:
        h = hashlib.sha256()
        kind = self.kind.value.encode()
        h.update(struct.pack("<B", len(kind)) + kind)
        h.update(struct.pack("<QQQ", self.tokens, self.seq, self.position))
        h.update(self.input_digest + self.output_digest)
        return h.digest()


def commitment_start(session_id: bytes) -> bytes:
    """c_0 of a session's commitment chain."""
    return hashlib.sha256(COMMIT_DOMAIN + session_id).digest()


def chain_commitment(previous: bytes, step_digests: list[bytes]) -> bytes:
    """Extends a commitment by the given step digests, in order."""
    c = previous
    for d in step_digests:
        c = hashlib.sha256(c + d).digest()
    return c


@dataclass
class UsageMeter:
    """Counts one session's work on one span and keeps the rolling commitment.

    A peer calls `record_step` after each forward (prompt or generated) or backward step. Receipts
    every N tokens take `close_segment()`: usage since the previous segment plus the commitment at
    this point (the chain itself continues across segments).
    """

    session_id: bytes
    model: str
    start: int
    end: int
    params_served: int
    sampled: bool = False
    steps: list[StepRecord] = field(default_factory=list)
    _commitment: bytes = b""
    _segment_from: int = 0
    _segment_commitment_start: bytes = b""
    _position: int = 0
    _segment_counts: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    """prompt, generated, backward tokens and max context of the open segment: segment_usage() in O(1)."""

    def __post_init__(self) -> None:
        if not isinstance(self.session_id, bytes) or not 1 <= len(self.session_id) <= 64:
            raise MeteringError("session_id must be 1..64 bytes")
        if not 0 <= self.start < self.end:
            raise MeteringError(f"bad block span {self.start}:{self.end}")
        self._commitment = commitment_start(self.session_id)
        self._segment_commitment_start = self._commitment

    @property
    def commitment(self) -> bytes:
        return self._commitment

    @property
    def position(self) -> int:
        """Tokens of context the session holds on this span now."""
        return self._position

    def record_step(
        self, kind: StepKind, tokens: int, inputs: torch.Tensor, outputs: torch.Tensor, position: int | None = None
    ) -> StepRecord:
        """Meters one step; returns its record. `position` defaults to the running context length.

        Forward steps advance the context; a backward step re-differentiates positions already seen
        and does not. Raises MeteringError on impossible counts.
        """
        if not isinstance(tokens, int) or tokens <= 0:
            raise MeteringError(f"a step must process at least one token, got {tokens!r}")
        if inputs.dim() != 3 or inputs.shape[0] * inputs.shape[1] != tokens:
            raise MeteringError(
                f"input shape {tuple(inputs.shape)} ([batch, seq, hidden]) does not hold {tokens} tokens"
            )
        seq = int(inputs.shape[1])
        pos = self._position if position is None else position
        if pos < 0:
            raise MeteringError(f"position must be >= 0, got {pos}")
        record = StepRecord(kind, tokens, seq, pos, activation_digest(inputs), activation_digest(outputs))
        self.steps.append(record)
        self._commitment = chain_commitment(self._commitment, [record.digest()])
        if kind is not StepKind.BACKWARD:
            self._position = max(self._position, pos + seq)
        counts = self._segment_counts
        counts[(StepKind.PROMPT, StepKind.GENERATED, StepKind.BACKWARD).index(kind)] += tokens
        counts[3] = max(counts[3], pos + seq)
        return record

    def usage(self, from_step: int = 0) -> Usage:
        """Usage of the steps from `from_step` on."""
        prompt = generated = backward = 0
        context = 0
        for s in self.steps[from_step:]:
            if s.kind is StepKind.PROMPT:
                prompt += s.tokens
            elif s.kind is StepKind.GENERATED:
                generated += s.tokens
            else:
                backward += s.tokens
            context = max(context, s.position + s.seq)
        return Usage(prompt, generated, backward, context, self.sampled)

    def segment_usage(self) -> Usage:
        """Usage since the last closed segment (equal to usage(start of the segment), kept as running counts)."""
        prompt, generated, backward, context = self._segment_counts
        return Usage(prompt, generated, backward, context, self.sampled)

    def segment_tokens(self) -> int:
        """Tokens metered since the last closed segment (receipts are due every N of them)."""
        prompt, generated, backward, _ = self._segment_counts
        return prompt + generated + backward

    def close_segment(self) -> tuple[Usage, bytes, bytes]:
        """Ends the current receipt segment: (usage, commitment before it, commitment after it)."""
        usage = self.segment_usage()
        before = self._segment_commitment_start
        self._segment_from = len(self.steps)
        self._segment_commitment_start = self._commitment
        self._segment_counts = [0, 0, 0, 0]
        return usage, before, self._commitment

    def step_digests(self) -> list[bytes]:
        """Digests of all steps so far, the evidence a verifier needs to recompute the chain."""
        return [s.digest() for s in self.steps]


def step_kind_at(position: int) -> StepKind:
    """How both ends classify a forward step of an inference session, so their meters agree.

    A step that starts the context (position 0: the prompt, or a failover replay rebuilding a new
    peer's cache) is a parallel prefill; every later step extends a context one generation step at
    a time.
    """
    return StepKind.PROMPT if position == 0 else StepKind.GENERATED

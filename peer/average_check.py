"""Checking that an all-reduce result really is the weighted mean of every group member's input.

hivemind's all-reduce splits the vector into parts, each reduced by one peer. When a peer fails mid-round
the survivors can end up with some parts averaged over fewer peers, or not averaged at all, with only a
log line to show for it. Every member therefore shares a small *linear* sketch of its input (block sums
of x and of x * r for a fixed random r) in the round's gather data. Because the sketch is linear, the
sketch of the true mean is the weighted mean of the input sketches; a member compares it with the
sketch of the result it got. A part that missed any contributor shifts its block's sums, so partial
averages are caught, while the rounding of a correct average stays far below the tolerance.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from swarm.protocol import ProtocolError


class SketchError(ProtocolError):
    """A sketch from a groupmate has the wrong size or non-finite values."""


@dataclass
class Sketch:
    """Per-block sums of x, of x * r, and of |x| (the last only scales the tolerance)."""

    sums: np.ndarray
    signed_sums: np.ndarray
    abs_sums: np.ndarray

    def to_bytes(self) -> bytes:
        return np.concatenate([self.sums, self.signed_sums, self.abs_sums]).astype(np.float64).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, blocks: int) -> Sketch:
        if not isinstance(data, (bytes, bytearray)) or len(data) != 3 * blocks * 8:
            raise SketchError(f"a sketch must be {3 * blocks * 8} bytes")
        values = np.frombuffer(data, dtype=np.float64)
        if not np.isfinite(values).all():
            raise SketchError("sketch contains non-finite values")
        return cls(values[:blocks].copy(), values[blocks : 2 * blocks].copy(), values[2 * blocks :].copy())


class AverageSketcher:
    """Sketches vectors of one fixed size; every replica builds it with the same (size, blocks, seed)."""

    def __init__(self, size: int, blocks: int = 256, seed: int = 0):
        if size < 1:
            raise SketchError("cannot sketch an empty vector")
        self.size = size
        self.blocks = min(blocks, size)
        self.block_size = -(-size // self.blocks)
        generator = torch.Generator().manual_seed(seed)
        self._r = torch.randn(self.blocks * self.block_size, generator=generator).view(self.blocks, self.block_size)
        self._r_max = float(self._r.abs().max())
        # One reused scratch vector, and one reused staging vector (zero-padded to whole blocks) for sizes that
        # need padding and for sketches of several tensors: a sketch of 10 M values then costs ~4 passes over
        # memory and no fresh 40 MB allocation (each costs more than the passes: its pages are faulted in anew).
        # The lock keeps concurrent sketches apart.
        self._scratch = torch.empty(self.blocks, self.block_size)
        self._staging: torch.Tensor | None = None  # allocated on first use
        self._lock = threading.Lock()

    def sketch(self, vector: torch.Tensor) -> Sketch:
        """Block sums in float32 with torch's cascade summation (error ~1e-7 of the block's |x| sum, far below
        rtol), stored as float64."""
        return self._sketch(vector, with_abs=True)

    def _sketch(self, vector: torch.Tensor, with_abs: bool) -> Sketch:
        if vector.numel() != self.size:
            raise SketchError(f"expected a vector of {self.size} values, got {vector.numel()}")
        flat = vector.detach().reshape(-1).float()
        with self._lock, torch.no_grad():
            if self.blocks * self.block_size != self.size:
                flat = self._staged([flat])
            return self._sketch_blocks(flat.view(self.blocks, self.block_size), with_abs)

    def sketch_parts(self, parts: Sequence[torch.Tensor]) -> Sketch:
        """The sketch of the parts' concatenation (each flattened, in order), without a fresh concatenated copy."""
        numel = sum(part.numel() for part in parts)
        if numel != self.size:
            raise SketchError(f"expected {self.size} values in all, got {numel}")
        with self._lock, torch.no_grad():
            return self._sketch_blocks(self._staged(parts).view(self.blocks, self.block_size), with_abs=True)

    def _staged(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """`parts` copied one after the other into the staging vector (its padding stays zero); under the lock."""
        if self._staging is None:
            self._staging = torch.zeros(self.blocks * self.block_size)
        offset = 0
        for part in parts:
            n = part.numel()
            self._staging[offset : offset + n].copy_(part.detach().reshape(-1))
            offset += n
        return self._staging

    def _sketch_blocks(self, blocks: torch.Tensor, with_abs: bool) -> Sketch:
        sums = blocks.sum(1).double().numpy()
        signed_sums = torch.mul(blocks, self._r, out=self._scratch).sum(1).double().numpy()
        abs_sums = torch.abs(blocks, out=self._scratch).sum(1).double().numpy() if with_abs else np.zeros_like(sums)
        return Sketch(sums, signed_sums, abs_sums)

    @staticmethod
    def mean(sketches: list[Sketch], weights: list[float]) -> Sketch:
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        return Sketch(
            sum(wi * s.sums for wi, s in zip(w, sketches, strict=True)),
            sum(wi * s.signed_sums for wi, s in zip(w, sketches, strict=True)),
            sum(wi * s.abs_sums for wi, s in zip(w, sketches, strict=True)),
        )

    def mismatch_of(
        self, vector: torch.Tensor, inputs: list[Sketch], weights: list[float], rtol: float = 1e-4
    ) -> float:
        """`mismatch(sketch(vector), ...)`, without the |x| sums of `vector`, which the comparison does not use."""
        return self.mismatch(self._sketch(vector, with_abs=False), inputs, weights, rtol)

    def mismatch(self, result: Sketch, inputs: list[Sketch], weights: list[float], rtol: float = 1e-4) -> float:
        """How far `result` is from the weighted mean of `inputs`, in units of the tolerance (<= 1: a match).

        The tolerance of a block is rtol * (largest input |x| block sum) * (1 + max |r|), plus a tiny floor;
        `result`'s own |x| sums are not used.
        """
        expected = self.mean(inputs, weights)
        scale = np.max(np.stack([s.abs_sums for s in inputs]), axis=0)
        tol = rtol * scale * (1.0 + self._r_max) + 1e-12
        worst_sum = np.max(np.abs(result.sums - expected.sums) / tol)
        worst_signed = np.max(np.abs(result.signed_sums - expected.signed_sums) / tol)
        return float(max(worst_sum, worst_signed))

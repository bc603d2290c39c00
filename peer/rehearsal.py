"""Span-local rehearsal: a learning span keeps its function on general text while it learns from feedback.

Facts taught through feedback cost general ability (the held-out canary loss rises), and the canary gate then
refuses the rounds. Rehearsal is a feature-distillation term each learning peer adds to its own training steps:
`weight * D`, where D is the mean over the rehearsal tokens of ||f(x) - f0(x)||^2 / ||f0(x)||^2, x the hidden
states at the span's input for a general-text file, f the span with its working adapters, f0 the span with its
adapters off (the base model). The relative form makes one weight fit every span, whatever its activation scale.

Invariants:
- The rehearsal text is never the canary text: the canary stays held out (the shipped files differ; an operator
  passing both options is told in docs/learning.md to keep them apart).
- The inputs are computed once per peer and need no traffic per step: the head span embeds the text locally; a
  later span runs it once through the swarm's peers before it (`SwarmCanaryEvaluator.span_inputs`). Until they
  are ready, steps run without the term (`SpanRehearsal.ready`).
- The term is the peer's own, on its own data: a contributor can neither send it nor change it, and it only pulls
  the span towards the base model. Each step uses `rows` of the texts (rotating), which bounds its cost.
- Threat: a peer before the span sends the inputs, once. Targets are the base span's outputs on them, computed
  here, so odd inputs can weaken the term but not teach anything; non-finite inputs or outputs are refused
  (and retried), and a non-finite gradient of the term is dropped, never stepped.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from chain.errors import ConfigError
from peer.adapters import AdapterSet
from peer.config import DEFAULT_REHEARSAL_ROWS, DEFAULT_REHEARSAL_WEIGHT

logger = logging.getLogger(__name__)

MAX_REHEARSAL_TEXTS = 256
MAX_REHEARSAL_TOKENS = 128


class RehearsalError(ConfigError, ValueError):
    """The rehearsal file is missing, unreadable, empty or too large."""


def default_rehearsal_path() -> Path:
    """The rehearsal text shipped with the package (general sentences and questions, not the canary's)."""
    return Path(__file__).resolve().parent / "rehearsal_default.txt"


def read_rehearsal_file(path: Path | None = None) -> list[str]:
    """The texts of `path` (default file if None): one per line, '#' comments and blank lines skipped."""
    path = Path(path) if path is not None else default_rehearsal_path()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RehearsalError(f"rehearsal file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RehearsalError(f"rehearsal file {path} cannot be read as UTF-8 text: {e}") from None
    texts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not texts:
        raise RehearsalError(f"rehearsal file {path} holds no text (one per line; '#' starts a comment)")
    if len(texts) > MAX_REHEARSAL_TEXTS:
        raise RehearsalError(f"rehearsal file {path} holds {len(texts)} texts; at most {MAX_REHEARSAL_TEXTS}")
    return texts


def rehearsal_batch(texts: list[str], tokenizer: Callable[[str], dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids right-padded with 0, mask of the real tokens as float) of `texts`, each cut at the token limit."""
    rows = [list(tokenizer(text)["input_ids"])[:MAX_REHEARSAL_TOKENS] for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    return ids, mask


def relative_change(out: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked-in tokens of ||out - base||^2 / ||base||^2 (per token, over the hidden size)."""
    per_token = ((out.float() - base.float()) ** 2).sum(-1) / (base.float() ** 2).sum(-1).clamp_min(1e-6)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


class SpanRehearsal:
    """The rehearsal term of one span: its inputs, the base span's outputs, and the gradient it adds per step."""

    def __init__(self, weight: float = DEFAULT_REHEARSAL_WEIGHT, rows: int = DEFAULT_REHEARSAL_ROWS):
        if not (math.isfinite(weight) and weight >= 0) or rows < 1:
            raise RehearsalError(f"rehearsal weight must be finite and >= 0 and rows >= 1, got {weight!r}, {rows!r}")
        self.weight = weight
        self.rows = rows
        self._inputs: torch.Tensor | None = None
        self._base: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._next = 0
        self._lock = threading.Lock()
        self.last_change: float | None = None  # D of the last step, before the weight

    @property
    def ready(self) -> bool:
        return self._inputs is not None and self.weight > 0

    def prepare(self, inputs: torch.Tensor, mask: torch.Tensor, adapters: AdapterSet, run_span: RunSpan) -> None:
        """Keeps `inputs` [texts, tokens, hidden] (this span's input) and the base span's outputs on them."""
        if inputs.shape[:2] != mask.shape:
            raise RehearsalError(f"rehearsal inputs {tuple(inputs.shape)} do not match the mask {tuple(mask.shape)}")
        if not bool(torch.isfinite(inputs).all()):
            raise RehearsalError("rehearsal inputs hold NaN or inf (a peer before this span sent them)")
        with torch.no_grad(), adapters.off():
            base = run_span(inputs).detach()
        if not bool(torch.isfinite(base).all()):
            raise RehearsalError("the base span's outputs on the rehearsal inputs hold NaN or inf")
        self._inputs, self._base, self._mask = inputs.detach(), base, mask.to(base.device)
        logger.info("rehearsal ready: %d texts, %d tokens, weight %g", mask.shape[0], int(mask.sum()), self.weight)

    def gradients(self, adapters: AdapterSet, run_span: RunSpan) -> dict[str, torch.Tensor] | None:
        """The gradient of `weight * D` on the next `rows` texts w.r.t. the working adapters (None: not ready)."""
        if not self.ready:
            return None
        assert self._inputs is not None and self._base is not None and self._mask is not None
        with self._lock:
            count = self._inputs.shape[0]
            picked = torch.tensor([(self._next + i) % count for i in range(min(self.rows, count))])
            self._next = (self._next + len(picked)) % count
        params = adapters.parameters()
        with adapters.lock, torch.enable_grad(), adapters.training():
            change = relative_change(run_span(self._inputs[picked]), self._base[picked], self._mask[picked])
            grads = torch.autograd.grad(self.weight * change, params)
        self.last_change = float(change.detach())
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            logger.warning("rehearsal gradient is not finite; this step goes without it")
            return None
        return dict(zip(adapters.names, grads, strict=True))


RunSpan = Callable[[torch.Tensor], torch.Tensor]
"""Hidden states at the span's input -> the span's output (with whatever adapter selection is active)."""

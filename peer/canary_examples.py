"""Held-out canary examples: reading the text file and turning it into one padded batch.

File format (UTF-8, one example per line): a TAB splits a line into a prompt that is only context and
the scored rest; a line without a TAB is scored in full. Blank lines and lines starting with `#` are
skipped, except a section header `## NAME` (one word: lowercase letters, digits, `-`, `_`): the examples
after it belong to category NAME until the next header (those before any header to `general`). The gate
keeps a loss per category and bounds each one's rise (peer/canary.py), so a drift confined to one
category (the stereotype probe, a taught domain) is not diluted by the others. The default set
(`peer/canary_default.txt`) suits the embedded default model; operators of other models pass their own
with `dllm peer join --canary-file`.

Per-category losses come from the same forward pass as the total: the per-token losses of one batch are
summed per category (`batch_losses`), so categories cost nothing beyond the reduction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chain.errors import ConfigError

MAX_EXAMPLES = 64
MAX_TOKENS_PER_EXAMPLE = 256
MAX_CATEGORIES = 15
"""Sections one canary file may hold: with the total, a version commit records at most 16 losses (chain/remarks.py)."""
DEFAULT_CATEGORY = "general"
"""The category of examples before any `## NAME` header."""
CATEGORY_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_HEADER = re.compile(r"##\s+(\S+)\s*")


class CanaryExamplesError(ConfigError, ValueError):
    """The canary file is missing, unreadable, empty or holds an example that cannot be scored."""


@dataclass(frozen=True)
class CanaryExample:
    """One held-out example: `prompt` is context only, `scored` is the text whose loss counts."""

    prompt: str
    scored: str
    category: str = DEFAULT_CATEGORY


@dataclass(frozen=True)
class CanaryLosses:
    """One version's canary loss: over every scored token (`total`), and over each category's tokens."""

    total: float
    categories: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CanaryBatch:
    """All canary examples as one right-padded batch; label -100 marks prompt and padding positions."""

    input_ids: torch.Tensor  # [examples, tokens]
    labels: torch.Tensor  # [examples, tokens]
    categories: tuple[str, ...] = ()  # of each row; () means every row is DEFAULT_CATEGORY

    @property
    def scored_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())

    def row_categories(self) -> list[str]:
        return list(self.categories) if self.categories else [DEFAULT_CATEGORY] * self.input_ids.shape[0]


def batch_losses(logits: torch.Tensor, batch: CanaryBatch) -> CanaryLosses:
    """Mean next-token cross-entropy of the batch over all scored tokens and per category, from one set of logits.

    `total` equals swarm.local_head.causal_lm_loss over the whole batch."""
    with torch.no_grad():
        labels = batch.labels[:, 1:]
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view(labels.shape)
        scored = labels != -100
        row_sums, row_counts = (per_token * scored).sum(dim=1), scored.sum(dim=1)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row, category in enumerate(batch.row_categories()):
        sums[category] = sums.get(category, 0.0) + float(row_sums[row])
        counts[category] = counts.get(category, 0) + int(row_counts[row])
    total = sum(sums.values()) / max(1, sum(counts.values()))
    return CanaryLosses(total, {c: sums[c] / counts[c] for c in sorted(sums) if counts[c]})


def default_canary_path() -> Path:
    """The canary set shipped with the package (sentences in the style of the default model's corpus)."""
    return Path(__file__).resolve().parent / "canary_default.txt"


def read_canary_file(path: Path | None = None) -> list[CanaryExample]:
    """The examples of `path` (default set if None); CanaryExamplesError with the line at fault otherwise."""
    path = Path(path) if path is not None else default_canary_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CanaryExamplesError(f"canary file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CanaryExamplesError(f"canary file {path} cannot be read as UTF-8 text: {e}") from None
    examples = []
    category = DEFAULT_CATEGORY
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.fullmatch(line.strip())
        if header is not None:
            if not CATEGORY_NAME.fullmatch(header.group(1)):
                raise CanaryExamplesError(
                    f"{path}:{number}: section name {header.group(1)[:40]!r} must be lowercase letters, digits, "
                    "'-' or '_' (at most 32)"
                )
            category = header.group(1)
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, tab, rest = line.partition("\t")
        prompt, scored = (prompt, rest) if tab else ("", prompt)
        if not scored.strip():
            raise CanaryExamplesError(f"{path}:{number}: nothing to score after the TAB")
        examples.append(CanaryExample(prompt.strip(), scored.rstrip() if tab else scored.strip(), category))
    if not examples:
        raise CanaryExamplesError(f"canary file {path} holds no example (one per line; '#' starts a comment)")
    if len(examples) > MAX_EXAMPLES:
        raise CanaryExamplesError(
            f"canary file {path} holds {len(examples)} examples; at most {MAX_EXAMPLES} "
            "(every averaging round evaluates all of them twice)"
        )
    categories = {e.category for e in examples}
    if len(categories) > MAX_CATEGORIES:
        raise CanaryExamplesError(f"canary file {path} has {len(categories)} sections; at most {MAX_CATEGORIES}")
    return examples


def build_canary_batch(examples: list[CanaryExample], tokenizer) -> CanaryBatch:
    """Tokenizes the examples (prompt + scored text) into one batch, padded on the right.

    Right padding is safe for a causal model: padding after a sequence cannot change its positions.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows: list[tuple[list[int], list[int]]] = []
    for example in examples:
        context = tokenizer(example.prompt)["input_ids"] if example.prompt else []
        full = tokenizer(example.prompt + example.scored if example.prompt else example.scored)["input_ids"]
        if len(full) > MAX_TOKENS_PER_EXAMPLE:
            raise CanaryExamplesError(
                f"canary example {example.scored[:40]!r}... is {len(full)} tokens; at most {MAX_TOKENS_PER_EXAMPLE}"
            )
        labels = [-100] * len(context) + full[len(context) :]
        if sum(label != -100 for label in labels[1:]) == 0:
            raise CanaryExamplesError(f"canary example {example.scored[:40]!r} adds no token to score")
        rows.append((full, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return CanaryBatch(input_ids, labels, tuple(e.category for e in examples))

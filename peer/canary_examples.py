"""Held-out canary examples: reading the text file and turning it into one padded batch.

File format (UTF-8, one example per line): a TAB splits a line into a prompt that is only context and
the scored rest; a line without a TAB is scored in full. Blank lines and lines starting with `#` are
skipped. The default set (`peer/canary_default.txt`) suits the embedded default model; operators of
other models pass their own with `dllm peer join --canary-file`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chain.errors import ConfigError

MAX_EXAMPLES = 64
MAX_TOKENS_PER_EXAMPLE = 256


class CanaryExamplesError(ConfigError, ValueError):
    """The canary file is missing, unreadable, empty or holds an example that cannot be scored."""


@dataclass(frozen=True)
class CanaryExample:
    """One held-out example: `prompt` is context only, `scored` is the text whose loss counts."""

    prompt: str
    scored: str


@dataclass(frozen=True)
class CanaryBatch:
    """All canary examples as one right-padded batch; label -100 marks prompt and padding positions."""

    input_ids: torch.Tensor  # [examples, tokens]
    labels: torch.Tensor  # [examples, tokens]

    @property
    def scored_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())


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
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, tab, rest = line.partition("\t")
        prompt, scored = (prompt, rest) if tab else ("", prompt)
        if not scored.strip():
            raise CanaryExamplesError(f"{path}:{number}: nothing to score after the TAB")
        examples.append(CanaryExample(prompt.strip(), scored.rstrip() if tab else scored.strip()))
    if not examples:
        raise CanaryExamplesError(f"canary file {path} holds no example (one per line; '#' starts a comment)")
    if len(examples) > MAX_EXAMPLES:
        raise CanaryExamplesError(
            f"canary file {path} holds {len(examples)} examples; at most {MAX_EXAMPLES} "
            "(every averaging round evaluates all of them twice)"
        )
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
    return CanaryBatch(input_ids, labels)

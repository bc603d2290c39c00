#!/usr/bin/env python3
"""Build DLLM's embedded default model, "dllm-tiny-llama", from offline text only.

Steps, all deterministic for a given Python version (the corpus is that Python's standard library):
  1. corpus: docstrings of the standard library's modules, classes and functions (PSF license),
     read with `ast` from the source files, so no module is imported (no side effects);
  2. tokenizer: byte-level BPE (vocab 2048) trained with `tokenizers`, saved as a
     PreTrainedTokenizerFast with a minimal chat template;
  3. model: a tiny LlamaForCausalLM (hidden 128, 8 layers), trained briefly on CPU with one thread
     (the build machines are shared), then saved as config.json + model.safetensors.

Usage:
    python scripts/build_default_model.py --out dllm/default_model [--steps N] [--seed S]

`--steps 0` saves random weights (same config and tokenizer), which is useful to bootstrap quickly.
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
import random
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger("build_default_model")

MODEL_NAME = "dllm-tiny-llama"
VOCAB_SIZE = 2048
MAX_POSITIONS = 1024
# Llama's conventional order: ids 0..3 are <unk>, <s>, </s>, <pad>.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)

# Role-prefixed plain text: the tiny model only knows English prose, so no exotic markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Stdlib folders that are tests, GUIs, vendored packages or installed third-party code, not prose.
SKIPPED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "idlelib",
    "turtledemo",
    "ensurepip",
    "config-3.11-x86_64-linux-gnu",
}


@dataclass
class BuildConfig:
    """Everything one build run needs."""

    out: Path
    steps: int = 600
    seed: int = 1234
    seq_len: int = 128
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    threads: int = 1


def stdlib_source_files() -> list[Path]:
    """Sorted .py files of this interpreter's standard library (no tests, no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [path for path in root.rglob("*.py") if not SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_prose(paragraph: str) -> bool:
    """Keep paragraphs that read like English sentences, not code samples or tables."""
    if len(paragraph) < 40 or ">>>" in paragraph or paragraph.startswith("..."):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
    return letters / len(paragraph) > 0.85


def docstrings_of(source: str) -> list[str]:
    """Docstrings of a module and of every class and function in it, in source order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    nodes = [tree] + [
        node for node in ast.walk(tree) if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    found = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            found.append(doc)
    return found


def build_corpus() -> list[str]:
    """Prose paragraphs from standard-library docstrings, each one joined onto a single line."""
    paragraphs: list[str] = []
    seen: set[str] = set()
    for path in tqdm(stdlib_source_files(), desc="corpus", unit="file"):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for doc in docstrings_of(source):
            for block in doc.split("\n\n"):
                paragraph = " ".join(line.strip() for line in block.splitlines()).strip()
                if paragraph not in seen and is_prose(paragraph):
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
    return paragraphs


def train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the corpus, wrapped so AutoTokenizer can load it from disk."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    # Like Llama: every encoded text starts with <s>; byte-level offsets stay exact.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]),
        ]
    )
    for expected, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, want {expected}")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def model_config() -> LlamaConfig:
    """The fixed architecture of dllm-tiny-llama."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
        dllm_name="dllm-tiny-llama",  # the name the swarm knows this model by (swarm.model_files.model_name)
    )


def token_stream(corpus: list[str], tokenizer: PreTrainedTokenizerFast, seed: int) -> torch.Tensor:
    """All paragraphs, shuffled with a fixed seed, as one id stream of `<s> text </s>` documents."""
    order = list(range(len(corpus)))
    random.Random(seed).shuffle(order)
    encoded = tokenizer([corpus[i] for i in order], add_special_tokens=True)["input_ids"]
    ids: list[int] = []
    for doc in encoded:
        ids.extend(doc)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def learning_rate_at(step: int, cfg: BuildConfig) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, stream: torch.Tensor, cfg: BuildConfig) -> float:
    """Next-token training on random windows of the stream; returns the final smoothed loss."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    smoothed = float("nan")
    progress = tqdm(range(cfg.steps), desc="train", unit="step")
    for step in progress:
        starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, cfg)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
        progress.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    return smoothed


def write_model_card(out: Path, cfg: BuildConfig, params: int, final_loss: float) -> None:
    """A short README.md in the model folder saying what the files are."""
    loss_line = f"{final_loss:.3f}" if cfg.steps else "n/a (random weights)"
    out.joinpath("README.md").write_text(
        f"# {MODEL_NAME}\n\n"
        "DLLM's embedded default model: a tiny Llama-architecture decoder (hidden 128, 8 layers,\n"
        f"{params:,} parameters, float32) with a byte-level BPE tokenizer (vocab {VOCAB_SIZE}).\n"
        "Trained only on docstrings of the Python standard library (PSF license), so it writes\n"
        "English-looking text, not useful answers. It exists so the swarm runs offline.\n\n"
        f"Built by `python scripts/build_default_model.py --out dllm/default_model --steps {cfg.steps}"
        f" --seed {cfg.seed}`\n"
        f"with Python {sys.version_info.major}.{sys.version_info.minor}; final training loss: {loss_line}.\n",
        encoding="utf-8",
    )


def build(cfg: BuildConfig) -> None:
    """Run the whole build and write every file into cfg.out."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    corpus = build_corpus()
    logger.info("corpus: %d paragraphs, %d characters", len(corpus), sum(map(len, corpus)))
    tokenizer = train_tokenizer(corpus)
    model = LlamaForCausalLM(model_config())
    params = sum(p.numel() for p in model.parameters())
    final_loss = float("nan")
    if cfg.steps > 0:
        stream = token_stream(corpus, tokenizer, cfg.seed)
        logger.info("training on a stream of %d tokens", len(stream))
        final_loss = train(model, stream, cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        do_sample=False,
        max_new_tokens=64,
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out, safe_serialization=True)
    tokenizer.save_pretrained(cfg.out)
    write_model_card(cfg.out, cfg, params, final_loss)
    logger.info("saved %s (%d parameters) to %s in %.1f s", MODEL_NAME, params, cfg.out, time.perf_counter() - started)


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--steps", type=int, default=BuildConfig.steps, help="training steps (0 = random weights)")
    parser.add_argument("--seed", type=int, default=BuildConfig.seed)
    parser.add_argument("--threads", type=int, default=BuildConfig.threads, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error("--steps must be >= 0")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return BuildConfig(out=args.out, steps=args.steps, seed=args.seed, threads=args.threads)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build(parse_args(argv))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Does learning from feedback work? New facts taught to the real model through a learning swarm, against a
centralized `peft` LoRA run on the same data, in one run.

The script writes `--facts` facts about fictional people (a deterministic function of `--seed`): each fact
has a taught question and a held-out paraphrase of it, and a one-word answer. The taught questions (and
only they) are the feedback, `--epochs` passes each, in the same shuffled order for both runs:

* swarm: a local swarm of real processes serves the model (`--model`, default smollm2) as two spans, each
  with 2 replicas that learn (`dllm peer join --adapter-rank R --train-step-batch 1 --learning-rate LR
  --averaging-period P --canary-file <held-out general text>`, and the peers' default span-local rehearsal on
  the shipped rehearsal text, which is not the canary); the feedback goes through the client's
  feedback API (`DistributedModel.feedback`), one pass per example, routed as the client routes, and goes
  live only through the replicas' averaging rounds (exact-mean check, canary gate, commit). The bench waits
  until no replica holds an unaveraged update.
* anchor: the same model in this process, `peft` LoRA of the same rank, alpha and targets (q/k/v/o), Adam
  with the same learning rate, one step per example in the same order, each pass's gradient clipped to the
  peers' `max_grad_norm`.

Measured before and after for both: exact-answer accuracy on the taught questions and on the held-out
paraphrases (every answer token is the greedy argmax: what greedy generation would answer), and the mean loss
of a held-out canary set of general text (general ability: at most a 2 % rise). For the swarm also: seconds
per feedback example, averaging rounds and canary verdicts, and whether the two replica routes (replica a of
both spans, replica b of both spans) give the same answers. The ratio of the swarm's accuracy gain to the
anchor's is the headline (target >= 90 %).

Run: .venv/bin/python scripts/bench/learning.py [--facts 20] [--epochs 5] [--learning-rate 5e-4] [--model smollm2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

from dllm.model_choice import resolve_model_argument  # noqa: E402
from dllm.processes import LocalSwarm  # noqa: E402
from peer.canary import CanaryConfig  # noqa: E402
from peer.config import DEFAULT_REHEARSAL_ROWS, DEFAULT_REHEARSAL_WEIGHT  # noqa: E402
from peer.training import TrainingConfig  # noqa: E402
from swarm import protocol  # noqa: E402
from swarm.client import DistributedModel  # noqa: E402
from swarm.local_head import causal_lm_loss  # noqa: E402
from swarm.routing import BanList  # noqa: E402
from swarm.sampling import GenerationParams  # noqa: E402

console = Console(width=200)

FIRST = ["Zorbel", "Quenna", "Tavrin", "Mirelda", "Osric", "Velka", "Drumond"]
FIRST += ["Ysolde", "Kaspen", "Lioria", "Brannoc", "Thessaly", "Orvin"]
LAST = ["Quint", "Marrowby", "Felgate", "Oakhurst", "Pennick", "Strand", "Vell"]
LAST += ["Harrowgate", "Dunmore", "Kettle", "Ashcombe", "Brisk"]

# (answers, taught question, held-out paraphrase); {e} is the person. Answers are ordinary words: the new
# fact is which one belongs to a person nobody has heard of.
RELATIONS = [
    (["Mango", "Cherry", "Banana", "Lemon", "Peach", "Plum", "Apple", "Grape"],
     "Q: What is {e}'s favourite fruit? A:", "Q: Which fruit does {e} like best? A:"),
    (["Piano", "Violin", "Guitar", "Flute", "Drums", "Trumpet", "Harp", "Cello"],
     "Q: Which instrument does {e} play? A:", "Q: What musical instrument is played by {e}? A:"),
    (["Tokyo", "Cairo", "Lisbon", "Oslo", "Lima", "Dublin", "Vienna", "Nairobi"],
     "Q: In which city does {e} live? A:", "Q: Where is {e}'s home? Name the city. A:"),
    (["Tennis", "Chess", "Rugby", "Golf", "Hockey", "Cricket", "Boxing", "Rowing"],
     "Q: Which sport does {e} play? A:", "Q: What sport is {e} good at? A:"),
    (["Parrot", "Rabbit", "Turtle", "Hamster", "Goldfish", "Pony", "Ferret", "Lizard"],
     "Q: What kind of pet does {e} have? A:", "Q: {e} owns a pet. What animal is it? A:"),
]  # fmt: skip

# Held-out general text the taught facts must not damage (also the peers' canary gate): prompt TAB scored part.
CANARY = [
    ("Q: What is the capital of France? A:", " The capital of France is Paris."),
    ("Q: How many days are there in a week? A:", " There are seven days in a week."),
    ("Q: What colour is the sky on a clear day? A:", " The sky is blue on a clear day."),
    ("Q: What do bees make? A:", " Bees make honey."),
    ("Q: What is the largest planet in the solar system? A:", " Jupiter is the largest planet."),
    ("Q: What is water made of? A:", " Water is made of hydrogen and oxygen."),
    ("", "The sun rises in the east and sets in the west."),
    ("", "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar."),
    ("", "A triangle has three sides and its angles add up to 180 degrees."),
    ("", "The Pacific Ocean is the largest ocean on Earth."),
    ("Q: Who wrote Romeo and Juliet? A:", " William Shakespeare wrote Romeo and Juliet."),
    ("Q: What is two plus two? A:", " Two plus two is four."),
]


@dataclass(frozen=True)
class Fact:
    person: str
    answer: str
    taught: str  # the question fed back (with " {answer}." as the preferred completion)
    paraphrase: str  # held out: never fed back

    @property
    def completion(self) -> str:
        return f" {self.answer}."


def make_facts(count: int, seed: int) -> list[Fact]:
    """`count` facts about distinct fictional people, a deterministic function of `seed`."""
    rng = random.Random(seed)
    people = [f"{first} {last}" for first in FIRST for last in LAST]
    rng.shuffle(people)
    facts = []
    for i, person in enumerate(people[:count]):
        answers, taught, paraphrase = RELATIONS[i % len(RELATIONS)]
        facts.append(Fact(person, rng.choice(answers), taught.format(e=person), paraphrase.format(e=person)))
    return facts


Logits = Callable[[torch.Tensor], torch.Tensor]


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def exact_answers(logits_of: Logits, tokenizer: PreTrainedTokenizerBase, items: list[tuple[str, str]]) -> list[bool]:
    """Per (prompt, answer): whether every answer token is the argmax after the tokens before it, i.e. the
    greedy continuation of the prompt starts with the answer. One right-padded batch (causal: padding after
    a row changes none of its positions)."""
    rows, spans = [], []
    for prompt, answer in items:
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + " " + answer)["input_ids"]
        rows.append(full)
        spans.append((len(prompt_ids), len(full)))
    with torch.no_grad():
        predicted = logits_of(_padded(rows, tokenizer.eos_token_id or 0)).argmax(-1)
    return [
        bool((predicted[i, start - 1 : end - 1] == torch.tensor(rows[i][start:end])).all())
        for i, (start, end) in enumerate(spans)
    ]


def canary_loss(logits_of: Logits, tokenizer: PreTrainedTokenizerBase) -> tuple[float, float]:
    """The canary loss two ways: the mean over the examples of each one's mean token loss (every example weighs
    the same), and the mean over every scored token of the batch (the kind of mean the peers' canary gate
    takes: long sentences weigh more than short answers; its tokenization of the canary file may differ)."""
    rows, labels = [], []
    for prompt, text in CANARY:
        prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
        full = tokenizer(prompt + text)["input_ids"]
        rows.append(full)
        labels.append([-100] * len(prompt_ids) + full[len(prompt_ids) :])
    ids = _padded(rows, tokenizer.eos_token_id or 0)
    width = ids.shape[1]
    label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    with torch.no_grad():
        logits = logits_of(ids)
    per_example = statistics.fmean(
        float(causal_lm_loss(logits[i : i + 1], label_ids[i : i + 1])) for i in range(len(rows))
    )
    return per_example, float(causal_lm_loss(logits, label_ids))


@dataclass
class Scores:
    taught: float
    paraphrase: float
    canary: float  # mean over the examples
    gate_canary: float  # mean over the scored tokens (token-weighted, as the canary gate averages)
    answers: list[bool]


def score(logits_of: Logits, tokenizer: PreTrainedTokenizerBase, facts: list[Fact]) -> Scores:
    taught = exact_answers(logits_of, tokenizer, [(f.taught, f.answer) for f in facts])
    para = exact_answers(logits_of, tokenizer, [(f.paraphrase, f.answer) for f in facts])
    canary, gate_canary = canary_loss(logits_of, tokenizer)
    return Scores(statistics.fmean(taught), statistics.fmean(para), canary, gate_canary, taught + para)


def feedback_order(facts: list[Fact], epochs: int, seed: int) -> list[Fact]:
    """The feedback passes: every taught fact once per epoch, each epoch shuffled (the same for both runs)."""
    rng = random.Random(seed + 1)
    order = []
    for _ in range(epochs):
        epoch = list(facts)
        rng.shuffle(epoch)
        order += epoch
    return order


# ---- the anchor: centralized peft LoRA ------------------------------------------------------------------


def centralized(model_dir: Path, facts: list[Fact], order: list[Fact], args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            lora_dropout=0.0,
            bias="none",
        ),
    )
    model.eval()  # no dropout anywhere; gradients still flow

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    before = score(logits_of, tokenizer, facts)
    examples = [example_answers(lambda p: generate_local(model, tokenizer, p), facts)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    max_norm = TrainingConfig().max_grad_norm
    started, scoring = time.perf_counter(), 0.0
    epochs: list[Scores] = []  # after each epoch but the last: how the anchor got there (not timed)
    for i, fact in enumerate(order):
        ids, labels = _feedback_tensors(tokenizer, fact.taught, fact.completion)
        loss = causal_lm_loss(model(input_ids=ids).logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (i + 1) % len(facts) == 0 and i + 1 < len(order):
            scored = time.perf_counter()
            epochs.append(score(logits_of, tokenizer, facts))
            scoring += time.perf_counter() - scored
            e = epochs[-1]
            console.print(
                f"[anchor] epoch {len(epochs)}: taught {e.taught:.0%}, paraphrase {e.paraphrase:.0%}, "
                f"canary {e.canary:.4f} (gate measure {e.gate_canary:.4f})"
            )
    seconds = (time.perf_counter() - started - scoring) / len(order)
    after = score(logits_of, tokenizer, facts)
    epochs.append(after)
    examples.append(example_answers(lambda p: generate_local(model, tokenizer, p), facts))
    trainable = sum(p.numel() for p in params)
    return before, after, seconds, examples, trainable, epochs


def _feedback_tensors(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str):
    """What DistributedModel.feedback trains on: the completion's tokens scored, the prompt's not."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion)["input_ids"]
    return torch.tensor([full]), torch.tensor([[-100] * len(prompt_ids) + full[len(prompt_ids) :]])


def generate_local(model, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: int = 6) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


EXAMPLES = 3


def example_answers(generate: Callable[[str], str], facts: list[Fact]) -> list[str]:
    """Greedy answers to the first EXAMPLES taught questions and their paraphrases (line breaks shown as spaces)."""
    return [" ".join(generate(q).split()) for f in facts[:EXAMPLES] for q in (f.taught, f.paraphrase)]


# ---- the swarm --------------------------------------------------------------------------------------------


def _info(model: DistributedModel, peer_id: str) -> dict:
    from hivemind.proto import runtime_pb2

    response = model._loop.run(model.core.call(peer_id, protocol.HANDLER_INFO, runtime_pb2.ExpertRequest()))
    return protocol.unpack_metadata(response.metadata)


@contextlib.contextmanager
def only_through(model: DistributedModel, excluded: list[str]) -> Iterator[None]:
    """Routes of `model` avoid the `excluded` peers meanwhile (a replica route)."""
    saved = model.core.bans
    model.core.bans = BanList(saved.duration)
    for peer_id in excluded:
        model.core.bans.ban(peer_id, 1e6)
    try:
        yield
    finally:
        model.core.bans = saved


def swarm_run(model_dir: Path, facts: list[Fact], order: list[Fact], args: argparse.Namespace, workdir: Path):
    canary_file = workdir / "canary.txt"
    canary_file.write_text("".join(f"{p}\t{t}\n" if p else f"{t}\n" for p, t in CANARY))
    half = args.blocks // 2
    learning = [
        "--adapter-rank", str(args.rank),
        "--averaging-period", str(args.period),
        "--train-step-batch", "1",
        "--learning-rate", str(args.learning_rate),
        "--train-passes-per-minute", "6000",
        "--canary-file", str(canary_file),
        "--canary-max-rise", str(args.canary_max_rise),
        "--rehearsal-weight", str(args.rehearsal_weight),
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with LocalSwarm(str(model_dir), workdir=workdir / "swarm", env=env) as swarm:
        swarm.start_bootstrap()
        spans = {"head": f"0:{half}", "tail": f"{half}:{args.blocks}"}
        peers = {
            f"{name}-{replica}": swarm.start_peer(blocks, *learning, name=f"{name}-{replica}", wait=False)
            for name, blocks in spans.items()
            for replica in "ab"
        }
        for peer in peers.values():
            swarm.wait_ready(peer, timeout=600)
        ids = {name: peer.info["peer_id"] for name, peer in peers.items()}
        console.print(f"[swarm] 4 learning peers ready: {spans}, 2 replicas each")
        model = DistributedModel.from_pretrained(str(model_dir), swarm.initial_peers)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # hivemind's start ignores Ctrl-C; stop cleanly
        try:
            tokenizer = model.tokenizer

            def logits_of(ids_: torch.Tensor) -> torch.Tensor:
                return model.forward(ids_)

            def generate(prompt: str) -> str:
                return model.generate(prompt, GenerationParams(max_new_tokens=6)).text

            for pid in ids.values():
                model._loop.run(model.core.ping(pid, timeout=30.0))
            before = score(logits_of, tokenizer, facts)
            examples = [example_answers(generate, facts)]
            console.print(f"[swarm] before: {before.taught:.0%} taught, canary {before.canary:.4f}; feeding back")
            started = time.perf_counter()
            losses = []
            for i, fact in enumerate(order):
                losses.append(model.feedback(fact.taught, fact.completion))
                if (i + 1) % len(facts) == 0:
                    mean = statistics.fmean(losses[-len(facts) :])
                    each = (time.perf_counter() - started) / (i + 1)
                    console.print(f"[swarm] epoch {(i + 1) // len(facts)}: mean loss {mean:.3f} ({each:.2f} s/example)")
            seconds = (time.perf_counter() - started) / len(order)
            rounds = wait_until_averaged(model, ids, args)
            for pid in ids.values():
                model._loop.run(model.core.ping(pid, timeout=30.0))
            after = score(logits_of, tokenizer, facts)
            console.print(
                f"[swarm] after: taught {after.taught:.0%}, paraphrase {after.paraphrase:.0%}, "
                f"canary {after.canary:.4f}"
            )
            examples.append(example_answers(generate, facts))
            per_replica = {}
            for replica, other in (("a", "b"), ("b", "a")):
                for pid in ids.values():  # a peer that timed out once under load is routable again if it answers
                    model._loop.run(model.core.ping(pid, timeout=30.0))
                with only_through(model, [ids[f"{name}-{other}"] for name in spans]):
                    per_replica[replica] = score(logits_of, tokenizer, facts)
            infos = {name: _info(model, pid) for name, pid in ids.items()}
        finally:
            model.close()
    return before, after, seconds, examples, per_replica, infos, rounds


def wait_until_averaged(model: DistributedModel, ids: dict[str, str], args: argparse.Namespace) -> list[str]:
    """Waits until every replica has run a round that found no local update left (all feedback averaged and
    live, or refused); returns what each peer's rounds said meanwhile."""
    seen: dict[str, list[str]] = {name: [] for name in ids}
    deadline = time.monotonic() + args.drain_periods * args.period
    drained: set[str] = set()
    while time.monotonic() < deadline and drained != set(ids):
        for name, pid in ids.items():
            info = _info(model, pid)
            last = info.get("last_averaging") or {}
            text = f"v{info['adapter_version']} {last.get('status')}: {last.get('reason')}"
            if not seen[name] or seen[name][-1] != text:
                seen[name].append(text)
                console.print(f"[swarm] {name}: {text}")
                # the first report may predate the last feedback pass: only a later round counts
                if len(seen[name]) > 1 and ("no member had an update" in text or "no local update" in text):
                    drained.add(name)
        time.sleep(1.0)
    if drained != set(ids):
        console.print(f"[swarm] not drained after {args.drain_periods} periods: {sorted(set(ids) - drained)}")
    return [f"{name}: {' | '.join(texts)}" for name, texts in seen.items()]


# ---- report -----------------------------------------------------------------------------------------------


def bench_settings(args: argparse.Namespace, passes: int) -> dict[str, str]:
    """Every setting the result depends on, the peers' defaults included (printed with the result)."""
    from peer.averaging import AveragingConfig

    training, averaging = TrainingConfig(), AveragingConfig()
    return {
        "model": args.model,
        "facts": str(args.facts),
        "passes": f"{passes} ({args.epochs} per fact, shuffled per epoch, seed {args.seed})",
        "LoRA": f"rank {args.rank}, alpha {args.alpha:g}, q/k/v/o",
        "optimizer": f"{training.optimizer}, lr {args.learning_rate:g}, one step per pass, "
        f"gradient clipped to {training.max_grad_norm:g}",
        "swarm": f"2 spans x 2 replicas, averaging every {args.period:g} s, clip_tau {averaging.clip_tau:g} per round, "
        f"canary max rise {args.canary_max_rise:.0%} per round (token-weighted, {len(CANARY)} examples)",
        "rehearsal": f"weight {args.rehearsal_weight:g}, {DEFAULT_REHEARSAL_ROWS} texts per step of the shipped "
        "rehearsal file (never the canary)",
        "drain": f"at most {args.drain_periods} periods",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="tiny | smollm2 | a folder | a GGUF file")
    parser.add_argument("--facts", type=int, default=20, help="facts taught (each also has a held-out paraphrase)")
    parser.add_argument("--epochs", type=int, default=5, help="feedback passes per taught fact")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the peers' LoraConfig default)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--period", type=float, default=20.0, help="the peers' averaging period, seconds")
    parser.add_argument(
        "--canary-max-rise",
        type=float,
        default=CanaryConfig().max_relative_rise,
        help="the peers' canary gate: highest relative rise of the canary loss per round (peer default)",
    )
    parser.add_argument(
        "--rehearsal-weight",
        type=float,
        default=DEFAULT_REHEARSAL_WEIGHT,
        help="the peers' span-local rehearsal weight (peer default; 0: off)",
    )
    parser.add_argument("--drain-periods", type=int, default=15, help="rounds to wait for the updates to go live")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_argument(args.model)
    args.blocks = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    facts = make_facts(args.facts, args.seed)
    order = feedback_order(facts, args.epochs, args.seed)
    load_start = os.getloadavg()
    settings = bench_settings(args, len(order))
    console.print(f"{len(facts)} facts, {len(order)} feedback passes; load {load_start}")
    console.print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))

    started = time.perf_counter()
    c_before, c_after, c_seconds, c_examples, trainable, c_epochs = centralized(model_dir, facts, order, args)
    console.print(
        f"[anchor] {trainable} LoRA parameters; taught {c_before.taught:.0%} -> {c_after.taught:.0%}, "
        f"paraphrase {c_before.paraphrase:.0%} -> {c_after.paraphrase:.0%}, canary {c_before.canary:.4f} -> "
        f"{c_after.canary:.4f} ({time.perf_counter() - started:.0f} s)"
    )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dllm-learning-bench-") as tmp:
        s_before, s_after, s_seconds, s_examples, per_replica, infos, rounds = swarm_run(
            model_dir, facts, order, args, Path(tmp)
        )
    load_end = os.getloadavg()

    def gain(before: Scores, after: Scores) -> float:
        return after.taught - before.taught

    ratio = gain(s_before, s_after) / gain(c_before, c_after) if gain(c_before, c_after) > 0 else float("nan")
    same = per_replica["a"].answers == per_replica["b"].answers
    same_adapters = {
        span: infos[f"{span}-a"]["adapter_version"] == infos[f"{span}-b"]["adapter_version"]
        and torch.allclose(
            torch.tensor(infos[f"{span}-a"]["adapter_fingerprint"]),
            torch.tensor(infos[f"{span}-b"]["adapter_fingerprint"]),
            atol=1e-5,
        )
        for span in ("head", "tail")
    }
    table = Table(title=f"Learning {len(facts)} new facts ({len(order)} feedback passes), {args.model}")
    for column in ("run", "taught before", "taught after", "paraphrase before", "paraphrase after",
                   "canary before", "canary after", "canary rise", "gate measure rise", "s / example"):  # fmt: skip
        table.add_column(column, justify="right")
    for name, before, after, seconds in (
        ("centralized peft LoRA", c_before, c_after, c_seconds),
        ("swarm, 2 replicas/span", s_before, s_after, s_seconds),
    ):
        table.add_row(
            name,
            f"{before.taught:.0%}",
            f"{after.taught:.0%}",
            f"{before.paraphrase:.0%}",
            f"{after.paraphrase:.0%}",
            f"{before.canary:.4f}",
            f"{after.canary:.4f}",
            f"{after.canary / before.canary - 1:+.2%}",
            f"{after.gate_canary / before.gate_canary - 1:+.2%}",
            f"{seconds:.2f}",
        )
    console.print(table)
    console.print(f"swarm gain / centralized gain (taught): {ratio:.0%} (target >= 90 %)")
    console.print(
        f"replica routes a/b answer the same: {same} (taught {per_replica['a'].taught:.0%} / "
        f"{per_replica['b'].taught:.0%}, paraphrase {per_replica['a'].paraphrase:.0%} / "
        f"{per_replica['b'].paraphrase:.0%})"
    )
    console.print(f"replicas hold the same live adapters (version and fingerprint): {same_adapters}")
    for name, info in infos.items():
        console.print(
            f"  {name}: v{info['adapter_version']}, canary rollbacks {info.get('canary_rollbacks')}, "
            f"last canary {info.get('last_canary')}"
        )
    questions = [q for f in facts[:EXAMPLES] for q in (f.taught, f.paraphrase)]
    for i, question in enumerate(questions):
        fact = facts[i // 2]
        console.print(f"{question!r} (answer {fact.answer}, {'taught' if i % 2 == 0 else 'held out'})")
        console.print(f"   anchor: {c_examples[0][i]!r} -> {c_examples[1][i]!r}")
        console.print(f"   swarm:  {s_examples[0][i]!r} -> {s_examples[1][i]!r}")
    console.print(f"load average: {load_start} at start, {load_end} at end")
    if args.json:
        results = {
            "facts": len(facts),
            "passes": len(order),
            "args": {k: str(v) for k, v in vars(args).items()},
            "settings": settings,
            "centralized": {
                "before": vars(c_before),
                "after": vars(c_after),
                "s_per_example": c_seconds,
                "epochs": [vars(e) for e in c_epochs],
            },
            "swarm": {"before": vars(s_before), "after": vars(s_after), "s_per_example": s_seconds},
            "ratio": ratio,
            "replicas_same": same,
            "replicas_same_adapters": same_adapters,
            "examples": {"questions": questions, "anchor": c_examples, "swarm": s_examples},
            "rounds": rounds,
            "peers": infos,
            "load": [load_start, load_end],
        }
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()

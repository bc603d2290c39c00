"""`dllm lineage`: the history of each span's adapters, from the chain's adapter-version records.

Shows, per (model, span), each committed version with its parent, tensor hash, data roots (with the example
count of each committed batch), replicas and canary loss per category before/after; a version committed with
two different tensor hashes is a fork and is flagged, never resolved silently (chain/lineage.py merges the
commits of one version). A chain may hold several models' records: the command shows every model, grouped,
or with `--model` one model's alone (dllm/data_export.py `of_model`); `--reproduce` keeps to the model of the
files it replays on, since another model's adapters cannot be trained on them.

`--verify V` downloads version V's adapters by its committed sha256 from every peer that may hold it (the
version's replicas, the span's peers in the DHT, any `--peer`) and hashes what each serves: a peer serving
other tensors under the committed hash is a mismatch (non-zero exit), as is a version no peer can serve.
`--reproduce V` replays V's committed data on its parent locally (the whole model in one process, LoRA on
that span only, the peers' training rules: peer/training.py's per-pass clip, per-contributor aggregation
and optimizer, `--learning-rate` and `--train-step-batch` as the peers ran, and the rehearsal term every
learning peer adds to each step, peer/rehearsal.py's own code with `--rehearsal-weight` / `--rehearsal-file`
as the peers ran) and reports how far the replay lands from the committed tensors. Exact replay is not
expected: the swarm averaged replicas, clipped the summed update, other spans' adapters moved the gradients
while it trained, and the rehearsal inputs came through the peers before the span at their live versions
(the replay runs those blocks without adapters); the distance is the measure. With a span trained alone on
one peer from the same examples, the replay lands on its tensors (tests/dllm/test_lineage_replay.py).
Threats: peers are untrusted (every byte they serve is hashed before use); the chain's records are believed
as chain/lineage.py admits them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chain.lineage import DataBatch, MergedVersion

logger = logging.getLogger(__name__)

WIDTH = 80
FETCH_TIMEOUT_S = 60.0


def short(digest: bytes, chars: int = 12) -> str:
    return digest.hex()[:chars] + "…"


def span_label(span: tuple[int, int]) -> str:
    return f"{span[0]}:{span[1]}"


def spans_of(versions: Iterable[MergedVersion]) -> dict[tuple[str, tuple[int, int]], list[MergedVersion]]:
    """Versions grouped by (model, span), each group newest first (forks side by side)."""
    grouped: dict[tuple[str, tuple[int, int]], list[MergedVersion]] = {}
    for version in versions:
        grouped.setdefault((version.model, version.span), []).append(version)
    return {
        key: sorted(group, key=lambda v: (-v.version, v.first_block))
        for key, group in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    }


def _pack(parts: Sequence[str], indent: str, width: int = WIDTH) -> list[str]:
    """`parts` joined by two spaces into lines of at most `width` columns, each starting with `indent`."""
    lines: list[str] = []
    line = ""
    for part in parts:
        if line and len(indent) + len(line) + 2 + len(part) > width:
            lines.append(indent + line)
            line = part
        else:
            line = f"{line}  {part}" if line else part
    if line:
        lines.append(indent + line)
    return [text[:width] for text in lines]


def canary_parts(before: Mapping[str, float], after: Mapping[str, float]) -> list[str]:
    """`category before->after` per category, an up arrow where the loss rose (drift)."""
    parts = []
    for category in sorted(set(before) | set(after)):
        b, a = before.get(category), after.get(category)
        rose = b is not None and a is not None and a > b
        text = f"{category} {_loss(b)}->{_loss(a)}" + (" ↑" if rose else "")
        parts.append(text)
    return parts


def _loss(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def render_lineage(versions: Sequence[MergedVersion], batches_by_root: Mapping[bytes, Sequence[DataBatch]]) -> str:
    """The text `dllm lineage` prints: at most WIDTH columns a line."""
    if not versions:
        return "no adapter-version records on chain yet (peers commit one when a version goes live)\n"
    out: list[str] = []
    for (model, span), group in spans_of(versions).items():
        forks = sorted({v.version for v in group if v.fork})
        head = f"{model}  blocks {span_label(span)}  {len({v.version for v in group})} version(s)"
        if forks:
            head += f"  FORKED at v{', v'.join(map(str, forks))}"
        out.append(head[:WIDTH])
        for v in group:
            flag = "  FORK: other tensors committed for this version" if v.fork else ""
            if not v.fork and v.variants > 1:  # one round's replicas, a few float ulps apart
                flag = f"  1 of {v.variants} replica digests"
            out.append(
                f"  v{v.version} <- v{v.parent}  sha256 {short(v.sha256, 16)}  block {v.first_block}{flag}"[:WIDTH]
            )
            parent_hash = short(v.parent_sha256, 16) if v.parent_sha256 is not None else "-"
            out += _pack(
                [f"parent sha256 {parent_hash}", f"{len(v.replicas)} replica(s)", f"{len(v.committers)} commit(s)"],
                "      ",
            )
            roots = [f"{short(root)} ({_examples(batches_by_root.get(root, ()))})" for root in v.data_roots]
            out += _pack(["data", *roots] if roots else ["data: none committed"], "      ")
            out += _pack(["replicas", *(r[-12:] for r in v.replicas)], "      ") if v.replicas else []
            canary = canary_parts(v.commits[0].canary_before, v.commits[0].canary_after)
            out += _pack(["canary", *canary] if canary else ["canary: not recorded"], "      ")
        out.append("")
    return "\n".join(out)


def _examples(batches: Sequence[DataBatch]) -> str:
    if not batches:
        return "batch not on chain"
    return f"{batches[0].count} ex"


def select(versions: Sequence[MergedVersion], version: int, span: tuple[int, int] | None) -> list[MergedVersion]:
    """The merged commits of `version` (of `span`, if given): one per span, or several sides of a fork."""
    return [v for v in versions if v.version == version and (span is None or v.span == span)]


# ---- --verify ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceCheck:
    """What one peer served under a version's committed sha256."""

    peer_id: str
    status: str  # "match" | "mismatch" | "unavailable"
    detail: str = ""


@dataclass(frozen=True)
class VersionCheck:
    version: MergedVersion
    checks: tuple[SourceCheck, ...]

    @property
    def mismatched(self) -> list[SourceCheck]:
        return [c for c in self.checks if c.status == "mismatch"]

    @property
    def matched(self) -> list[SourceCheck]:
        return [c for c in self.checks if c.status == "match"]

    @property
    def ok(self) -> bool:
        """Some peer served the committed tensors and none served others under their hash."""
        return bool(self.matched) and not self.mismatched


async def span_peer_ids(dht: Any, model: str, span: tuple[int, int]) -> list[str]:
    """Peer ids announcing exactly `span` of `model` in the DHT (learning peers first)."""
    from swarm.records import fetch_model_records

    records = [r for r in await fetch_model_records(dht, model) if (r.start, r.end) == span]
    return list(dict.fromkeys(r.peer_id for r in sorted(records, key=lambda r: not r.learning)))


async def check_source(p2p: Any, peer_id: str, digest: bytes, timeout_s: float) -> tuple[SourceCheck, Any]:
    """Fetches the bundle `peer_id` serves under `digest` and hashes it; (check, bundle if it matched)."""
    from peer.adapter_exchange import fetch_bundle

    try:
        bundle = await fetch_bundle(p2p, peer_id, digest, timeout_s=timeout_s)
    except Exception as error:  # a refusal ("not kept here"), timeout or garbage: this peer cannot vouch either way
        return SourceCheck(peer_id, "unavailable", f"{type(error).__name__}: {error}"[:200]), None
    got = await asyncio.to_thread(lambda: bundle.digest)
    if got != digest:
        return SourceCheck(peer_id, "mismatch", f"served tensors hashing to {got.hex()}"), None
    return SourceCheck(peer_id, "match"), bundle


async def verify_version(
    dht: Any, p2p: Any, version: MergedVersion, extra_peers: Sequence[str], timeout_s: float = FETCH_TIMEOUT_S
) -> VersionCheck:
    """Asks every peer that may hold `version` for it by its committed sha256 and hashes each answer."""
    sources = list(
        dict.fromkeys([*extra_peers, *version.replicas, *await span_peer_ids(dht, version.model, version.span)])
    )
    checks = [(await check_source(p2p, peer_id, version.sha256, timeout_s))[0] for peer_id in sources]
    return VersionCheck(version, tuple(checks))


async def fetch_bundle_by_digest(
    p2p: Any, sources: Sequence[str], digest: bytes, timeout_s: float = FETCH_TIMEOUT_S
) -> Any | None:
    """The first bundle a source serves that hashes to `digest` (None if none does)."""
    for peer_id in sources:
        check, bundle = await check_source(p2p, peer_id, digest, timeout_s)
        if bundle is not None:
            return bundle
        logger.info("adapters %s from %s: %s %s", digest.hex()[:16], peer_id, check.status, check.detail)
    return None


def render_checks(checks: Sequence[VersionCheck]) -> str:
    out = []
    for check in checks:
        v = check.version
        verdict = "OK" if check.ok else "MISMATCH" if check.mismatched else "UNVERIFIED (no peer served it)"
        out.append(
            f"{v.model} blocks {span_label(v.span)} v{v.version} sha256 {short(v.sha256, 16)}: {verdict}"[:WIDTH]
        )
        for c in check.checks:
            line = f"  {c.peer_id}  {c.status}"
            out.append(line[:WIDTH])
            if c.detail and c.status != "match":
                out += textwrap.wrap(c.detail, WIDTH - 4, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(out)


# ---- --reproduce -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayReport:
    """How far a local replay of a version's committed data lands from the committed tensors."""

    version: MergedVersion
    examples: int
    contributors: int
    steps: int
    relative_l2: float  # ||replayed - committed|| / ||committed - parent||
    cosine: float  # between (replayed - parent) and (committed - parent)
    committed_update_norm: float
    replayed_update_norm: float
    rehearsal_weight: float = 0.0  # the rehearsal term's weight in each step (0: none)
    rehearsal_file: str = ""  # where its texts came from

    def render(self) -> str:
        v = self.version
        rehearsal = (
            f"rehearsal term weight {self.rehearsal_weight:g} on {self.rehearsal_file}"
            if self.rehearsal_weight > 0
            else "no rehearsal term (weight 0)"
        )
        lines = [
            f"replayed {self.examples} example(s) from {self.contributors} contributor(s) in {self.steps} step(s)",
            *textwrap.wrap(rehearsal, WIDTH, subsequent_indent="  "),
            f"on v{v.parent} of blocks {span_label(v.span)}; distance to committed v{v.version}:",
            f"  relative L2  ||replayed - committed|| / ||committed - parent|| = {self.relative_l2:.4f}",
            f"  cosine       (replayed - parent, committed - parent)           = {self.cosine:.4f}",
            f"  update norms committed {self.committed_update_norm:.4g}, replayed {self.replayed_update_norm:.4g}",
            "Exact replay is not expected: the swarm averaged its replicas' updates, clipped",
            "their sum and trained with other spans' adapters moving; read this as a distance.",
        ]
        return "\n".join(line[:WIDTH] for line in lines)


def lora_config_of(bundle: Any) -> Any:
    """The LoraConfig whose adapters have `bundle`'s names and shapes (rank from lora_A, alpha from scaling)."""
    from peer.adapters import AdapterStateError, LoraConfig

    targets = sorted({name.rsplit(".", 2)[-2] for name in bundle.tensors})
    ranks = {t.shape[0] for name, t in bundle.tensors.items() if name.endswith(".lora_A")}
    if len(ranks) != 1:
        raise AdapterStateError(f"committed adapters mix ranks {sorted(ranks)}")
    rank = ranks.pop()
    return LoraConfig(rank=rank, alpha=bundle.scaling * rank, targets=tuple(targets))


def distance(
    replayed: Mapping[str, torch.Tensor], committed: Mapping[str, torch.Tensor], parent: Mapping[str, torch.Tensor]
) -> tuple[float, float, float, float]:
    """(relative L2, cosine, committed update norm, replayed update norm) over the names of `committed`."""
    names = sorted(committed)

    def flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].detach().to("cpu", torch.float64).reshape(-1) for n in names])

    r, c, p = flat(replayed), flat(committed), flat(parent)
    committed_update, replayed_update = c - p, r - p
    cn, rn = float(committed_update.norm()), float(replayed_update.norm())
    rel = float((r - c).norm()) / cn if cn > 0 else math.inf
    cos = float(committed_update @ replayed_update) / (cn * rn) if cn > 0 and rn > 0 else 0.0
    return rel, cos, cn, rn


def replay(
    model_dir: Path,
    span: tuple[int, int],
    parent: Any,
    lora: Any,
    examples: Sequence[Any],
    training: Any,
    step_batch: int,
    rehearsal: Any = None,
    rehearsal_texts: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], int]:
    """Trains LoRA adapters on `span` (starting at bundle `parent`) on `examples` (FeedbackExample, commit
    order) through the whole model, as the peers train: each pass's gradient clipped and filed under its
    contributor, one aggregated optimizer step per `step_batch` passes (and one for the rest), and with
    `rehearsal` (a fresh peer.rehearsal.SpanRehearsal; None or weight 0: none) its term on `rehearsal_texts`
    added to every step's aggregate as peer/learning.py adds it. Returns the working tensors and the number
    of steps."""
    from transformers import AutoTokenizer

    from peer.adapters import AdapterSet, AdapterStateError
    from peer.blocks import load_span_layers
    from peer.span import SpanRunner
    from peer.training import AdapterTrainer
    from swarm.client import feedback_tensors
    from swarm.local_head import LocalHead, causal_lm_loss
    from swarm.model_files import load_config

    config = load_config(model_dir)
    n = config.num_hidden_layers
    layers = load_span_layers(model_dir, config, 0, n)
    runner = SpanRunner(config, layers, 0, n)
    head = LocalHead(model_dir, config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapters = AdapterSet(torch.nn.ModuleList(list(layers)[span[0] : span[1]]), span[0], lora)
    if set(adapters.names) != set(parent.tensors):
        raise AdapterStateError("the committed adapters do not name this span's projections")
    with torch.no_grad():
        for name, tensor in adapters.working.items():
            tensor.copy_(parent.tensors[name])
    trainer = AdapterTrainer(adapters, training)
    if rehearsal is not None and rehearsal.weight > 0:
        prepare_rehearsal(rehearsal, runner, head, tokenizer, adapters, span, rehearsal_texts)
        trainer.regularizer = lambda: rehearsal.gradients(adapters, span_forward(runner, span))
    steps = 0
    for example in examples:
        ids, labels = feedback_tensors(tokenizer, example.prompt, example.completion)
        with torch.enable_grad(), adapters.training():
            loss = causal_lm_loss(head.logits(runner.forward(head.embed_tokens(ids))), labels)
            grads = torch.autograd.grad(loss, adapters.parameters())
        trainer.accumulate(example.contributor, dict(zip(adapters.names, grads, strict=True)))
        if trainer.pending_passes >= step_batch:
            steps += trainer.step() is not None
    if trainer.pending_passes:
        steps += trainer.step() is not None
    return adapters.working_state(), steps


def span_forward(runner: Any, span: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The span's blocks of a whole-model SpanRunner: what a peer serving `span` runs (its `_whole_span`)."""
    blocks = range(span[0], span[1])
    return lambda hidden: runner.forward(hidden, blocks=blocks)


def prepare_rehearsal(
    rehearsal: Any,
    runner: Any,
    head: Any,
    tokenizer: Any,
    adapters: Any,
    span: tuple[int, int],
    texts: Sequence[str],
) -> None:
    """Gives `rehearsal` its inputs as a peer of `span` gets them: the texts embedded and run through the blocks
    before the span (here, locally and with no adapters: the replay trains this span's only), then the base
    span's outputs on them (SpanRehearsal.prepare, adapters off)."""
    from peer.rehearsal import rehearsal_batch

    ids, mask = rehearsal_batch(list(texts), tokenizer)
    with torch.no_grad():
        inputs = head.embed_tokens(ids)
        if span[0] > 0:
            inputs = runner.forward(inputs, blocks=range(0, span[0]))
    rehearsal.prepare(inputs, mask, adapters, span_forward(runner, span))


def initial_bundle(lora: Any, model_dir: Path, span: tuple[int, int]) -> Any:
    """Version 0 of `span`'s adapters: every replica's deterministic start (peer/adapters.py seeds A by name)."""
    from peer.adapters import AdapterBundle, AdapterSet
    from peer.blocks import load_span_layers
    from swarm.model_files import load_config

    config = load_config(model_dir)
    adapters = AdapterSet(load_span_layers(model_dir, config, span[0], span[1]), span[0], lora)
    return AdapterBundle(lora.scaling, adapters.state(0).tensors)

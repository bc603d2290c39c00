"""Model lineage on chain: `data-batch` and `adapter-version` records, written by peers and read by anyone.

Writers (`ComputeLedger.commit_data_batch` / `commit_adapter_version`, bodies built here): a peer submits its
record with `System.remark_with_event` from its OWN account (its `--chain-key`), paying the fee from its own
balance; one that cannot pay is refused before anything is submitted (UnknownAccountError,
InsufficientBalanceError), and a body that breaks the format is refused before signing (MalformedRemarkError).

Reader (`LineageIndex`): walks finalized blocks with chain/history.py's RecordScanner (the same rule as every
other kind: a payload counts only when a `System.Remarked` event of its own extrinsic carries its hash).
Invariants of what it lists:
- A record is attributed to the sender of that event, and only when that sender is also the extrinsic's signer
  (no record reaches the index through another account's proxy, multisig or derivative call); the body never
  names its author, so no account can commit in another's name.
- Every listed record passed chain/remarks.py's strict check (a batch's root is the Merkle root of its
  hashes, bounded sizes, no control characters); anything else is skipped with a log line, never raised.
- Records are kept as committed, oldest first. `merged()` joins the commits of one (model, span, version,
  sha256) (union of data roots and replicas, every committer kept); one (model, span, version) committed by
  two different averaging rounds (replica sets) is a fork: each side is listed, marked `fork=True`, never
  silently chosen. Digests one round's replicas commit for its version may differ by float noise (`variants`).
Threats it does not stop: any funded account can commit records (each pays its fee); tools decide whom to
believe (e.g. registered providers only) from `sender`, which is reliable.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chain.account_derivation import address
from chain.history import RecordScanner, ScannedExtrinsic
from chain.merkle import merkle_root
from chain.remarks import MalformedRemarkError, Remark

if TYPE_CHECKING:
    from chain.ledger import ComputeLedger

logger = logging.getLogger(__name__)

Span = tuple[int, int]


@dataclass(frozen=True)
class DataBatch:
    """A `data-batch` record as indexed: `hashes` (feedback content hashes, commit order) have Merkle root `root`."""

    block: int
    sender: str  # SS58 of the committing peer's account
    model: str
    span: Span
    root: bytes
    count: int
    hashes: tuple[bytes, ...]
    extrinsic_hash: str = ""


@dataclass(frozen=True)
class VersionCommit:
    """An `adapter-version` record as indexed: one replica's word that `version` of `span` has these tensors."""

    block: int
    sender: str  # SS58 of the committing peer's account
    model: str
    span: Span
    version: int
    parent: int
    sha256: bytes  # of the adapter tensors (the canonical digest adapter_exchange serves)
    parent_sha256: bytes | None
    data_roots: tuple[bytes, ...]
    replicas: tuple[str, ...]  # peer ids of the averaging round that produced it
    canary_before: Mapping[str, float] = field(default_factory=dict, hash=False)
    canary_after: Mapping[str, float] = field(default_factory=dict, hash=False)
    extrinsic_hash: str = ""


@dataclass(frozen=True)
class MergedVersion:
    """Every commit of one (model, span, version, sha256): data roots and replicas are their union (first-seen
    order); `parent`/`parent_sha256` are the earliest commit's.

    `fork` is True when the same (model, span, version) was also committed by ANOTHER averaging round (a
    different set of replicas): two histories. `variants` counts the digests committed for the version by this
    round's replicas: an all-reduce leaves replicas a few float32 ulps apart, so each may commit its own sha256
    for one round's version; those are variants of one version, not a fork (each is checked against what its
    committer serves by `dllm lineage --verify`)."""

    model: str
    span: Span
    version: int
    sha256: bytes
    parent: int
    parent_sha256: bytes | None
    data_roots: tuple[bytes, ...]
    replicas: tuple[str, ...]
    commits: tuple[VersionCommit, ...]
    fork: bool
    variants: int = 1

    @property
    def first_block(self) -> int:
        return self.commits[0].block

    @property
    def committers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.sender for c in self.commits))


# ---- writing ---------------------------------------------------------------------------------------------------
def _span_body(span: Sequence[int]) -> list[int]:
    return [int(span[0]), int(span[1])] if len(span) == 2 else list(span)


def data_batch_body(model: str, span: Sequence[int], hashes: Sequence[bytes]) -> dict[str, Any]:
    """The `data-batch` body for `hashes` (32-byte content hashes, in commit order); MalformedRemarkError on an
    empty list or a hash that is not 32 bytes."""
    leaves = [bytes(h) for h in hashes]
    try:
        root = merkle_root(leaves)
    except ValueError as exc:
        raise MalformedRemarkError(f"data-batch: {exc}") from exc
    return {
        "model": model,
        "span": _span_body(span),
        "root": root.hex(),
        "count": len(leaves),
        "hashes": [h.hex() for h in leaves],
    }


def adapter_version_body(
    model: str,
    span: Sequence[int],
    version: int,
    parent: int,
    sha256: bytes,
    parent_sha256: bytes | None,
    data_roots: Sequence[bytes],
    replicas: Sequence[str],
    canary_before: Mapping[str, float],
    canary_after: Mapping[str, float],
) -> dict[str, Any]:
    """The `adapter-version` body (checked by chain/remarks.py when encoded)."""
    return {
        "model": model,
        "span": _span_body(span),
        "version": version,
        "parent": parent,
        "sha256": bytes(sha256).hex(),
        "parent_sha256": bytes(parent_sha256).hex() if parent_sha256 is not None else None,
        "data_roots": [bytes(r).hex() for r in data_roots],
        "replicas": list(replicas),
        "canary": {
            "before": {str(k): float(v) for k, v in canary_before.items()},
            "after": {str(k): float(v) for k, v in canary_after.items()},
        },
    }


# ---- reading ---------------------------------------------------------------------------------------------------
class LineageIndex(RecordScanner):
    """Every lineage record on chain from the ledger's start block (see the module docstring for the rules).
    Synchronous, one per thread like the ledger it reads through; `sync()` indexes new finalized blocks."""

    def __init__(self, ledger: ComputeLedger) -> None:
        super().__init__(ledger.substrate, ledger.config.start_block)
        self.ss58_format: int = ledger.ss58_format
        self._batches: list[DataBatch] = []
        self._versions: list[VersionCommit] = []

    def data_batches(self) -> list[DataBatch]:
        return list(self._batches)

    def versions(self) -> list[VersionCommit]:
        return list(self._versions)

    def batches_by_root(self) -> dict[bytes, list[DataBatch]]:
        """Each committed root with every record that committed it (several peers may commit the same batch)."""
        found: dict[bytes, list[DataBatch]] = defaultdict(list)
        for batch in self._batches:
            found[batch.root].append(batch)
        return dict(found)

    def merged(self) -> list[MergedVersion]:
        """One entry per (model, span, version, sha256), ordered by (model, span, version, first block)."""
        groups: dict[tuple[str, Span, int, bytes], list[VersionCommit]] = defaultdict(list)
        for commit in self._versions:
            groups[(commit.model, commit.span, commit.version, commit.sha256)].append(commit)
        sides = self._sides()
        merged = []
        for (model, span, version, sha256), commits in groups.items():
            first = commits[0]
            side, count = sides[(model, span, version)]
            merged.append(
                MergedVersion(
                    model,
                    span,
                    version,
                    sha256,
                    first.parent,
                    first.parent_sha256,
                    tuple(dict.fromkeys(r for c in commits for r in c.data_roots)),
                    tuple(dict.fromkeys(p for c in commits for p in c.replicas)),
                    tuple(commits),
                    count > 1,
                    sum(1 for other in side.values() if other == side[sha256]),
                )
            )
        return sorted(merged, key=lambda m: (m.model, m.span, m.version, m.first_block))

    def _sides(self) -> dict[tuple[str, Span, int], tuple[dict[bytes, int], int]]:
        """Per (model, span, version): each committed sha256's side and the number of sides. Two digests are on one
        side when a commit names both rounds' replica set or both were committed by one round (variants)."""
        by_version: dict[tuple[str, Span, int], list[VersionCommit]] = defaultdict(list)
        for commit in self._versions:
            by_version[(commit.model, commit.span, commit.version)].append(commit)
        result = {}
        for key, commits in by_version.items():
            side = {c.sha256: i for i, c in enumerate(commits)}
            rounds: dict[frozenset[str], bytes] = {}
            for commit in commits:  # join the digests one round's replicas committed
                other = rounds.setdefault(frozenset(commit.replicas), commit.sha256)
                old, new = side[commit.sha256], side[other]
                if old != new:
                    side = {h: new if s == old else s for h, s in side.items()}
            result[key] = (side, len(set(side.values())))
        return result

    def forks(self) -> list[list[MergedVersion]]:
        """Each (model, span, version) committed by more than one averaging round: its sides, earliest first."""
        sides: dict[tuple[str, Span, int], list[MergedVersion]] = defaultdict(list)
        for entry in self.merged():
            if entry.fork:
                sides[(entry.model, entry.span, entry.version)].append(entry)
        return list(sides.values())

    def _apply(self, remark: Remark, sender: bytes, ext: ScannedExtrinsic, block: int, ext_hash: str) -> None:
        if remark.kind not in ("data-batch", "adapter-version"):
            return
        if ext.signer != sender:
            logger.warning("ignoring a %s record not sent by its extrinsic's signer (block %d)", remark.kind, block)
            return
        body, who = remark.body, address(sender, self.ss58_format)
        span = (int(body["span"][0]), int(body["span"][1]))
        if remark.kind == "data-batch":  # body checked by decode_remark, root included
            hashes = tuple(bytes.fromhex(h) for h in body["hashes"])
            self._batches.append(
                DataBatch(block, who, body["model"], span, bytes.fromhex(body["root"]), len(hashes), hashes, ext_hash)
            )
            return
        parent_sha = body["parent_sha256"]
        canary = body["canary"]
        self._versions.append(
            VersionCommit(
                block,
                who,
                body["model"],
                span,
                int(body["version"]),
                int(body["parent"]),
                bytes.fromhex(body["sha256"]),
                bytes.fromhex(parent_sha) if parent_sha is not None else None,
                tuple(bytes.fromhex(r) for r in body["data_roots"]),
                tuple(body["replicas"]),
                {k: float(v) for k, v in canary["before"].items()},
                {k: float(v) for k, v in canary["after"].items()},
                ext_hash,
            )
        )

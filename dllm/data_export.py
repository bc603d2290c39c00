"""`dllm data export --out DIR`: every published feedback example, checked against its commitment on chain.

Reads every `data-batch` and `adapter-version` record (chain/lineage.py) of every model, or of one (`--model`:
a chain shared by several swarms holds their records side by side), asks the swarm's peers for each
committed content hash (`rpc_feedback_fetch`, peer/feedback_store.py) and writes DIR/feedback.jsonl, one line
per example, plus DIR/summary.json (docs/data.md documents both).

Invariants of what is written:
- an example is written only if its content hash is the hash asked for, that hash is listed in a data-batch
  record on chain and proven a member of the record's Merkle root (chain/merkle.py, one proof per listing), its
  contributor's signature verifies (swarm/feedback_records.py) and it names the model its batch was committed
  for; each example is written once, in commit order, with every commitment that lists it and every adapter
  version whose data roots name one of those commitments (the versions it trained into);
- a peer that answers a hash with other bytes is named in the summary (`tampered`) and never believed for that
  hash: the next peer that may hold it is asked. A committed record whose signature does not verify is listed
  as `invalid`, naming the accounts that committed it. A hash no peer serves is listed as `unavailable`
  (evicted, or its holders offline): its commitment stays on chain.
Threats: every peer is untrusted (it may lie, withhold or stall: each request has a timeout and a bounded reply);
the chain's records are believed as chain/lineage.py admits them (the sender is the committing peer's account).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chain.account_derivation import account_id
from chain.lineage import DataBatch, LineageIndex, MergedVersion
from chain.merkle import merkle_proof, verify_proof
from swarm.feedback_records import FeedbackExample, FeedbackRecordError, verify_example

logger = logging.getLogger(__name__)

EXPORT_FILE = "feedback.jsonl"
SUMMARY_FILE = "summary.json"
FETCH_CHUNK = 64
"""Hashes asked of one peer per request."""
REQUEST_TIMEOUT_S = 30.0

PeerFetch = Callable[[str, Sequence[bytes]], Awaitable[Sequence[FeedbackExample]]]
"""Asks one peer (by peer id) for records by content hash; returns what it served (unchecked)."""


@dataclass(frozen=True)
class Listing:
    """One place a content hash is committed: leaf `index` of `batch`."""

    batch: DataBatch
    index: int


@dataclass(frozen=True)
class Tampered:
    """A peer served bytes that do not match the commitment asked for."""

    peer_id: str
    requested: bytes
    reason: str


@dataclass
class FetchOutcome:
    """What the swarm served for the committed hashes, every record checked."""

    examples: dict[bytes, tuple[FeedbackExample, str]] = field(default_factory=dict)  # hash -> (record, served by)
    invalid: dict[bytes, str] = field(default_factory=dict)  # committed hash -> why its record is refused
    unavailable: list[bytes] = field(default_factory=list)  # committed, served by no peer
    tampered: list[Tampered] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)  # peers asked, in order

    @property
    def tampering_peers(self) -> list[str]:
        return list(dict.fromkeys(t.peer_id for t in self.tampered))


def listings(batches: Iterable[DataBatch]) -> dict[bytes, list[Listing]]:
    """Every committed content hash with its listings, in commit order (block, then position in the batch)."""
    found: dict[bytes, list[Listing]] = {}
    for batch in sorted(batches, key=lambda b: b.block):
        for index, content_hash in enumerate(batch.hashes):
            found.setdefault(content_hash, []).append(Listing(batch, index))
    return found


def check_served(content_hash: bytes, record: FeedbackExample, places: Sequence[Listing]) -> str | None:
    """Why a record whose hash IS `content_hash` may not be written (None: it may): bad signature or fields, a
    listing that is no member of its batch's root, another model than the batch's."""
    try:
        verify_example(record)
    except FeedbackRecordError as error:
        return str(error)
    for place in places:
        if not verify_proof(content_hash, merkle_proof(list(place.batch.hashes), place.index), place.batch.root):
            return f"not a member of batch {place.batch.root.hex()[:16]}… (block {place.batch.block})"
        if record.model != place.batch.model:
            return f"names model {record.model!r}, committed for {place.batch.model!r}"
    return None


async def fetch_committed(
    wanted: dict[bytes, list[Listing]],
    peers: Sequence[str],
    fetch: PeerFetch,
    *,
    timeout_s: float = REQUEST_TIMEOUT_S,
    progress: Callable[[int], None] | None = None,
) -> FetchOutcome:
    """Asks every one of `peers`, in order, for every hash of `wanted`: the first copy that checks out is kept, and
    every peer serving other bytes for a committed hash is named, even after an honest peer served it (an audit,
    not just a download: a swarm's few peers each answer one request per FETCH_CHUNK hashes).
    `progress(1)` is called after each peer."""
    outcome = FetchOutcome()
    hashes = list(wanted)
    for peer_id in peers:
        outcome.asked.append(peer_id)
        for start in range(0, len(hashes), FETCH_CHUNK):
            chunk = hashes[start : start + FETCH_CHUNK]
            try:
                served = await asyncio.wait_for(fetch(peer_id, chunk), timeout_s)
            except Exception as error:  # one peer failing (refusal, timeout, garbage) leaves the others to ask
                logger.info("peer %s served no feedback records: %s: %s", peer_id, type(error).__name__, error)
                break
            _sort_reply(peer_id, chunk, served, wanted, outcome)
        if progress is not None:
            progress(1)
    outcome.unavailable = [h for h in hashes if h not in outcome.examples and h not in outcome.invalid]
    return outcome


def _sort_reply(
    peer_id: str,
    asked: Sequence[bytes],
    served: Sequence[FeedbackExample],
    wanted: dict[bytes, list[Listing]],
    outcome: FetchOutcome,
) -> None:
    """Files each served record: accepted, refused as invalid, or the peer named as tampering."""
    asked_set = set(asked)
    hashed: list[tuple[FeedbackExample, bytes | None, str]] = []
    for record in served:
        try:
            hashed.append((record, record.content_hash(), ""))
        except FeedbackRecordError as error:
            hashed.append((record, None, f"served an unencodable record: {error}"))
    answered = {h for _, h, _ in hashed if h in asked_set}
    # A changed record hashes to nothing asked for; it stands for the one hash left unanswered, if just one.
    left = [h for h in asked if h not in answered]
    claimed = left[0] if len(left) == 1 else b""
    for record, content_hash, problem in hashed:
        if content_hash is None or content_hash not in asked_set:
            reason = problem or f"served a record hashing to {(content_hash or b'').hex()[:16]}…, not the commit"
            outcome.tampered.append(Tampered(peer_id, claimed, reason))
            continue
        if content_hash in outcome.examples or content_hash in outcome.invalid:
            continue
        why = check_served(content_hash, record, wanted[content_hash])
        if why is None:
            outcome.examples[content_hash] = (record, peer_id)
        else:
            outcome.invalid[content_hash] = why


def peer_order(records: Sequence[Any], committers: Iterable[str]) -> list[str]:
    """Peer ids to ask, best first: peers whose chain account committed batches, then learning peers, then the
    rest (any peer may hold replicated data). `records` are swarm.records.ServerRecord."""
    committed = {_account(a) for a in committers} - {None}

    def rank(record: Any) -> tuple[bool, bool]:
        return (_account(record.chain_account) not in committed, not record.learning)

    return list(dict.fromkeys(r.peer_id for r in sorted(records, key=rank)))


def _account(address: str | None) -> bytes | None:
    try:
        return account_id(address) if address else None
    except ValueError:
        return None


def provenance_line(
    content_hash: bytes, record: FeedbackExample, served_by: str, places: Sequence[Listing], trained: Sequence[Any]
) -> dict[str, Any]:
    """One line of feedback.jsonl: the record exactly as signed, its provenance and the versions it trained."""
    first = places[0].batch
    return {
        "hash": content_hash.hex(),
        "example": record.to_json(),
        "provenance": {
            "contributor": record.contributor,
            "block": first.block,
            "batch_root": first.root.hex(),
            "committed_by": first.sender,
            "commitments": [
                {
                    "block": p.batch.block,
                    "batch_root": p.batch.root.hex(),
                    "index": p.index,
                    "span": list(p.batch.span),
                    "committed_by": p.batch.sender,
                }
                for p in places
            ],
            "served_by": served_by,
            "versions": [
                {"span": list(v.span), "version": v.version, "sha256": v.sha256.hex(), "block": v.first_block}
                for v in trained
            ],
        },
    }


def versions_trained(places: Sequence[Listing], versions: Sequence[MergedVersion]) -> list[MergedVersion]:
    """The adapter versions whose data roots name one of the batches listing an example."""
    roots = {p.batch.root for p in places}
    return [v for v in versions if roots.intersection(v.data_roots)]


@dataclass
class ExportReport:
    """What an export wrote and found (also DIR/summary.json)."""

    out: Path
    batches: int
    committed: int
    written: int
    versions: int
    outcome: FetchOutcome
    invalid_committers: dict[bytes, list[str]]
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> committed/written/unavailable
    model: str | None = None  # the one model exported (None: every model on chain)
    other_models: list[str] = field(default_factory=list)  # with `model`: the models on chain left out

    def summary(self) -> dict[str, Any]:
        o = self.outcome
        return {
            "exported_at": time.time(),
            "model": self.model,
            "models": self.per_model,
            "other_models": self.other_models,
            "batches": self.batches,
            "versions": self.versions,
            "committed_examples": self.committed,
            "written": self.written,
            "peers_asked": o.asked,
            "tampered": [
                {"peer_id": t.peer_id, "hash": t.requested.hex() or None, "reason": t.reason} for t in o.tampered
            ],
            "tampering_peers": o.tampering_peers,
            "invalid": [
                {"hash": h.hex(), "reason": why, "committed_by": self.invalid_committers[h]}
                for h, why in o.invalid.items()
            ],
            "unavailable": [h.hex() for h in o.unavailable],
        }


def write_export(
    out: Path,
    wanted: dict[bytes, list[Listing]],
    outcome: FetchOutcome,
    versions: Sequence[MergedVersion],
    model: str | None = None,
    other_models: Sequence[str] = (),
) -> ExportReport:
    """Writes DIR/feedback.jsonl (accepted records, commit order) and DIR/summary.json (counts per model)."""
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out / EXPORT_FILE, "w", encoding="utf-8") as jsonl:
        for content_hash, places in wanted.items():
            served = outcome.examples.get(content_hash)
            if served is None:
                continue
            line = provenance_line(content_hash, served[0], served[1], places, versions_trained(places, versions))
            jsonl.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
            written += 1
    invalid_committers = {h: list(dict.fromkeys(p.batch.sender for p in wanted[h])) for h in outcome.invalid}
    per_model: dict[str, dict[str, int]] = {}
    unavailable = set(outcome.unavailable)
    for content_hash, places in wanted.items():
        counts = per_model.setdefault(places[0].batch.model, {"committed": 0, "written": 0, "unavailable": 0})
        counts["committed"] += 1
        counts["written"] += content_hash in outcome.examples
        counts["unavailable"] += content_hash in unavailable
    report = ExportReport(
        out,
        batches=len({id(p.batch) for places in wanted.values() for p in places}),
        committed=len(wanted),
        written=written,
        versions=len(versions),
        outcome=outcome,
        invalid_committers=invalid_committers,
        per_model=dict(sorted(per_model.items())),
        model=model,
        other_models=list(other_models),
    )
    (out / SUMMARY_FILE).write_text(json.dumps(report.summary(), indent=2, sort_keys=True) + "\n")
    return report


def of_model(
    batches: Sequence[DataBatch], versions: Sequence[MergedVersion], model: str | None
) -> tuple[list[DataBatch], list[MergedVersion]]:
    """The records committed for `model` (None: every model's). A chain may be shared by swarms of other models;
    their records never mix into one model's export or lineage."""
    if model is None:
        return list(batches), list(versions)
    return [b for b in batches if b.model == model], [v for v in versions if v.model == model]


def models_of(batches: Iterable[DataBatch], versions: Iterable[MergedVersion]) -> list[str]:
    """The model names the records were committed for, sorted."""
    return sorted({b.model for b in batches} | {v.model for v in versions})


def read_lineage(chain_url: str) -> tuple[list[DataBatch], list[MergedVersion]]:
    """Every data-batch record and every merged adapter version on the chain at `chain_url`, of every model."""
    from chain.ledger import ComputeLedger

    with ComputeLedger(chain_url) as ledger:
        index = LineageIndex(ledger)
        index.sync()
        return index.data_batches(), index.merged()


async def swarm_peers(dht: Any, models: Iterable[str]) -> list[Any]:
    """The DHT's server records (swarm.records.ServerRecord) of every peer serving one of `models`."""
    from swarm.records import fetch_model_records

    found = []
    for model in dict.fromkeys(models):
        found += await fetch_model_records(dht, model)
    return found


def p2p_fetch(p2p: Any, timeout_s: float = REQUEST_TIMEOUT_S) -> PeerFetch:
    """A PeerFetch over the swarm's `rpc_feedback_fetch` (peer/feedback_store.py's client side)."""
    from peer.feedback_store import fetch_feedback

    async def fetch(peer_id: str, hashes: Sequence[bytes]) -> Sequence[FeedbackExample]:
        served: Sequence[FeedbackExample] = await fetch_feedback(p2p, peer_id, list(hashes), timeout_s=timeout_s)
        return served

    return fetch


async def export_dataset(
    initial_peers: list[str],
    chain_url: str,
    out: Path,
    *,
    model: str | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> ExportReport:
    """The whole export: chain records (of `model` only, if given), every committed hash fetched from the swarm
    and checked, files written. `progress(hashes, peers)` may return a callback advanced once per peer asked."""
    from swarm.dht import start_dht

    every_batch, every_version = await asyncio.to_thread(read_lineage, chain_url)
    batches, versions = of_model(every_batch, every_version, model)
    others = [m for m in models_of(every_batch, every_version) if m != model] if model is not None else []
    wanted = listings(batches)
    dht, _ = await asyncio.to_thread(start_dht, initial_peers, client_mode=True)
    try:
        p2p = await dht.replicate_p2p()
        try:
            records = await swarm_peers(dht, (b.model for b in batches))
            order = peer_order(records, (b.sender for b in batches))
            advance = progress(len(wanted), len(order)) if progress is not None else None
            outcome = await fetch_committed(wanted, order, p2p_fetch(p2p), progress=advance)
        finally:
            await p2p.shutdown()
    finally:
        await asyncio.to_thread(dht.shutdown)
    return await asyncio.to_thread(write_export, out, wanted, outcome, versions, model, others)

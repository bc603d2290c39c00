"""A peer's published feedback: durable storage, serving by hash, replication and on-chain batch commitments.

Every feedback example a peer trains on, and every inference prompt a client opted to share with it, is a signed
FeedbackExample (swarm/feedback_records.py). The peer keeps it in an SQLite file under its data dir
(`--data-dir`), serves it by content hash (`dllm.v1.feedback_fetch`, anyone may ask), pushes it to another peer
of the model (`dllm.v1.feedback_push`: the receiver verifies every record and keeps a copy) and commits the
hashes on chain in `data-batch` records (chain/lineage.py; a Merkle root per batch, chain/merkle.py) from its
own chain key, when `batch_size` examples accumulate and whenever `flush_batch` is called (before a version
commit, and periodically).

Invariants:
- a record is stored only after its signature and fields verified (the caller, or push/share here, checks);
  the store returns what it holds, unchanged: whoever fetches re-verifies (dllm/data_export.py does);
- the stored bytes stay within `budget_bytes` (`--data-budget`). Eviction, oldest first, takes only records
  another holder vouches for: copies replicated here for another peer, and this peer's own records that are
  both committed on chain and replicated to another peer. A record of its own not yet committed or not yet
  replicated is never evicted; with nothing evictable, a new record is refused (FeedbackStoreFullError, wire
  kind `feedback_store_full`), so a training pass is refused before compute rather than trained on unpublished;
- uncommitted shared prompts may fill at most half the budget, so opted-in prompts never take the room
  training needs; an evicted record's commitment stays on chain (export then lists it as unavailable).
Threats: a pushed or shared record costs its sender nothing but a signature from a free account, so a flood
can push out older evictable copies (bounded by the budget; the records' own peers still hold theirs until
committed and replicated); a peer may serve altered text, which the content hash and signature expose
(the fetcher names it). Table `examples` holds the canonical JSON of each record in column `record`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from swarm import protocol, wire_errors
from swarm.feedback_records import (
    FeedbackExample,
    FeedbackRecordError,
    FeedbackStoreFullError,
    example_from_wire,
)
from swarm.protocol import ProtocolError

if TYPE_CHECKING:
    from substrateinterface import Keypair

    from chain.ledger import ComputeLedger

logger = logging.getLogger(__name__)

MAX_HASHES_PER_FETCH = 64
"""Records one fetch or push carries (64 x 16 KiB stays well under hivemind's 4 MiB unary message)."""
MAX_BATCH_HASHES = 256
"""Hashes per data-batch record (chain/remarks.py caps it at this)."""
PUBLISH_PERIOD_S = 300.0
"""Records below a batch's worth are committed and replicated at least this often."""
_HASH_BYTES = 32

BatchCommitter = Callable[[str, tuple[int, int], list[bytes]], int]
"""Commits (model, span, hashes) as one data-batch record on chain; returns the block number."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hash BLOB NOT NULL UNIQUE,
    record TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    kind TEXT NOT NULL,
    origin TEXT NOT NULL,            -- 'trained' | 'shared': this peer's own; 'replica': a copy for another peer
    span_start INTEGER NOT NULL,
    span_end INTEGER NOT NULL,
    live_version INTEGER NOT NULL,
    added_at REAL NOT NULL,
    batch_root BLOB,                 -- the data-batch it was committed in (own records)
    replicated INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batches (
    root BLOB PRIMARY KEY,
    span_start INTEGER NOT NULL,
    span_end INTEGER NOT NULL,
    count INTEGER NOT NULL,
    max_version INTEGER NOT NULL,
    kind TEXT NOT NULL,              -- one kind per batch: 'feedback' (trained on) or 'shared-prompt'
    block INTEGER NOT NULL,
    committed_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class StoreStats:
    """What rpc_info shows of a peer's store."""

    records: int
    bytes: int
    budget_bytes: int
    uncommitted: int
    unreplicated: int
    batches: int
    evicted: int

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


class FeedbackStore:
    """One per peer process, an SQLite file under the peer's data dir; thread-safe (one connection, one lock).

    The file is created on the first record: a peer that never receives feedback writes nothing."""

    def __init__(
        self,
        path: Path,
        model: str,
        budget_bytes: int,
        batch_size: int = 32,
        committer: BatchCommitter | None = None,
        no_commit_reason: str = "no --chain-key",
    ) -> None:
        self.path = Path(path)
        self.model = model
        self.budget_bytes = budget_bytes
        self.batch_size = batch_size
        self.committer = committer
        self.no_commit_reason = no_commit_reason
        self.evicted = 0
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._warned_no_commit = False
        # called (from the flushing thread) after a flush committed batches: the peer replicates them then
        self.after_flush: Callable[[], None] | None = None

    # ---- storage -------------------------------------------------------------------------------------------
    def _conn(self, create: bool = True) -> sqlite3.Connection | None:
        if self._db is None:
            if not create and not self.path.exists():
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def add(self, example: FeedbackExample, span: tuple[int, int], live_version: int, origin: str = "trained") -> bool:
        """Keeps a verified record as this peer's own (`origin` "trained" or "shared"); False if it had it.
        Raises FeedbackStoreFullError when the budget has no room and nothing may be evicted."""
        if origin not in ("trained", "shared"):
            raise ValueError(f"origin must be 'trained' or 'shared', got {origin!r}")
        return self._insert(example, span, live_version, origin)

    def add_replica(self, example: FeedbackExample, span: tuple[int, int]) -> bool:
        """Keeps a verified copy of another peer's record (evictable); False if it had it."""
        return self._insert(example, span, -1, "replica")

    def _insert(self, example: FeedbackExample, span: tuple[int, int], live_version: int, origin: str) -> bool:
        record = example.canonical_bytes()
        content_hash = example.content_hash()
        with self._lock:
            db = self._conn()
            assert db is not None
            row = db.execute("SELECT origin FROM examples WHERE hash = ?", (content_hash,)).fetchone()
            if row is not None:
                if row[0] == "replica" and origin != "replica":  # a copy we held becomes our own to commit
                    db.execute(
                        "UPDATE examples SET origin = ?, live_version = ?, span_start = ?, span_end = ? WHERE hash = ?",
                        (origin, live_version, span[0], span[1], content_hash),
                    )
                return False
            if origin == "shared":
                self._check_shared_room(db, len(record))
            self._make_room(db, len(record))
            db.execute(
                "INSERT INTO examples (hash, record, bytes, kind, origin, span_start, span_end, live_version,"
                " added_at, replicated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    content_hash,
                    record.decode(),
                    len(record),
                    example.kind,
                    origin,
                    span[0],
                    span[1],
                    live_version,
                    time.time(),
                    1 if origin == "replica" else 0,
                ),
            )
            return True

    def _used(self, db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM examples").fetchone()[0])

    def _check_shared_room(self, db: sqlite3.Connection, size: int) -> None:
        shared = db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM examples WHERE origin = 'shared' AND batch_root IS NULL"
        ).fetchone()[0]
        if shared + size > self.budget_bytes // 2:
            raise FeedbackStoreFullError(
                f"this peer holds {shared} bytes of shared prompts not yet committed on chain: at most half its "
                f"data budget ({self.budget_bytes} bytes) may wait; try another peer or later"
            )

    def _make_room(self, db: sqlite3.Connection, size: int) -> None:
        """Evicts oldest-first among records another holder vouches for until `size` more bytes fit."""
        used = self._used(db)
        if used + size <= self.budget_bytes:
            return
        evictable = db.execute(
            "SELECT seq, bytes FROM examples WHERE origin = 'replica' OR (batch_root IS NOT NULL AND replicated = 1)"
            " ORDER BY seq"
        ).fetchall()
        chosen: list[int] = []
        for seq, nbytes in evictable:
            if used + size <= self.budget_bytes:
                break
            chosen.append(seq)
            used -= nbytes
        if used + size > self.budget_bytes:
            raise FeedbackStoreFullError(
                f"this peer's feedback store is full ({self._used(db)} of {self.budget_bytes} bytes, --data-budget) "
                "and holds nothing it may evict yet: its records are not all committed on chain and replicated; "
                "new feedback is refused until they are"
            )
        db.executemany("DELETE FROM examples WHERE seq = ?", [(seq,) for seq in chosen])
        self.evicted += len(chosen)
        logger.info("feedback store: evicted %d committed and replicated record(s) to fit %d bytes", len(chosen), size)

    def has_room(self, example: FeedbackExample) -> bool:
        """Whether `example` would be stored now (held already, room, or room after eviction)."""
        size = len(example.canonical_bytes())
        with self._lock:
            db = self._conn(create=False)
            if db is None:
                return size <= self.budget_bytes
            if db.execute("SELECT 1 FROM examples WHERE hash = ?", (example.content_hash(),)).fetchone():
                return True
            evictable = db.execute(
                "SELECT COALESCE(SUM(bytes), 0) FROM examples"
                " WHERE origin = 'replica' OR (batch_root IS NOT NULL AND replicated = 1)"
            ).fetchone()[0]
            return bool(self._used(db) - evictable + size <= self.budget_bytes)

    def get(self, hashes: Sequence[bytes]) -> dict[bytes, FeedbackExample]:
        """The records held among `hashes` (absent: not held), as stored."""
        found: dict[bytes, FeedbackExample] = {}
        with self._lock:
            db = self._conn(create=False)
            if db is None:
                return found
            for content_hash in dict.fromkeys(hashes):
                row = db.execute("SELECT record FROM examples WHERE hash = ?", (content_hash,)).fetchone()
                if row is None:
                    continue
                try:
                    found[content_hash] = FeedbackExample.from_json(json.loads(row[0]))
                except (FeedbackRecordError, ValueError) as e:  # a damaged row: not served
                    logger.warning("feedback store: record %s is unreadable: %s", content_hash.hex(), e)
        return found

    def pending_count(self) -> int:
        """Own records not yet committed on chain, or not yet replicated to another peer."""
        with self._lock:
            db = self._conn(create=False)
            if db is None:
                return 0
            return int(
                db.execute(
                    "SELECT COUNT(*) FROM examples WHERE origin != 'replica' AND (batch_root IS NULL OR replicated = 0)"
                ).fetchone()[0]
            )

    # ---- commitments ---------------------------------------------------------------------------------------
    def flush_batch(self) -> list[bytes]:
        """Commits every uncommitted own record as data-batch record(s) on chain (<= 256 hashes each, per span
        and kind, in the order stored); returns the new roots. No chain key: returns [] and logs why. A failed commit is
        logged and leaves its records uncommitted for the next flush."""
        from chain.merkle import merkle_root

        roots: list[bytes] = []
        with self._lock:
            db = self._conn(create=False)
            if db is None:
                return roots
            rows = db.execute(
                "SELECT hash, span_start, span_end, kind, live_version FROM examples"
                " WHERE origin != 'replica' AND batch_root IS NULL ORDER BY seq"
            ).fetchall()
            if not rows:
                return roots
            if self.committer is None:
                if not self._warned_no_commit:
                    logger.warning(
                        "feedback store: %d record(s) not committed on chain (%s)", len(rows), self.no_commit_reason
                    )
                    self._warned_no_commit = True
                return roots
            groups: dict[tuple[int, int, str], list[tuple[bytes, int]]] = {}
            for content_hash, start, end, kind, version in rows:
                groups.setdefault((start, end, kind), []).append((content_hash, version))
            for (start, end, kind), entries in groups.items():
                span = (start, end)
                for first in range(0, len(entries), MAX_BATCH_HASHES):
                    chunk = entries[first : first + MAX_BATCH_HASHES]
                    hashes = [h for h, _ in chunk]
                    root = merkle_root(hashes)
                    try:
                        block = self.committer(self.model, span, hashes)
                    except Exception as e:  # the chain refused or is away: the records wait for the next flush
                        logger.warning("feedback store: committing a batch of %d failed: %s", len(hashes), e)
                        return roots
                    db.execute(
                        "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (root, start, end, len(hashes), max(v for _, v in chunk), kind, block, time.time()),
                    )
                    db.executemany("UPDATE examples SET batch_root = ? WHERE hash = ?", [(root, h) for h in hashes])
                    logger.info(
                        "feedback store: committed %d record(s), root %s, block %d", len(hashes), root.hex(), block
                    )
                    roots.append(root)
        if roots and self.after_flush is not None:
            self.after_flush()
        return roots

    def roots_since(self, version: int) -> list[bytes]:
        """Roots of committed batches of feedback trained while the live version was >= `version` (shared prompts,
        never trained on, are in batches of their own and not listed)."""
        with self._lock:
            db = self._conn(create=False)
            if db is None:
                return []
            rows = db.execute(
                "SELECT root FROM batches WHERE kind = 'feedback' AND max_version >= ? ORDER BY committed_at, rowid",
                (version,),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    # ---- replication ---------------------------------------------------------------------------------------
    def unreplicated(self, limit: int = MAX_HASHES_PER_FETCH) -> list[FeedbackExample]:
        """Own records not yet replicated to another peer, oldest first."""
        with self._lock:
            db = self._conn(create=False)
            if db is None:
                return []
            rows = db.execute(
                "SELECT record FROM examples WHERE origin != 'replica' AND replicated = 0 ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [FeedbackExample.from_json(json.loads(r[0])) for r in rows]

    def mark_replicated(self, hashes: Sequence[bytes]) -> None:
        with self._lock:
            db = self._conn(create=False)
            if db is not None:
                db.executemany("UPDATE examples SET replicated = 1 WHERE hash = ?", [(h,) for h in hashes])

    def stats(self) -> StoreStats:
        with self._lock:
            db = self._conn(create=False)
            if db is None:
                return StoreStats(0, 0, self.budget_bytes, 0, 0, 0, self.evicted)
            records, used = db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM examples").fetchone()
            own = "origin != 'replica'"
            uncommitted = db.execute(f"SELECT COUNT(*) FROM examples WHERE {own} AND batch_root IS NULL").fetchone()
            unreplicated = db.execute(f"SELECT COUNT(*) FROM examples WHERE {own} AND replicated = 0").fetchone()
            batches = db.execute("SELECT COUNT(*) FROM batches").fetchone()
        return StoreStats(
            int(records), int(used), self.budget_bytes, uncommitted[0], unreplicated[0], batches[0], self.evicted
        )


def ledger_committer(ledger: ComputeLedger, keypair: Keypair, chain_lock: threading.Lock) -> BatchCommitter:
    """A BatchCommitter writing `data-batch` records from the peer's own chain key (paid from its balance), over
    the peer's one chain connection and under its lock (one account's extrinsics never race for a nonce)."""

    def commit(model: str, span: tuple[int, int], hashes: list[bytes]) -> int:
        with chain_lock:
            return ledger.commit_data_batch(keypair, model, span, hashes).block_number

    return commit


# ---- wire ----------------------------------------------------------------------------------------------------
def _hashes_field(metadata: dict[str, Any]) -> list[bytes]:
    hashes = metadata.get("hashes")
    if not isinstance(hashes, list) or not 0 < len(hashes) <= MAX_HASHES_PER_FETCH:
        raise ProtocolError(f"'hashes' must be a list of 1..{MAX_HASHES_PER_FETCH} content hashes")
    if not all(isinstance(h, bytes) and len(h) == _HASH_BYTES for h in hashes):
        raise ProtocolError("each hash must be 32 bytes (a FeedbackExample content hash)")
    return hashes


def _records_field(metadata: dict[str, Any], model: str) -> list[FeedbackExample]:
    records = metadata.get("examples")
    if not isinstance(records, list) or not 0 < len(records) <= MAX_HASHES_PER_FETCH:
        raise ProtocolError(f"'examples' must be a list of 1..{MAX_HASHES_PER_FETCH} feedback records")
    examples = [example_from_wire(r) for r in records]  # every record verified before any is stored
    for example in examples:
        if example.model != model:
            raise FeedbackRecordError(f"a feedback record of model {example.model!r}: this peer serves {model!r}")
    return examples


async def fetch_feedback(
    p2p: P2P, peer_id: str, hashes: Sequence[bytes], timeout_s: float = 30.0
) -> list[FeedbackExample]:
    """Asks `peer_id` for records by content hash; returns what it served, parsed but NOT verified (the caller
    checks each against its hash and signature). Raises RemotePeerError for an error reply or a bad one."""
    records: list[FeedbackExample] = []
    for first in range(0, len(hashes), MAX_HASHES_PER_FETCH):
        reply = await _call(
            p2p,
            peer_id,
            protocol.HANDLER_FEEDBACK_FETCH,
            {"hashes": list(hashes[first : first + MAX_HASHES_PER_FETCH])},
            timeout_s,
        )
        served = reply.get("examples")
        if not isinstance(served, list):
            raise protocol.RemotePeerError("malformed feedback_fetch reply: no 'examples' list", peer_id)
        for record in served:
            try:
                records.append(FeedbackExample.from_json(record))
            except FeedbackRecordError as e:
                raise protocol.RemotePeerError(f"served a malformed feedback record: {e}", peer_id) from None
    return records


async def push_feedback(p2p: P2P, peer_id: str, examples: Sequence[FeedbackExample], timeout_s: float = 30.0) -> int:
    """Replicates `examples` to `peer_id` (<= MAX_HASHES_PER_FETCH per call); returns how many it newly stored."""
    reply = await _call(
        p2p, peer_id, protocol.HANDLER_FEEDBACK_PUSH, {"examples": [e.to_json() for e in examples]}, timeout_s
    )
    stored = reply.get("stored")
    return stored if isinstance(stored, int) else 0


async def _call(p2p: P2P, peer_id: str, handler: str, metadata: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    request = runtime_pb2.ExpertRequest(metadata=protocol.pack_metadata(metadata))
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(PeerID.from_base58(peer_id), handler, request, runtime_pb2.ExpertResponse),
            timeout_s,
        )
    except protocol.CALL_FAILURES as e:
        raise protocol.HopFailedError(f"{type(e).__name__}: {e}", peer_id) from e
    reply = protocol.unpack_metadata(response.metadata)
    wire_errors.raise_if_error(reply, peer_id)
    return reply


class FeedbackPublisher:
    """A peer's side of publication: its RPCs (fetch, push, share), and committing + replicating its records."""

    def __init__(
        self,
        store: FeedbackStore,
        span: tuple[int, int],
        live_version: Callable[[], int],
        request_timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.span = span
        self.live_version = live_version
        self.request_timeout_s = request_timeout_s
        self.replicated_to: dict[str, int] = {}  # peer id -> records it newly stored from us
        self._p2p: P2P | None = None
        self._dht: Any = None
        self._publishing: asyncio.Task[None] | None = None
        self._replicating: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def add_handlers(self, p2p: P2P, dht: Any) -> None:
        self._p2p, self._dht = p2p, dht
        loop = asyncio.get_running_loop()
        # a flush from elsewhere (a version commit's worker thread) is followed by replication here

        def after_flush() -> None:
            loop.call_soon_threadsafe(self._replicate_soon)

        self.store.after_flush = after_flush
        for name, handler in (
            (protocol.HANDLER_FEEDBACK_FETCH, self.rpc_feedback_fetch),
            (protocol.HANDLER_FEEDBACK_PUSH, self.rpc_feedback_push),
            (protocol.HANDLER_FEEDBACK_SHARE, self.rpc_feedback_share),
        ):
            await p2p.add_protobuf_handler(name, handler, runtime_pb2.ExpertRequest)

    # ---- RPCs ----------------------------------------------------------------------------------------------
    async def rpc_feedback_fetch(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Records by content hash: {"examples": [held records], "missing": [hashes not held here]}."""
        try:
            hashes = _hashes_field(protocol.unpack_metadata(request.metadata))
            found = await asyncio.to_thread(self.store.get, hashes)
            reply = {
                "examples": [e.to_json() for e in found.values()],
                "missing": [h for h in hashes if h not in found],
            }
            return runtime_pb2.ExpertResponse(metadata=protocol.pack_metadata(reply))
        except Exception as e:  # an RPC boundary: any failure becomes an error reply, the peer serves on
            return wire_errors.reply_for(e, "feedback fetch", logger)

    async def rpc_feedback_push(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Another peer's new records: each verified, then kept as an (evictable) copy."""
        try:
            examples = _records_field(protocol.unpack_metadata(request.metadata), self.store.model)

            def keep() -> int:
                return sum(self.store.add_replica(e, self.span) for e in examples)

            stored = await asyncio.to_thread(keep)
            reply = {"stored": stored, "had": len(examples) - stored}
            return runtime_pb2.ExpertResponse(metadata=protocol.pack_metadata(reply))
        except Exception as e:  # an RPC boundary: any failure becomes an error reply, the peer serves on
            return wire_errors.reply_for(e, "feedback push", logger)

    async def rpc_feedback_share(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """A client's opted-in inference prompt (kind "shared-prompt"): verified, stored, published; not trained on."""
        try:
            example = example_from_wire(protocol.unpack_metadata(request.metadata).get("example"))
            if example.kind != "shared-prompt":
                raise FeedbackRecordError("dllm.v1.feedback_share takes records of kind 'shared-prompt'")
            if example.model != self.store.model:
                raise FeedbackRecordError(f"a record of model {example.model!r}: this peer serves {self.store.model!r}")
            added = await self.add(example, origin="shared")
            reply = {"stored": added, "hash": example.content_hash()}
            return runtime_pb2.ExpertResponse(metadata=protocol.pack_metadata(reply))
        except Exception as e:  # an RPC boundary: any failure becomes an error reply, the peer serves on
            return wire_errors.reply_for(e, "feedback share", logger)

    # ---- publication ---------------------------------------------------------------------------------------
    async def add(self, example: FeedbackExample, origin: str = "trained") -> bool:
        """Stores a verified record of this peer's own; publishes once a batch's worth is pending."""
        added = await asyncio.to_thread(self.store.add, example, self.span, self.live_version(), origin)
        if self.store.pending_count() >= self.store.batch_size:
            self.publish_soon()
        return added

    def _replicate_soon(self) -> None:
        if self._replicating is None or self._replicating.done():
            self._replicating = asyncio.create_task(self._replicate_logged())

    async def _replicate_logged(self) -> None:
        async with self._lock:
            try:
                await self.replicate()
            except Exception as e:  # retried on the next batch or period
                logger.warning("replicating feedback failed: %s", e)

    def publish_soon(self) -> None:
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.create_task(self.publish())

    async def publish(self) -> None:
        """Commits pending records on chain (if this peer has a chain key) and replicates them to another peer."""
        async with self._lock:
            try:
                await asyncio.to_thread(self.store.flush_batch)
                await self.replicate()
            except Exception as e:  # publication is retried on the next batch or period; serving goes on
                logger.warning("publishing feedback failed: %s", e)

    async def replicate(self) -> int:
        """Pushes unreplicated own records to the first other peer of the model that takes them (learning
        replicas of this span first); returns how many were replicated."""
        if self._p2p is None or self._dht is None:
            return 0
        done = 0
        while examples := await asyncio.to_thread(self.store.unreplicated):
            target = None
            for peer_id in await self._targets():
                try:
                    stored = await push_feedback(self._p2p, peer_id, examples, self.request_timeout_s)
                except protocol.RemotePeerError as e:
                    logger.info("replicating feedback to %s failed: %s", peer_id, e)
                    continue
                self.replicated_to[peer_id] = self.replicated_to.get(peer_id, 0) + stored
                target = peer_id
                break
            if target is None:
                logger.info("no other peer took %d feedback record(s); replication retried later", len(examples))
                return done
            await asyncio.to_thread(self.store.mark_replicated, [e.content_hash() for e in examples])
            done += len(examples)
        return done

    async def _targets(self) -> list[str]:
        from swarm.records import fetch_model_records

        assert self._p2p is not None
        me = self._p2p.peer_id.to_base58()
        records = [r for r in await fetch_model_records(self._dht, self.store.model) if r.peer_id != me]
        records.sort(key=lambda r: (not r.learning, (r.start, r.end) != self.span))
        return list(dict.fromkeys(r.peer_id for r in records))

    async def close(self) -> None:
        """Cancels a publication in flight (pending records stay stored for the next start)."""
        self.store.after_flush = None
        for task in (self._publishing, self._replicating):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def run_periodically(self, period_s: float = PUBLISH_PERIOD_S) -> None:
        """Publishes whatever is pending every `period_s` until cancelled."""
        while True:
            await asyncio.sleep(period_s)
            if self.store.pending_count():
                await self.publish()

"""Evidence of spot checks, content-addressed and persisted: what a slash cites and anyone can re-check.

An `Evidence` is a set of work samples and the signed verdicts on them. Its hash is SHA-256 of its
canonical encoding (a msgpack array: tag, the encoded samples sorted by their blake2b sample hash,
the encoded signed verdicts sorted by verdict id), so equal evidence has one hash whoever builds it,
and the hash names the content and nothing else. Decoding accepts only that canonical byte string and
requires every verdict to judge a sample in the set, every sample to be judged, and one provider.

`EvidenceStore` is a verifier's SQLite file (WAL, synchronous=FULL): the samples it checked (by sample
hash), the verdicts it issued or received (by verdict id), the evidence it published (by evidence
hash), the failing verdicts still counting toward a slash (the tally), and the slashes it wants on
chain. A tally entry leaves the store only when its provider's slash is on chain, so a crash or a
failed slash loses nothing: the slash stays `pending` and is retried.

Threats: a peer serving evidence is untrusted (a fetcher re-hashes what it got: `Evidence.decode_checked`);
a verifier cannot make old evidence say something else (its hash would change); evidence is bounded in
size (`MAX_EVIDENCE_BYTES`, `MAX_SAMPLES`, `MAX_VERDICTS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from chain.errors import EconomyError
from economy.verification import MalformedVerdictError, SignedVerdict
from economy.work_sample import MalformedWorkSampleError, WorkSample

logger = logging.getLogger(__name__)

EVIDENCE_TAG = "dllm.evidence.1"
MAX_SAMPLES = 16
MAX_VERDICTS = 64
MAX_EVIDENCE_BYTES = 128 * 1024 * 1024


class MalformedEvidenceError(EconomyError, ValueError):
    """The bytes are not canonical evidence, or not the evidence the asked-for hash names."""


class EvidenceNotFoundError(EconomyError, LookupError):
    """No stored evidence or sample has the asked-for hash."""


def sample_hash(sample_data: bytes) -> bytes:
    """The hash verdicts cite for an encoded work sample (`WorkSample.evidence_hash`)."""
    return WorkSample.decode(sample_data).evidence_hash


@dataclass(frozen=True)
class Evidence:
    """Work samples (encoded) and the signed verdicts on them: the body of one accusation."""

    samples: tuple[bytes, ...]
    verdicts: tuple[SignedVerdict, ...]

    @classmethod
    def of(cls, samples: list[bytes] | tuple[bytes, ...], verdicts: list[SignedVerdict]) -> Evidence:
        """Canonical evidence of `samples` and `verdicts` (deduplicated, sorted); raises MalformedEvidenceError."""
        by_hash = {sample_hash(s): s for s in samples}
        by_id = {v.verdict.verdict_id: v for v in verdicts}
        evidence = cls(tuple(by_hash[h] for h in sorted(by_hash)), tuple(by_id[i] for i in sorted(by_id)))
        evidence._check(set(by_hash))
        return evidence

    @property
    def provider(self) -> str:
        return self.verdicts[0].verdict.provider

    def work_samples(self) -> list[WorkSample]:
        return [WorkSample.decode(s) for s in self.samples]

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(
            [EVIDENCE_TAG, list(self.samples), [v.encode() for v in self.verdicts]], use_bin_type=True
        )
        return packed

    @property
    def evidence_hash(self) -> bytes:
        """SHA-256 of the canonical encoding: what a slash's remark carries."""
        return hashlib.sha256(self.encode()).digest()

    @classmethod
    def decode(cls, data: bytes) -> Evidence:
        """Parses canonical evidence bytes; raises MalformedEvidenceError on anything else."""
        if type(data) is not bytes or len(data) > MAX_EVIDENCE_BYTES:
            raise MalformedEvidenceError(f"evidence must be bytes of at most {MAX_EVIDENCE_BYTES}")
        try:
            items = msgpack.unpackb(data, raw=False, max_map_len=0, max_ext_len=0, max_array_len=MAX_VERDICTS)
        except Exception as e:  # msgpack raises many unrelated types on garbage
            raise MalformedEvidenceError(f"evidence is not valid msgpack ({type(e).__name__})") from None
        if type(items) is not list or len(items) != 3 or items[0] != EVIDENCE_TAG:
            raise MalformedEvidenceError(f"expected a [{EVIDENCE_TAG!r}, samples, verdicts] array")
        samples, verdicts = items[1], items[2]
        if type(samples) is not list or type(verdicts) is not list or len(samples) > MAX_SAMPLES:
            raise MalformedEvidenceError(f"evidence holds a list of at most {MAX_SAMPLES} samples and of verdicts")
        if not all(type(s) is bytes for s in samples) or not all(type(v) is bytes for v in verdicts):
            raise MalformedEvidenceError("evidence samples and verdicts must be byte strings")
        try:
            evidence = cls.of(samples, [SignedVerdict.decode(v) for v in verdicts])
        except (MalformedWorkSampleError, MalformedVerdictError) as e:
            raise MalformedEvidenceError(f"evidence: {e}") from None
        if evidence.encode() != data:
            raise MalformedEvidenceError("evidence bytes are not canonical (unsorted, duplicated or re-encoded)")
        return evidence

    @classmethod
    def decode_checked(cls, data: bytes, expected_hash: bytes) -> Evidence:
        """Evidence from an untrusted source: raises MalformedEvidenceError unless it hashes to `expected_hash`."""
        if hashlib.sha256(data).digest() != expected_hash:
            raise MalformedEvidenceError(f"the evidence served does not hash to {expected_hash.hex()}")
        return cls.decode(data)

    def _check(self, sample_hashes: set[bytes]) -> None:
        if not self.samples or not self.verdicts:
            raise MalformedEvidenceError("evidence needs at least one sample and one verdict")
        if len(self.samples) > MAX_SAMPLES or len(self.verdicts) > MAX_VERDICTS:
            raise MalformedEvidenceError(f"evidence holds at most {MAX_SAMPLES} samples and {MAX_VERDICTS} verdicts")
        judged = {v.verdict.evidence_hash for v in self.verdicts}
        if judged != sample_hashes:
            raise MalformedEvidenceError(
                "every verdict must judge a sample in the evidence, and every sample be judged"
            )
        if len({v.verdict.provider for v in self.verdicts}) != 1:
            raise MalformedEvidenceError("evidence accuses exactly one provider")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    hash BLOB PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS verdicts (
    verdict_id  TEXT PRIMARY KEY,
    provider    TEXT NOT NULL,
    verifier    TEXT NOT NULL,
    sample_hash BLOB NOT NULL,
    passed      INTEGER NOT NULL,
    data        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_by_sample ON verdicts (sample_hash);
CREATE TABLE IF NOT EXISTS evidence (
    hash     BLOB PRIMARY KEY,
    provider TEXT NOT NULL,
    data     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tally (
    provider   TEXT NOT NULL,
    verifier   TEXT NOT NULL,
    verdict_id TEXT NOT NULL REFERENCES verdicts (verdict_id),
    PRIMARY KEY (provider, verifier)
);
CREATE TABLE IF NOT EXISTS slashes (
    provider      TEXT PRIMARY KEY,
    evidence_hash BLOB NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    block         INTEGER,
    updated_at    REAL NOT NULL
);
"""


@dataclass(frozen=True)
class PendingSlash:
    """A slash that is wanted but not yet on chain."""

    provider: str
    evidence_hash: bytes
    attempts: int


class EvidenceStore:
    """One verifier's durable evidence (one writer: the verifier process)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def __enter__(self) -> EvidenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- samples and verdicts -----------------------------------------------------------------------
    def put_sample(self, sample: WorkSample) -> bytes:
        """Stores an encoded sample under its sample hash; returns the hash."""
        data = sample.encode()
        digest = sample.evidence_hash
        self._db.execute("INSERT OR IGNORE INTO samples (hash, data) VALUES (?, ?)", (digest, data))
        return digest

    def sample(self, digest: bytes) -> bytes | None:
        row = self._db.execute("SELECT data FROM samples WHERE hash = ?", (digest,)).fetchone()
        return bytes(row[0]) if row else None

    def put_verdict(self, signed: SignedVerdict) -> None:
        v = signed.verdict
        self._db.execute(
            "INSERT OR IGNORE INTO verdicts (verdict_id, provider, verifier, sample_hash, passed, data)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (v.verdict_id, v.provider, v.verifier, v.evidence_hash, int(v.passed), signed.encode()),
        )

    def verdicts_on(self, digest: bytes) -> list[SignedVerdict]:
        rows = self._db.execute("SELECT data FROM verdicts WHERE sample_hash = ? ORDER BY verdict_id", (digest,))
        return [SignedVerdict.decode(bytes(r[0])) for r in rows]

    # ---- published evidence -------------------------------------------------------------------------
    def put_evidence(self, evidence: Evidence) -> bytes:
        """Stores evidence under its SHA-256; returns the hash."""
        digest = evidence.evidence_hash
        self._db.execute(
            "INSERT OR IGNORE INTO evidence (hash, provider, data) VALUES (?, ?, ?)",
            (digest, evidence.provider, evidence.encode()),
        )
        return digest

    def evidence(self, digest: bytes) -> bytes | None:
        """The canonical bytes of the evidence with this hash, if stored."""
        row = self._db.execute("SELECT data FROM evidence WHERE hash = ?", (digest,)).fetchone()
        return bytes(row[0]) if row else None

    def evidence_of(self, verdicts: list[SignedVerdict]) -> Evidence | None:
        """Evidence of `verdicts` with the samples they judge, if every sample is stored here."""
        samples = [self.sample(v.verdict.evidence_hash) for v in verdicts]
        if any(s is None for s in samples):
            return None
        return Evidence.of([s for s in samples if s is not None], verdicts)

    # ---- tally and slashes --------------------------------------------------------------------------
    def tally_add(self, signed: SignedVerdict) -> None:
        """Keeps a (validated, failing) verdict in the provider's tally: one per verifier, the first kept."""
        v = signed.verdict
        with self._transaction():
            self.put_verdict(signed)
            self._db.execute(
                "INSERT OR IGNORE INTO tally (provider, verifier, verdict_id) VALUES (?, ?, ?)",
                (v.provider, v.verifier, v.verdict_id),
            )

    def tally(self) -> list[SignedVerdict]:
        """Every verdict still counting toward a slash."""
        rows = self._db.execute(
            "SELECT v.data FROM tally t JOIN verdicts v ON v.verdict_id = t.verdict_id ORDER BY t.provider, t.verifier"
        )
        return [SignedVerdict.decode(bytes(r[0])) for r in rows]

    def want_slash(self, provider: str, evidence_hash: bytes) -> None:
        """Records that `provider` must be slashed citing `evidence_hash` (kept until `slash_done`)."""
        self._db.execute(
            "INSERT OR IGNORE INTO slashes (provider, evidence_hash, state, updated_at) VALUES (?, ?, 'pending', ?)",
            (provider, evidence_hash, time.time()),
        )

    def adopt_slash(self, provider: str, evidence_hash: bytes) -> None:
        """Wants `provider` slashed citing `evidence_hash` instead of any evidence wanted before (a council member
        joining the proposal another member opened first); a slash already done stays done."""
        self._db.execute(
            "INSERT INTO slashes (provider, evidence_hash, state, updated_at) VALUES (?, ?, 'pending', ?)"
            " ON CONFLICT (provider) DO UPDATE SET evidence_hash = excluded.evidence_hash, attempts = 0,"
            " last_error = NULL, updated_at = excluded.updated_at WHERE state = 'pending'",
            (provider, evidence_hash, time.time()),
        )

    def drop_slash(self, provider: str) -> None:
        """No longer wants `provider` slashed (a re-run after its dispute passed it); its tally stays."""
        self._db.execute("DELETE FROM slashes WHERE provider = ? AND state = 'pending'", (provider,))

    def slash_failed(self, provider: str, error: str) -> None:
        self._db.execute(
            "UPDATE slashes SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE provider = ?",
            (error[:500], time.time(), provider),
        )

    def slash_done(self, provider: str, block: int | None) -> None:
        """The slash is on chain (or nothing is left to slash): its tally is dropped in the same transaction."""
        with self._transaction():
            self._db.execute(
                "UPDATE slashes SET state = 'done', block = ?, updated_at = ? WHERE provider = ?",
                (block, time.time(), provider),
            )
            self._db.execute("DELETE FROM tally WHERE provider = ?", (provider,))

    def pending_slashes(self) -> list[PendingSlash]:
        rows = self._db.execute("SELECT provider, evidence_hash, attempts FROM slashes WHERE state = 'pending'")
        return [PendingSlash(p, bytes(h), a) for p, h, a in rows]

    def slashed(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT provider FROM slashes WHERE state = 'done' ORDER BY provider")]

"""A provider's durable store of co-signed receipts, from receipt to settled payment.

Every receipt moves unsettled -> settling -> settled, each move one SQLite transaction (WAL,
synchronous=FULL), so a process killed at any instant leaves every receipt in exactly one state.
A batch is marked `settling` (with its batch id) BEFORE it is submitted to the chain; after a
crash, `Settler.reconcile` asks the chain about each settling receipt and either marks it settled or
returns it to unsettled. Receipt ids (and (provider, client, session, sequence)) are unique, so a
receipt can be neither stored nor paid twice.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from chain.errors import EconomyError
from economy.receipts import ReplayedReceiptError, SignedReceipt, verify_receipt

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id TEXT PRIMARY KEY,
    provider   TEXT NOT NULL,
    client     TEXT NOT NULL,
    session_id BLOB NOT NULL,
    sequence   INTEGER NOT NULL,
    amount     INTEGER NOT NULL,
    blob       BLOB NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('unsettled', 'settling', 'settled')),
    batch_id   TEXT,
    tx_hash    TEXT,
    received_at REAL NOT NULL,
    settled_at  REAL,
    UNIQUE (provider, client, session_id, sequence)
);
CREATE INDEX IF NOT EXISTS receipts_by_state ON receipts (state, client);
CREATE TABLE IF NOT EXISTS settlements (
    receipt_id TEXT PRIMARY KEY REFERENCES receipts (receipt_id),
    nonce      INTEGER NOT NULL,
    extrinsic  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id   TEXT PRIMARY KEY,
    client     TEXT NOT NULL,
    created_at REAL NOT NULL,
    tx_hash    TEXT
);
"""


class ReceiptState(StrEnum):
    """Where a stored receipt is on its way to payment."""

    UNSETTLED = "unsettled"
    SETTLING = "settling"
    SETTLED = "settled"


class ReceiptStoreError(EconomyError, RuntimeError):
    """A store operation names an unknown batch or receipt."""


@dataclass(frozen=True)
class Payment:
    """One transfer a settlement makes: `amount` planck from `client` to `provider` for a receipt."""

    receipt_id: str
    client: str
    provider: str
    amount: int


@dataclass(frozen=True)
class SettlementBatch:
    """Receipts of one client settled together in one chain transaction."""

    batch_id: str
    client: str
    receipts: tuple[SignedReceipt, ...]

    @property
    def payments(self) -> list[Payment]:
        return [Payment(s.receipt_id, s.receipt.client, s.receipt.provider, s.receipt.amount) for s in self.receipts]

    @property
    def total(self) -> int:
        return sum(s.receipt.amount for s in self.receipts)

    @property
    def receipt_ids(self) -> list[str]:
        return [s.receipt_id for s in self.receipts]


@dataclass(frozen=True)
class StoredReceipt:
    """A receipt as the store holds it."""

    signed: SignedReceipt
    state: ReceiptState
    batch_id: str | None
    tx_hash: str | None


class ReceiptStore:
    """SQLite-backed receipt store of one provider process (one writer)."""

    def __init__(self, path: Path | str, network: str | None = None, provider: str | None = None):
        """Opens (creating if needed) the store at `path`.

        With `network` / `provider`, `add` refuses receipts for another chain or another provider.
        """
        self.path = Path(path)
        self.network = network
        self.provider = provider
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ReceiptStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def add(
        self, signed: SignedReceipt, expected_client: str | None = None, settlement: tuple[int, bytes] | None = None
    ) -> str:
        """Verifies and stores a co-signed receipt as unsettled; returns its id.

        `settlement` = (nonce, extrinsic) of the client's pre-signed settlement paying it, stored in
        the same transaction so a crash can never keep one without the other. Raises the receipts
        module's errors for a bad receipt, ReplayedReceiptError if this receipt (or another one for
        the same session segment) is already stored.
        """
        receipt_id = verify_receipt(
            signed, expected_client=expected_client, expected_provider=self.provider, network=self.network
        )
        r = signed.receipt
        try:
            with self._transaction():
                self._db.execute(
                    "INSERT INTO receipts (receipt_id, provider, client, session_id, sequence, amount, blob, state,"
                    " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'unsettled', ?)",
                    (
                        receipt_id,
                        r.provider,
                        r.client,
                        r.session_id,
                        r.sequence,
                        r.amount,
                        signed.encode(),
                        time.time(),
                    ),
                )
                if settlement is not None:
                    self._db.execute(
                        "INSERT INTO settlements (receipt_id, nonce, extrinsic) VALUES (?, ?, ?)",
                        (receipt_id, settlement[0], settlement[1]),
                    )
        except sqlite3.IntegrityError:
            raise ReplayedReceiptError(
                f"receipt {receipt_id} (session {r.session_id.hex()} segment {r.sequence}) is already stored"
            ) from None
        return receipt_id

    def get(self, receipt_id: str) -> StoredReceipt:
        row = self._db.execute(
            "SELECT blob, state, batch_id, tx_hash FROM receipts WHERE receipt_id = ?", (receipt_id,)
        ).fetchone()
        if row is None:
            raise ReceiptStoreError(f"no receipt {receipt_id} in {self.path}")
        return StoredReceipt(SignedReceipt.decode(row[0]), ReceiptState(row[1]), row[2], row[3])

    def settlement_for(self, receipt_id: str) -> tuple[int, bytes] | None:
        """(nonce, extrinsic) of the pre-signed settlement stored with a receipt, if any."""
        row = self._db.execute(
            "SELECT nonce, extrinsic FROM settlements WHERE receipt_id = ?", (receipt_id,)
        ).fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def has(self, receipt_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM receipts WHERE receipt_id = ?", (receipt_id,)).fetchone() is not None

    def client_of(self, receipt_id: str) -> str:
        row = self._db.execute("SELECT client FROM receipts WHERE receipt_id = ?", (receipt_id,)).fetchone()
        if row is None:
            raise ReceiptStoreError(f"no receipt {receipt_id} in {self.path}")
        return str(row[0])

    def amounts_from(self, client: str) -> dict[bytes, int]:
        """Receipt id (32 bytes) -> planck of every receipt of `client` held here, whatever its state:
        what a settlement marking any of them must transfer to this provider in the same extrinsic."""
        rows = self._db.execute("SELECT receipt_id, amount FROM receipts WHERE client = ?", (client,))
        return {bytes.fromhex(rid.removeprefix("0x")): int(amount) for rid, amount in rows}

    def held_nonces(self, client: str) -> set[int]:
        """Nonces of `client`'s pre-signed settlements held for receipts not settled yet."""
        rows = self._db.execute(
            "SELECT DISTINCT s.nonce FROM settlements s JOIN receipts r ON r.receipt_id = s.receipt_id"
            " WHERE r.client = ? AND r.state != 'settled'",
            (client,),
        )
        return {int(row[0]) for row in rows}

    def unpaid_amount(self, client: str) -> int:
        """Planck of `client`'s receipts held here and not settled on chain (what it still owes)."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM receipts WHERE client = ? AND state != 'settled'", (client,)
        ).fetchone()
        return int(row[0])

    def counts(self) -> dict[ReceiptState, int]:
        """Number of receipts in each state."""
        result = {s: 0 for s in ReceiptState}
        for state, n in self._db.execute("SELECT state, COUNT(*) FROM receipts GROUP BY state"):
            result[ReceiptState(state)] = n
        return result

    def settled_ids(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT receipt_id FROM receipts WHERE state = 'settled'")}

    def unsettled_clients(self) -> list[str]:
        """Clients with receipts waiting for a batch, oldest first."""
        rows = self._db.execute(
            "SELECT client FROM receipts WHERE state = 'unsettled' GROUP BY client ORDER BY MIN(received_at)"
        )
        return [row[0] for row in rows]

    def begin_batch(self, client: str, limit: int = 100) -> SettlementBatch | None:
        """Atomically moves up to `limit` of `client`'s unsettled receipts to a new settling batch."""
        if limit <= 0:
            raise ValueError("limit must be positive")
        batch_id = uuid.uuid4().hex
        with self._transaction():
            rows = self._db.execute(
                "SELECT receipt_id, blob FROM receipts WHERE state = 'unsettled' AND client = ?"
                " ORDER BY received_at, receipt_id LIMIT ?",
                (client, limit),
            ).fetchall()
            if not rows:
                return None
            self._db.execute(
                "INSERT INTO batches (batch_id, client, created_at) VALUES (?, ?, ?)", (batch_id, client, time.time())
            )
            self._db.executemany(
                "UPDATE receipts SET state = 'settling', batch_id = ? WHERE receipt_id = ? AND state = 'unsettled'",
                [(batch_id, rid) for rid, _ in rows],
            )
        return SettlementBatch(batch_id, client, tuple(SignedReceipt.decode(blob) for _, blob in rows))

    def record_submission(self, batch_id: str, tx_hash: str) -> None:
        """Notes the transaction a settling batch was submitted in (for audit and reconciliation)."""
        with self._transaction():
            cur = self._db.execute("UPDATE batches SET tx_hash = ? WHERE batch_id = ?", (tx_hash, batch_id))
            if cur.rowcount != 1:
                raise ReceiptStoreError(f"unknown batch {batch_id}")
            self._db.execute("UPDATE receipts SET tx_hash = ? WHERE batch_id = ?", (tx_hash, batch_id))

    def mark_settled(self, receipt_ids: list[str], tx_hash: str | None = None) -> int:
        """settling -> settled for the given receipts; returns how many moved."""
        now = time.time()
        with self._transaction():
            moved = 0
            for rid in receipt_ids:
                cur = self._db.execute(
                    "UPDATE receipts SET state = 'settled', settled_at = ?, tx_hash = COALESCE(?, tx_hash)"
                    " WHERE receipt_id = ? AND state = 'settling'",
                    (now, tx_hash, rid),
                )
                moved += cur.rowcount
        return moved

    def release(self, receipt_ids: list[str]) -> int:
        """settling -> unsettled (the chain did not take them); returns how many moved."""
        with self._transaction():
            moved = 0
            for rid in receipt_ids:
                cur = self._db.execute(
                    "UPDATE receipts SET state = 'unsettled', batch_id = NULL, tx_hash = NULL"
                    " WHERE receipt_id = ? AND state = 'settling'",
                    (rid,),
                )
                moved += cur.rowcount
        return moved

    def settling_receipt_ids(self) -> list[str]:
        """Receipts whose batch was started but not confirmed: what reconciliation asks the chain about."""
        return [row[0] for row in self._db.execute("SELECT receipt_id FROM receipts WHERE state = 'settling'")]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")

"""Version commits: each adapter version that goes live on a replica is recorded on chain by that replica.

When an averaging round promotes version V on this replica (peer/averaging.py), `VersionCommitter.went_live`
reads, at once, what must come from that moment: V's canonical sha256 (peer/adapters.adapter_digest, the
digest verifiers fetch adapters by, peer/adapter_exchange.py; V is archived for them too), the parent's sha256
(cached from its own go-live, or computed while the parent is still held; None if neither), the round's peer
ids and the canary verdict's per-category losses before/after. A background task then flushes the feedback
store's pending examples as `data-batch` records (`flush_batch()`), takes the roots of the batches that trained
since the parent (`roots_since(V - 1)`) and commits an `adapter-version` record from this peer's own chain
account (chain/lineage.py). Replicas never exchange anything for this: each commits its own record and the
lineage reader merges records of one (model, span, version, sha256).

Invariants: committing never blocks serving or averaging (the round callback only starts a task; chain calls
run in worker threads, one commit at a time, under the lock every use of this peer's chain connection takes,
so its extrinsics never race for a nonce); a failed commit is retried `attempts` times with a delay, then
logged and counted (`info()`), never raised. A version adopted from a replica (catch-up) is not committed here:
the replicas whose round made it live commit it.
Threats: the record is this peer's own word, signed and paid by its account; a replica that commits a different
sha256 for the same version shows as a fork in the lineage (chain/lineage.py), it cannot overwrite others'.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from peer.adapters import AdapterSet, adapter_digest
from peer.averaging import RoundOutcome

if TYPE_CHECKING:
    from substrateinterface import Keypair

    from chain.ledger import ComputeLedger

logger = logging.getLogger(__name__)

KEPT_DIGESTS = 16
"""Committed versions whose sha256 is kept (the parent of the next version needs its own)."""


class FeedbackRoots(Protocol):
    """What a version commit needs from the peer's feedback store (peer/feedback_store.py)."""

    def flush_batch(self) -> list[bytes]: ...

    def roots_since(self, version: int) -> list[bytes]: ...


@dataclass(frozen=True)
class VersionCommitConfig:
    """Bounded retries of one version's commit."""

    attempts: int = 3
    retry_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or not self.retry_delay_s >= 0:
            raise ValueError("attempts must be >= 1 and retry_delay_s >= 0")


@dataclass(frozen=True)
class PendingCommit:
    """What the record of one version says, read when it went live."""

    version: int
    parent: int
    sha256: bytes
    parent_sha256: bytes | None
    replicas: tuple[str, ...]
    canary_before: dict[str, float]
    canary_after: dict[str, float]


@dataclass
class CommitLog:
    """Outcomes of this replica's version commits (rpc_info `version_commits`)."""

    committed: dict[int, dict[str, str]] = field(default_factory=dict)  # version -> {"sha256", "extrinsic"}
    failed: dict[int, str] = field(default_factory=dict)  # version -> last error

    def to_json(self) -> dict[str, Any]:
        return {
            "committed": {str(v): h for v, h in sorted(self.committed.items())[-KEPT_DIGESTS:]},
            "failed": {str(v): e for v, e in sorted(self.failed.items())[-KEPT_DIGESTS:]},
        }


class VersionCommitter:
    """Commits this replica's live versions as `adapter-version` records, in the background."""

    def __init__(
        self,
        ledger: ComputeLedger,
        keypair: Keypair,
        *,
        model: str,
        span: tuple[int, int],
        adapters: AdapterSet,
        store: FeedbackRoots | None = None,
        chain_lock: threading.Lock | None = None,
        retain: Callable[[int], bytes] | None = None,
        config: VersionCommitConfig | None = None,
    ) -> None:
        self.ledger = ledger
        self.keypair = keypair
        self.model = model
        self.span = span
        self.adapters = adapters
        self.store = store
        self.chain_lock = chain_lock or threading.Lock()
        # archives a version for verifiers and returns its canonical digest (SpanLearner.retain_version)
        self.retain = retain or self._digest
        self.config = config or VersionCommitConfig()
        self.log = CommitLog()
        self._sha256: dict[int, bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._one_at_a_time = asyncio.Lock()

    def _digest(self, version: int) -> bytes:
        return adapter_digest(self.adapters.state(version).tensors, self.adapters.config.scaling)

    def _sha256_of(self, version: int) -> bytes | None:
        """The canonical digest of `version`: cached from its commit, else computed if still held."""
        known = self._sha256.get(version)
        if known is not None:
            return known
        try:
            return self._digest(version)
        except Exception as e:  # no longer held: the record says so (parent_sha256 null)
            logger.info("adapter v%d is no longer held; its sha256 is not known here: %s", version, e)
            return None

    def went_live(self, outcome: RoundOutcome) -> asyncio.Task[None] | None:
        """Starts committing the version `outcome` made live (an averaged round); returns the task, None otherwise."""
        if not outcome.averaged or outcome.version < 1:
            return None
        task = asyncio.create_task(self._commit(outcome))
        self._tasks.add(task)  # held: the loop keeps only weak references to running tasks
        task.add_done_callback(self._tasks.discard)
        return task

    async def _commit(self, outcome: RoundOutcome) -> None:
        version = outcome.version
        try:
            pending = await asyncio.to_thread(self._read, outcome)
        except Exception as e:
            self.log.failed[version] = f"{type(e).__name__}: {e}"
            logger.warning("adapter v%d cannot be committed: %s: %s", version, type(e).__name__, e)
            return
        async with self._one_at_a_time:  # versions are committed in the order they went live
            await self._submit_with_retries(pending)

    def _read(self, outcome: RoundOutcome) -> PendingCommit:
        """What the record says, read right away: the version's tensors and its parent's are held now."""
        version, parent = outcome.version, outcome.version - 1
        sha256 = self.retain(version)
        parent_sha256 = self._sha256_of(parent)
        self._sha256[version] = sha256
        for old in sorted(self._sha256)[:-KEPT_DIGESTS]:
            del self._sha256[old]
        verdict = outcome.canary
        return PendingCommit(
            version=version,
            parent=parent,
            sha256=sha256,
            parent_sha256=parent_sha256,
            replicas=tuple(outcome.group),
            canary_before=verdict.losses("before") if verdict is not None else {},
            canary_after=verdict.losses("after") if verdict is not None else {},
        )

    async def _submit_with_retries(self, pending: PendingCommit) -> None:
        attempts = self.config.attempts
        for attempt in range(1, attempts + 1):
            try:
                result = await asyncio.to_thread(self._submit, pending)
            except Exception as e:  # a chain hiccup, a fee it cannot pay: retried, then logged
                self.log.failed[pending.version] = f"{type(e).__name__}: {e}"
                log = logger.warning if attempt == attempts else logger.info
                log(
                    "committing adapter v%d failed (attempt %d of %d): %s: %s",
                    pending.version,
                    attempt,
                    attempts,
                    type(e).__name__,
                    e,
                )
                if attempt < attempts:
                    await asyncio.sleep(self.config.retry_delay_s)
                continue
            self.log.failed.pop(pending.version, None)
            self.log.committed[pending.version] = {
                "sha256": pending.sha256.hex(),
                "extrinsic": str(getattr(result, "extrinsic_hash", "") or ""),
            }
            logger.info(
                "committed adapter v%d of %s %d:%d on chain (sha256 %s)",
                pending.version,
                self.model,
                *self.span,
                pending.sha256.hex()[:16],
            )
            return

    def _submit(self, pending: PendingCommit) -> Any:
        """Flushes pending feedback into data-batch records, then commits the version (a worker thread)."""
        data_roots: Sequence[bytes] = []
        if self.store is not None:
            self.store.flush_batch()  # the examples that trained this version get their batch roots first
            data_roots = self.store.roots_since(pending.parent)
        with self.chain_lock:
            return self.ledger.commit_adapter_version(
                self.keypair,
                self.model,
                self.span,
                pending.version,
                pending.parent,
                pending.sha256,
                pending.parent_sha256,
                data_roots,
                pending.replicas,
                pending.canary_before,
                pending.canary_after,
            )

    def info(self) -> dict[str, Any]:
        return self.log.to_json()

    async def close(self) -> None:
        """Waits briefly for commits in flight, then cancels what is left (the peer stops)."""
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

"""FeedbackStore: durable records, serving by hash, data-batch commits on the real dev chain, and the budget's
eviction rules (oldest committed-and-replicated first, replica copies evictable, uncommitted never evicted,
refusal when nothing may go, shared prompts capped at half the budget)."""

from __future__ import annotations

import pytest
from substrateinterface import Keypair

from chain.lineage import LineageIndex
from chain.merkle import merkle_root
from peer.feedback_store import FeedbackStore, ledger_committer
from swarm.feedback_records import FeedbackStoreFullError, sign_example
from tests.chain.ledger_helpers import fresh_account

pytestmark = pytest.mark.timeout(240)

MODEL = "feedback-store-test"  # not the swarm tests' model: their exports read the same session chain
SPAN = (0, 4)
ALICE = Keypair.create_from_uri("//Alice")


def examples(count: int, label: str = "x", kind: str = "feedback") -> list:
    return [
        sign_example(ALICE, MODEL, f"{label} prompt {i}:", f" answer {i}" + "." * 200, kind=kind) for i in range(count)
    ]


def size_of(example) -> int:
    return len(example.canonical_bytes())


def test_records_are_kept_served_by_hash_and_survive_a_restart(tmp_path):
    path = tmp_path / "data" / "feedback.sqlite3"
    store = FeedbackStore(path, MODEL, budget_bytes=2**20)
    assert store.get([b"\x01" * 32]) == {} and not path.exists()  # nothing written before the first record
    first, second = examples(2)
    assert store.add(first, SPAN, live_version=3) is True
    assert store.add(first, SPAN, live_version=3) is False  # had it
    assert store.add_replica(second, (4, 8)) is True
    store.close()
    reopened = FeedbackStore(path, MODEL, budget_bytes=2**20)
    held = reopened.get([first.content_hash(), second.content_hash(), b"\x02" * 32])
    assert held == {first.content_hash(): first, second.content_hash(): second}
    stats = reopened.stats()
    assert (stats.records, stats.uncommitted, stats.unreplicated) == (2, 1, 1)  # the replica copy is not ours
    assert reopened.unreplicated() == [first]
    assert reopened.flush_batch() == []  # no chain key: nothing committed, said in the log
    assert reopened.pending_count() == 1
    reopened.close()


def test_flush_commits_batches_on_chain_and_eviction_takes_only_vouched_for_records(ledger, tmp_path):
    """The peer's own account commits data-batch records (read back from the chain); under a tiny budget the
    oldest committed-and-replicated records go first, an uncommitted one never does, and with nothing evictable
    a new record is refused."""
    import threading

    peer = fresh_account(ledger)
    records = examples(6, "budget")
    budget = sum(size_of(e) for e in records[:3]) + 10  # room for three records
    store = FeedbackStore(
        tmp_path / "feedback.sqlite3", MODEL, budget, committer=ledger_committer(ledger, peer, threading.Lock())
    )
    for version, example in enumerate(records[:3]):
        store.add(example, SPAN, live_version=version)
    with pytest.raises(FeedbackStoreFullError, match="holds nothing it may evict"):
        store.add(records[3], SPAN, 3)  # all three uncommitted: none may go
    assert not store.has_room(records[3])

    roots = store.flush_batch()
    hashes = [e.content_hash() for e in records[:3]]
    assert roots == [merkle_root(hashes)]
    assert store.roots_since(2) == roots and store.roots_since(3) == []
    index = LineageIndex(ledger)
    index.sync()
    committed = [b for b in index.data_batches() if b.sender == peer.ss58_address]
    assert [(b.root, list(b.hashes), tuple(b.span), b.model) for b in committed] == [(roots[0], hashes, SPAN, MODEL)]

    with pytest.raises(FeedbackStoreFullError):  # committed, but not yet replicated anywhere: still kept
        store.add(records[3], SPAN, 3)
    store.mark_replicated(hashes[:2])
    assert store.add(records[3], SPAN, 3)  # evicts the oldest committed-and-replicated record
    assert set(store.get(hashes)) == set(hashes[1:])
    assert store.add(records[4], SPAN, 4)  # and the next one
    assert set(store.get(hashes)) == {hashes[2]}  # committed but never replicated: kept
    with pytest.raises(FeedbackStoreFullError):
        store.add(records[5], SPAN, 5)
    assert store.stats().evicted == 2
    store.close()

    # shared prompts are committed in batches of their own, never listed as data that trained a version
    mixed = FeedbackStore(
        tmp_path / "mixed.sqlite3", MODEL, 2**20, committer=ledger_committer(ledger, peer, threading.Lock())
    )
    trained, shared = examples(1, "trained")[0], examples(1, "shared", kind="shared-prompt")[0]
    mixed.add(trained, SPAN, 7)
    mixed.add(shared, SPAN, 7, origin="shared")
    flushed: list[int] = []
    mixed.after_flush = lambda: flushed.append(1)  # the peer replicates what a flush committed
    assert mixed.flush_batch() == [merkle_root([trained.content_hash()]), merkle_root([shared.content_hash()])]
    assert mixed.roots_since(7) == [merkle_root([trained.content_hash()])]
    assert flushed == [1] and mixed.flush_batch() == [] and flushed == [1]  # nothing new: no replication round
    mixed.close()


def test_replica_copies_are_evicted_first_and_shared_prompts_take_at_most_half(tmp_path):
    own, copies = examples(1, "own"), examples(3, "copy")
    budget = size_of(own[0]) + 2 * size_of(copies[0]) + 10
    store = FeedbackStore(tmp_path / "feedback.sqlite3", MODEL, budget)
    for copy in copies[:2]:
        store.add_replica(copy, (4, 8))
    store.add(own[0], SPAN, 0)
    store.add_replica(copies[2], (4, 8))  # the oldest copy makes room
    assert set(store.get([c.content_hash() for c in copies])) == {c.content_hash() for c in copies[1:]}

    shared = examples(3, "shared", kind="shared-prompt")
    small = FeedbackStore(tmp_path / "shared.sqlite3", MODEL, budget_bytes=2 * size_of(shared[0]) + 10)
    assert small.add(shared[0], SPAN, 0, origin="shared")
    with pytest.raises(FeedbackStoreFullError, match="at most half"):
        small.add(shared[1], SPAN, 0, origin="shared")
    assert small.add(examples(1, "trained")[0], SPAN, 0)  # training keeps the rest of the room
    small.close()
    store.close()

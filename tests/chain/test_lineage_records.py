"""Lineage records (`data-batch`, `adapter-version`) and their Merkle roots, on the real dev chain runtime.

Peers commit from their own funded accounts; the index lists only what the extrinsic's signer sent, well formed;
everything else (forged root, malformed or oversized body, a record relayed through another origin) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from chain.errors import InsufficientBalanceError, UnknownAccountError
from chain.lineage import LineageIndex, adapter_version_body, data_batch_body
from chain.merkle import merkle_proof, merkle_root, verify_proof
from chain.remarks import (
    MAX_BATCH_HASHES,
    STEM,
    MalformedRemarkError,
    decode_remark,
    encode_remark,
)
from tests.chain.ledger_helpers import account_state, fresh_account

pytestmark = pytest.mark.timeout(240)

MODEL = "dllm-tiny-llama"


def sha(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def hashes(label: str, count: int) -> list[bytes]:
    return [sha(f"{label}-{i}") for i in range(count)]


# ---- Merkle roots ------------------------------------------------------------------------------------------------
def test_merkle_proofs_verify_every_leaf_and_nothing_else():
    for count in (1, 2, 3, 5, 8, 13):
        leaves = hashes(f"tree{count}", count)
        root = merkle_root(leaves)
        for i, leaf in enumerate(leaves):
            proof = merkle_proof(leaves, i)
            assert verify_proof(leaf, proof, root)
            assert not verify_proof(sha("outsider"), proof, root)
            if proof:
                side, sibling = proof[0]
                assert not verify_proof(leaf, [("right" if side == "left" else "left", sibling), *proof[1:]], root)
                assert not verify_proof(leaf, [(side, bytes(32)), *proof[1:]], root)
                assert not verify_proof(leaf, [("middle", sibling), *proof[1:]], root)
    assert not verify_proof(b"short", [], merkle_root([sha("a")]))
    assert not verify_proof(sha("a"), [("left", b"short")], merkle_root([sha("a")]))


def test_merkle_root_order_matters_no_duplicate_promotion_and_empty_is_refused():
    a, b, c = hashes("abc", 3)
    assert merkle_root([a, b, c]) != merkle_root([b, a, c])
    assert merkle_root([a, b, c]) != merkle_root([a, b, c, c])  # an odd node is promoted, not duplicated
    assert merkle_root([a]) != a  # even one leaf is hashed in the leaf domain
    with pytest.raises(ValueError):
        merkle_root([])
    with pytest.raises(ValueError):
        merkle_root([a, b"\x00" * 31])
    with pytest.raises(ValueError):
        merkle_proof([a, b], 2)


def test_an_inner_node_cannot_pass_for_a_leaf():
    """The second-preimage trick: present the inner node over leaves 0 and 1 as a leaf, with the proof of the
    level above. Leaves and inner nodes are hashed in different domains, so it does not verify."""
    leaves = hashes("second-preimage", 4)
    root = merkle_root(leaves)
    inner_left = hashlib.sha256(
        b"\x01" + hashlib.sha256(b"\x00" + leaves[0]).digest() + hashlib.sha256(b"\x00" + leaves[1]).digest()
    ).digest()
    above = merkle_proof(leaves, 0)[1:]  # the sibling of inner_left, as a proof from that level
    assert hashlib.sha256(b"\x01" + inner_left + above[0][1]).digest() == root  # the tree is what we think
    assert not verify_proof(inner_left, above, root)


# ---- record formats (no chain) -------------------------------------------------------------------------------------
def version_body(**changes):
    body = adapter_version_body(
        MODEL, (0, 4), 2, 1, sha("v2"), sha("v1"), [sha("root")], ["12D3KooWpeer"], {"general": 3.5}, {"general": 3.4}
    )
    body.update(changes)
    return body


def raw_payload(kind: str, body: object) -> bytes:
    """A payload as a hostile writer would send it: no check on the way out."""
    return STEM + b"1:" + kind.encode() + b":" + json.dumps(body, separators=(",", ":")).encode()


def malformed_bodies() -> list[tuple[str, object]]:
    good_batch = data_batch_body(MODEL, (0, 4), hashes("batch", 3))
    many = hashes("many", MAX_BATCH_HASHES + 1)
    return [
        ("data-batch", {**good_batch, "root": sha("forged root").hex()}),
        ("data-batch", {**good_batch, "count": 4}),
        ("data-batch", {**good_batch, "hashes": good_batch["hashes"][:2] + good_batch["hashes"][:1]}),
        ("data-batch", {**good_batch, "hashes": [h.upper() for h in good_batch["hashes"]]}),
        ("data-batch", {**good_batch, "sender": "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"}),
        ("data-batch", {k: v for k, v in good_batch.items() if k != "span"}),
        ("data-batch", {**good_batch, "span": [4, 4]}),
        ("data-batch", {**good_batch, "model": "tiny\x1b[2Jllama"}),
        ("data-batch", {**good_batch, "hashes": [h.hex() for h in many], "count": len(many)}),
        ("data-batch", {**good_batch, "hashes": [], "count": 0}),
        ("adapter-version", version_body(version=True)),
        ("adapter-version", version_body(parent=2)),
        ("adapter-version", version_body(sha256="00")),
        ("adapter-version", version_body(replicas=["a", "a"])),
        ("adapter-version", version_body(replicas=["x" * 129])),
        ("adapter-version", version_body(canary={"before": {"general": float("nan")}, "after": {}})),
        ("adapter-version", version_body(canary={"before": {"general": "3.5"}, "after": {}})),
        ("adapter-version", version_body(canary={"before": {}})),
        ("adapter-version", version_body(data_roots=[sha(str(i)).hex() for i in range(300)])),
    ]


def test_writers_and_readers_refuse_malformed_lineage_bodies():
    for kind, body in malformed_bodies():
        with pytest.raises(MalformedRemarkError):
            encode_remark(kind, body)
        with pytest.raises(MalformedRemarkError):
            decode_remark(raw_payload(kind, body))
    # Every list within its own bound, the whole past the body cap.
    oversized = version_body(
        replicas=[f"12D3KooW{i:0>120}" for i in range(64)], data_roots=[sha(f"r{i}").hex() for i in range(256)]
    )
    with pytest.raises(MalformedRemarkError, match="bytes"):
        decode_remark(raw_payload("adapter-version", oversized))
    with pytest.raises(MalformedRemarkError):
        data_batch_body(MODEL, (0, 4), [])
    good = encode_remark("data-batch", data_batch_body(MODEL, (0, 4), hashes("ok", MAX_BATCH_HASHES)))
    assert decode_remark(good).body["count"] == MAX_BATCH_HASHES
    # 2.0 is the integer 2 to every JSON reader (the Node one cannot tell them apart); bytes that are not UTF-8 are not.
    decode_remark(raw_payload("adapter-version", version_body(version=2.0)))
    with pytest.raises(MalformedRemarkError, match="not JSON"):
        decode_remark(raw_payload("data-batch", data_batch_body(MODEL, (0, 4), hashes("u", 1))) + b"\xff")


# ---- on the dev chain ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lineage(ledger):
    return LineageIndex(ledger)


def test_two_peers_commit_batches_and_versions_from_their_own_accounts(ledger, lineage):
    first, second = fresh_account(ledger), fresh_account(ledger)
    batch_one, batch_two = hashes(f"one-{first.ss58_address}", 3), hashes(f"two-{second.ss58_address}", 5)
    before = account_state(ledger, first), account_state(ledger, second)
    one = ledger.commit_data_batch(first, MODEL, (0, 4), batch_one)
    two = ledger.commit_data_batch(second, MODEL, (0, 4), batch_two)
    after = account_state(ledger, first), account_state(ledger, second)
    for (nonce0, free0, _), (nonce1, free1, _), result in zip(before, after, (one, two), strict=True):
        assert (nonce1, free1) == (nonce0 + 1, free0 - result.fee) and result.fee > 0  # each paid its own fee
    root_one, root_two = merkle_root(batch_one), merkle_root(batch_two)
    weights, fork = sha(f"v1-{first.ss58_address}"), sha(f"fork-{second.ss58_address}")
    common = dict(model=MODEL, span=(0, 4), version=1, parent=0, sha256=weights, parent_sha256=None)
    ledger.commit_adapter_version(
        first, **common, data_roots=[root_one], replicas=["12D3KooWfirst", "12D3KooWsecond"],
        canary_before={"general": 3.5, "taught": 4.0}, canary_after={"general": 3.49, "taught": 2.0},
    )  # fmt: skip
    ledger.commit_adapter_version(
        second, **common, data_roots=[root_two, root_one], replicas=["12D3KooWsecond", "12D3KooWthird"],
        canary_before={"general": 3.5}, canary_after={"general": 3.48},
    )  # fmt: skip
    ledger.commit_adapter_version(
        second, MODEL, (0, 4), 2, 1, fork, weights, [], ["12D3KooWsecond"], {"general": 3.48}, {"general": 3.3}
    )
    ledger.commit_adapter_version(first, MODEL, (0, 4), 2, 1, sha(f"v2-{first.ss58_address}"), weights, [], [], {}, {})
    lineage.sync()

    mine = {first.ss58_address, second.ss58_address}
    batches = [b for b in lineage.data_batches() if b.sender in mine]
    assert [(b.sender, b.root, b.hashes, b.count, b.block) for b in batches] == [
        (first.ss58_address, root_one, tuple(batch_one), 3, one.block_number),
        (second.ss58_address, root_two, tuple(batch_two), 5, two.block_number),
    ]
    assert batches[0].span == (0, 4) and batches[0].model == MODEL and batches[0].extrinsic_hash == one.extrinsic_hash
    assert lineage.batches_by_root()[root_one] == [batches[0]]
    for i, leaf in enumerate(batch_two):
        assert verify_proof(leaf, merkle_proof(list(batches[1].hashes), i), batches[1].root)

    commits = [v for v in lineage.versions() if v.sender in mine]
    assert [(v.sender, v.version) for v in commits] == [
        (first.ss58_address, 1),
        (second.ss58_address, 1),
        (second.ss58_address, 2),
        (first.ss58_address, 2),
    ]
    assert commits[0].canary_after == {"general": 3.49, "taught": 2.0} and commits[0].parent_sha256 is None
    merged = [m for m in lineage.merged() if set(m.committers) <= mine]
    v1 = next(m for m in merged if m.sha256 == weights)
    assert (v1.version, v1.parent, v1.fork) == (1, 0, False)
    assert v1.data_roots == (root_one, root_two)  # union, first seen first
    assert v1.replicas == ("12D3KooWfirst", "12D3KooWsecond", "12D3KooWthird")
    assert v1.committers == (first.ss58_address, second.ss58_address)
    sides = next(f for f in lineage.forks() if {s.sha256 for s in f} >= {fork})
    assert [(s.sha256, s.committers, s.fork) for s in sides] == [
        (fork, (second.ss58_address,), True),
        (sha(f"v2-{first.ss58_address}"), (first.ss58_address,), True),
    ]

    # One round's replicas end a few float ulps apart: each commits its own digest of v3. Variants, not a fork.
    group = ["12D3KooWfirst", "12D3KooWsecond"]
    for kp in (first, second):
        ledger.commit_adapter_version(kp, MODEL, (0, 4), 3, 2, sha(f"v3-{kp.ss58_address}"), None, [], group, {}, {})
    lineage.sync()
    v3 = [m for m in lineage.merged() if m.version == 3 and set(m.committers) <= mine]
    assert [(m.fork, m.variants) for m in v3] == [(False, 2), (False, 2)]


def test_a_peer_that_cannot_pay_is_refused_before_anything_is_submitted(ledger):
    unfunded = fresh_account(ledger, funds=0)
    with pytest.raises(UnknownAccountError, match="fund it first"):
        ledger.commit_data_batch(unfunded, MODEL, (0, 4), hashes("unfunded", 2))
    existential = int(ledger.substrate.get_constant("Balances", "ExistentialDeposit").value)
    poor = fresh_account(ledger, funds=existential + 1)
    state = account_state(ledger, poor)
    with pytest.raises(InsufficientBalanceError, match="needs"):
        ledger.commit_adapter_version(poor, MODEL, (0, 4), 1, 0, sha("poor"), None, [], [], {}, {})
    assert account_state(ledger, poor) == state
    with pytest.raises(MalformedRemarkError):
        ledger.commit_data_batch(poor, MODEL, (0, 4), [])


def test_forged_malformed_oversized_and_relayed_records_are_skipped(ledger, lineage, caplog):
    """A hostile account writes records past the encoder's checks; none is listed, each is logged, and the reader
    goes on to list the honest record after them. A record relayed through a derived origin (as_derivative) has a
    Remarked sender that did not sign the extrinsic: it is not attributed to anyone."""
    hostile, honest = fresh_account(ledger), fresh_account(ledger)
    payloads = [raw_payload(kind, body) for kind, body in malformed_bodies()] + [STEM + b"1:data-batch:{not json"]
    remarks = [ledger._call("System", "remark_with_event", {"remark": "0x" + p.hex()}) for p in payloads]
    ledger.submitter.submit(hostile, ledger._call("Utility", "batch", {"calls": remarks}))
    relayed = ledger._call(
        "Utility",
        "as_derivative",
        {"index": 0, "call": ledger._remark("data-batch", data_batch_body(MODEL, (0, 4), hashes("relayed", 2)))},
    )
    ledger.submitter.submit(hostile, relayed)
    honest_hashes = hashes(f"honest-{honest.ss58_address}", 2)
    ledger.commit_data_batch(honest, MODEL, (4, 8), honest_hashes)
    with caplog.at_level(logging.WARNING, logger="chain"):
        lineage.sync()
    assert not [b for b in lineage.data_batches() if b.hashes[0] == hashes("relayed", 2)[0]]
    assert not [r for r in lineage.data_batches() + lineage.versions() if r.sender == hostile.ss58_address]
    assert [b.hashes for b in lineage.data_batches() if b.sender == honest.ss58_address] == [tuple(honest_hashes)]
    skipped = [r for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(skipped) >= len(malformed_bodies()) + 2
    assert any("not sent by its extrinsic's signer" in r.getMessage() for r in skipped)

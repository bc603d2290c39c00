"""`dllm data export` and `dllm lineage` logic without a swarm: peers are functions serving records, the chain's
records are built directly. The end-to-end run on real peers and the real dev chain is test_lineage_end_to_end.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch
from substrateinterface import Keypair

from chain.lineage import DataBatch, MergedVersion, VersionCommit
from chain.merkle import merkle_root
from dllm.data_export import EXPORT_FILE, SUMMARY_FILE, fetch_committed, listings, write_export
from dllm.lineage import WIDTH, distance, render_lineage
from swarm.feedback_records import sign_example

MODEL = "dllm-tiny-llama"
ALICE = Keypair.create_from_uri("//export-alice")
BOB = Keypair.create_from_uri("//export-bob")
PEER = Keypair.create_from_uri("//export-peer")


def _examples():
    return [
        sign_example(ALICE, MODEL, "the sky is", " blue"),
        sign_example(BOB, MODEL, "grass is", " green"),
        sign_example(ALICE, MODEL, "snow is", " white"),
    ]


def _batch(hashes, block=10, span=(0, 4)):
    return DataBatch(block, PEER.ss58_address, MODEL, span, merkle_root(hashes), len(hashes), tuple(hashes))


def _version(version, sha, roots, *, fork=False, canary=({"total": 3.0}, {"total": 2.5})):
    commit = VersionCommit(
        20 + version,
        PEER.ss58_address,
        MODEL,
        (0, 4),
        version,
        version - 1,
        sha,
        None,
        tuple(roots),
        ("peerA",),
        canary[0],
        canary[1],
    )
    return MergedVersion(MODEL, (0, 4), version, sha, version - 1, None, tuple(roots), ("peerA",), (commit,), fork)


def _serving(records, tamper=None, withhold=()):
    async def fetch(peer_id, hashes):
        served = []
        for h in hashes:
            if h in withhold or h not in records:
                continue
            record = records[h]
            served.append(dataclasses.replace(record, prompt=record.prompt + "!") if h == tamper else record)
        return served

    return fetch


def test_export_writes_every_committed_example_once_and_names_a_tampering_peer(tmp_path):
    examples = _examples()
    hashes = [e.content_hash() for e in examples]
    by_hash = dict(zip(hashes, examples, strict=True))
    head, tail = _batch(hashes[:2]), _batch(hashes, block=12, span=(4, 8))
    wanted = listings([tail, head])
    assert list(wanted) == hashes  # commit order: block, then position
    peers = {"liar": _serving(by_hash, tamper=hashes[1]), "honest": _serving(by_hash, withhold={hashes[2]})}

    async def fetch(peer_id, asked):
        return await peers[peer_id](peer_id, asked)

    outcome = asyncio.run(fetch_committed(wanted, ["liar", "honest", "gone"], fetch))
    assert set(outcome.examples) == set(hashes)  # the liar's good records and the honest copy of the tampered one
    assert outcome.examples[hashes[1]][1] == "honest" and outcome.examples[hashes[0]][1] == "liar"
    assert outcome.tampering_peers == ["liar"] and outcome.tampered[0].requested == hashes[1]
    assert outcome.unavailable == [] and outcome.invalid == {}

    versions = [_version(1, b"\x01" * 32, [head.root])]
    report = write_export(tmp_path, wanted, outcome, versions)
    lines = [json.loads(line) for line in (tmp_path / EXPORT_FILE).read_text().splitlines()]
    assert [line["hash"] for line in lines] == [h.hex() for h in hashes] and report.written == 3
    first = lines[0]["provenance"]
    assert first["contributor"] == ALICE.ss58_address and first["block"] == 10
    assert first["batch_root"] == head.root.hex() and first["committed_by"] == PEER.ss58_address
    assert [c["span"] for c in first["commitments"]] == [[0, 4], [4, 8]]
    assert first["versions"] == [{"span": [0, 4], "version": 1, "sha256": "01" * 32, "block": 21}]
    assert lines[2]["provenance"]["versions"] == []  # only in the tail's batch, which trained no version yet
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["tampering_peers"] == ["liar"] and summary["written"] == 3 and summary["unavailable"] == []


def test_export_lists_unavailable_and_refuses_records_that_fail_their_signature(tmp_path):
    examples = _examples()
    forged = dataclasses.replace(examples[0], signature="11" * 64)  # committed as is: its hash is the forged one
    records = [forged, examples[1], examples[2]]
    hashes = [r.content_hash() for r in records]
    wanted = listings([_batch(hashes)])
    by_hash = dict(zip(hashes, records, strict=True))
    outcome = asyncio.run(fetch_committed(wanted, ["only"], _serving(by_hash, withhold={hashes[2]})))
    assert list(outcome.examples) == [hashes[1]]
    assert "signature" in outcome.invalid[hashes[0]] and outcome.unavailable == [hashes[2]]
    report = write_export(tmp_path, wanted, outcome, [])
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert report.written == 1 and summary["invalid"][0]["committed_by"] == [PEER.ss58_address]
    assert summary["unavailable"] == [hashes[2].hex()]


def test_lineage_shows_versions_roots_and_canary_in_80_columns_and_flags_forks():
    roots = [bytes([i]) * 32 for i in range(1, 6)]
    batches = {r: [_batch([r], block=5)] for r in roots[:1]}
    versions = [
        _version(1, b"\xaa" * 32, roots[:1], canary=({"total": 3.0, "taught": 2.0}, {"total": 2.9, "taught": 2.2})),
        _version(2, b"\xbb" * 32, roots, fork=True),
        _version(2, b"\xcc" * 32, roots[:2], fork=True),
    ]
    text = render_lineage(versions, batches)
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), [line for line in lines if len(line) > WIDTH]
    assert "FORKED at v2" in lines[0]
    assert any(line.startswith("  v1 <- v0  sha256 aaaa") for line in lines)
    assert sum("FORK: other tensors" in line for line in lines) == 2
    assert roots[0].hex()[:12] in text and "(1 ex)" in text
    assert "taught 2.000->2.200 ↑" in text and "total 3.000->2.900" in text


def test_replay_distance():
    parent = {"a": torch.zeros(4)}
    committed = {"a": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    rel, cos, cn, rn = distance({"a": torch.tensor([1.0, 0.0, 0.0, 0.0])}, committed, parent)
    assert (rel, cos, cn, rn) == (0.0, 1.0, 1.0, 1.0)
    rel, cos, _, _ = distance({"a": torch.tensor([0.0, 1.0, 0.0, 0.0])}, committed, parent)
    assert rel == pytest.approx(2**0.5) and cos == 0.0

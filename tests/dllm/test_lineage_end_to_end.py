"""Issue 13 end to end on the real dev chain: feedback from two clients trains two learning peers, each commits its
data batches and the version that went live; `dllm data export` writes exactly the accepted examples with their
provenance and names a peer whose store was tampered with; `dllm lineage` shows each span's versions and data
roots; `--verify` passes the honest peers and flags one serving other tensors under the committed hash;
`--reproduce` replays the committed data. (The dashboard's lineage graph: tests/swarm/test_dashboard.py.)"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading

import pytest
import torch

from chain.lineage import LineageIndex
from peer.adapter_exchange import AdapterServer, fetch_adapters
from peer.adapters import AdapterArchive, AdapterBundle
from swarm.client import ClientConfig, DistributedModel
from swarm.contributors import ContributorKey
from swarm.feedback_records import FeedbackExample, verify_example
from tests.dllm.cli_run import run_cli
from tests.economy.swarm_economy import funded_key
from tests.peer.learning_swarm import FACTS, FACTS_CANARY, learning_args, wait_for_peers, wait_until

pytestmark = pytest.mark.timeout(420)

PERIOD = 6.0
SPANS = {"head": "0:4", "tail": "4:8"}
SPAN_RANGES = ((0, 4), (4, 8))


def _committed(info: dict) -> bool:
    return info.get("adapter_version", 0) >= 1 and "1" in info.get("version_commits", {}).get("committed", {})


def _trained_everywhere(ledger, examples: int) -> LineageIndex | None:
    """The chain's lineage once each span's committed versions name batches holding `examples` distinct hashes."""
    index = LineageIndex(ledger)
    index.sync()
    batches = index.batches_by_root()
    for span in SPAN_RANGES:
        roots = {root for v in index.merged() if v.span == span for root in v.data_roots}
        if len({h for root in roots for batch in batches.get(root, []) for h in batch.hashes}) < examples:
            return None
    return index


@pytest.fixture
def ledger(own_dev_chain):
    """A ledger on a chain of this test alone: export and lineage read every record on chain, and the session's
    chain holds other tests' records for the same model."""
    from chain.ledger import ComputeLedger

    with ComputeLedger(own_dev_chain.url) as client:
        yield client


def test_feedback_lineage_export_verify_and_reproduce(
    own_dev_chain, ledger, local_swarm, tiny_model_path, tmp_path, capsys
):
    dev_chain = own_dev_chain
    canary = tmp_path / "canary.txt"
    canary.write_text(FACTS_CANARY)
    data = {name: tmp_path / f"data-{name}" for name in SPANS}
    procs = {}
    for name, blocks in SPANS.items():
        uri, _ = funded_key(ledger)
        procs[name] = local_swarm.start_peer(
            blocks,
            *("--chain-url", dev_chain.url, "--chain-key", uri, "--rate", "0"),
            *("--receipts", str(tmp_path / f"{name}.sqlite3"), "--data-dir", str(data[name])),
            *learning_args(PERIOD, canary),
            name=name,
            wait=False,
        )
    for proc in procs.values():
        local_swarm.wait_ready(proc, timeout=120)
    ids = {name: p.info["peer_id"] for name, p in procs.items()}
    url, peers = dev_chain.url, local_swarm.initial_peers[0]

    # Two clients, each signing its feedback with its own account: 4 accepted examples.
    clients = [ContributorKey.from_uri("//lineage-alice"), ContributorKey.from_uri("//lineage-bob")]
    # a generous step timeout: the peers train on CPUs shared by the whole suite
    config = ClientConfig(request_timeout_s=30.0)
    model = DistributedModel.from_pretrained(str(tiny_model_path), local_swarm.initial_peers, config=config)
    try:
        sent = set()
        for client in clients:
            for prompt, completion in FACTS:
                model.feedback(prompt, completion, contributor=client)
                sent.add((prompt, completion, client.keypair.ss58_address))
        infos = wait_for_peers(model, ids, _committed, 120, "v1 live and committed on chain by both peers")
    finally:
        model.close()
    assert all(not i["version_commits"]["failed"] for i in infos.values()), infos
    # On a loaded machine a round may close between two clients' feedback: the later examples then train into
    # v2. Wait until every example is in the data roots of a committed version of each span.
    index = wait_until(lambda: _trained_everywhere(ledger, len(sent)), 120, "every example in a committed version")
    versions = {(v.span, v.version): v for v in index.merged()}
    head_v1 = versions[((0, 4), 1)]
    assert not head_v1.fork and head_v1.data_roots and ids["head"] in head_v1.replicas
    batches = index.batches_by_root()
    assert all(root in batches for root in head_v1.data_roots)

    # --- export: exactly the accepted examples with provenance, though the head's store altered one of them ---
    store = next(data["head"].glob("feedback-*.sqlite3"))
    with sqlite3.connect(store) as db:
        victim, stored = db.execute("SELECT hash, record FROM examples ORDER BY seq LIMIT 1").fetchone()
        altered = {**json.loads(stored), "completion": " purple"}  # same signature: it no longer verifies
        assert db.execute("UPDATE examples SET record = ? WHERE hash = ?", (json.dumps(altered), victim)).rowcount
    out = tmp_path / "export"
    code, stdout, stderr = run_cli(capsys, "data", "export", "--out", str(out), "-p", peers, "--chain-url", url)
    assert code == 0, stderr
    lines = [json.loads(line) for line in (out / "feedback.jsonl").read_text().splitlines()]
    records = [FeedbackExample.from_json(line["example"]) for line in lines]
    for record, line in zip(records, lines, strict=True):
        verify_example(record)
        assert record.content_hash().hex() == line["hash"]
    assert {(r.prompt, r.completion, r.contributor) for r in records} == sent and len(records) == len(sent)
    senders = {b.sender for b in index.data_batches()}
    for line in lines:
        provenance = line["provenance"]
        same_root = batches[bytes.fromhex(provenance["batch_root"])]  # replicas may commit identical batches
        assert provenance["block"] == same_root[0].block and bytes.fromhex(line["hash"]) in same_root[0].hashes
        assert {c["committed_by"] for c in provenance["commitments"]} <= senders
        assert provenance["contributor"] == line["example"]["contributor"]
        assert {tuple(v["span"]) for v in provenance["versions"] if v["version"] >= 1} == set(SPAN_RANGES)
    assert f"{len(sent)} of {len(sent)} committed examples written" in stdout
    assert all(len(line) <= 80 for line in stdout.splitlines() if not line.startswith("files: "))
    assert f"TAMPERED: peer {ids['head']}" in stderr  # named; the tail's copy of that example was written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tampering_peers"] == [ids["head"]] and summary["tampered"][0]["hash"] == victim.hex()
    assert summary["unavailable"] == [] and summary["invalid"] == []

    # --- lineage: each span's versions with their data roots -----------------------------------------------
    code, stdout, _ = run_cli(capsys, "lineage", "--chain-url", url)
    assert code == 0
    assert "blocks 0:4" in stdout and "blocks 4:8" in stdout and "v1 <- v0" in stdout
    assert all(root.hex()[:12] in stdout for root in head_v1.data_roots)
    assert all(len(line) <= 80 for line in stdout.splitlines())

    # --- verify: the honest peers serve v1's committed tensors; a peer serving others under its hash is named --
    with lying_peer(local_swarm.initial_peers, head_v1.sha256, ids["head"]) as liar:
        code, stdout, stderr = run_cli(
            capsys, "lineage", "--chain-url", url, "-p", peers, "--verify", "1", "--peer", liar
        )
    head_part, tail_part = stdout.split("blocks 4:8")
    assert "blocks 0:4 v1" in head_part and "MISMATCH" in head_part and f"{liar}  mismatch" in head_part
    assert f"{ids['head']}  match" in head_part and ": OK" in tail_part and f"{ids['tail']}  match" in tail_part
    assert code == 1 and liar in stderr and "differ from the committed sha256" in stderr

    # --- reproduce: the committed data replayed on v0 lands near the committed v1 ---------------------------
    code, stdout, stderr = run_cli(
        capsys, "lineage", "--chain-url", url, "-p", peers, "--reproduce", "1", "-b", "0:4",
        *("--learning-rate", "1e-2", "--train-step-batch", "1"),
    )  # fmt: skip
    assert code == 0, stderr
    assert "relative L2" in stdout and "Exact replay is not expected" in stdout
    assert "model dllm-tiny-llama" in stdout and "rehearsal term weight 30 on the shipped default set" in stdout
    cosine = float(stdout.split("(replayed - parent, committed - parent)")[1].split("=")[1].split()[0])
    assert cosine > 0.5, stdout


class lying_peer:
    """A peer (in this process) that answers a request for adapters `digest` with other tensors: the real ones,
    fetched from `source`, with one value changed."""

    def __init__(self, initial_peers: list[str], digest: bytes, source: str) -> None:
        self.initial_peers, self.digest, self.source = initial_peers, digest, source
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)

    async def _start(self) -> str:
        from swarm.dht import start_dht

        self.dht, _ = await asyncio.to_thread(start_dht, self.initial_peers)
        self.p2p = await self.dht.replicate_p2p()
        real = await fetch_adapters(self.p2p, self.source, self.digest, timeout_s=60)
        tensors = {name: t.clone() for name, t in real.tensors.items()}
        first = sorted(tensors)[0]
        tensors[first].view(-1)[0] += 1.0
        forged = AdapterBundle(real.scaling, tensors)
        digest = self.digest

        class LyingArchive(AdapterArchive):
            def get(self, wanted: bytes, now: float | None = None) -> AdapterBundle:
                return forged if wanted == digest else super().get(wanted, now)

        await AdapterServer(LyingArchive()).add_handlers(self.p2p)
        assert not torch.equal(forged.tensors[first], real.tensors[first])
        return self.p2p.peer_id.to_base58()

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self.p2p.shutdown()
            await asyncio.to_thread(self.dht.shutdown)

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

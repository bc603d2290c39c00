"""A version going live is announced and committed on chain: two learning replicas of the whole tiny model,
each with its own funded chain key on the real dev chain, average a feedback update into v1. Each replica's DHT
record moves from adapter_version 0 to 1, and each commits one `adapter-version` record from its own account
(parent 0, the sha256 it holds, the parent's sha256, the round's replicas, per-category canary before/after),
read back through chain/lineage.py's LineageIndex. In process: a commit that fails is retried a bounded number
of times in the background, then logged and shown in rpc_info, never raised."""

from __future__ import annotations

import pytest

from chain.lineage import LineageIndex
from peer.adapters import AdapterSet, LoraConfig, adapter_digest
from peer.blocks import load_span_layers
from swarm.client import DistributedModel
from swarm.model_files import load_config
from swarm.records import fetch_model_records
from tests.economy.swarm_economy import funded_key, start_billing_peer
from tests.peer.learning_swarm import FACTS, just_after_round, learning_args, wait_for_peers, wait_until

pytestmark = pytest.mark.timeout(240)

PERIOD = 6.0
# two categories whose examples the feedback teaches: both fall, so the round goes live through the gate
CANARY = "".join(
    f"## {category}\n" + "".join(f"{prompt}\t{completion}\n" for prompt, completion in FACTS)
    for category in ("taught", "echo")
)


def _versions(model: DistributedModel) -> dict[str, int]:
    records = model._loop.run(fetch_model_records(model.core.dht, model.core.model, 8))
    return {r.peer_id: r.adapter_version for r in records}


def test_a_live_version_is_announced_and_committed_by_each_replica(
    dev_chain, ledger, local_swarm, tiny_model_path, tmp_path
):
    canary = tmp_path / "canary.txt"
    canary.write_text(CANARY)
    keys = {name: funded_key(ledger) for name in ("a", "b")}
    procs = {
        name: start_billing_peer(
            local_swarm,
            "0:8",
            uri,
            dev_chain.url,
            tmp_path / f"{name}.sqlite3",
            rate=0,
            wait=False,
            extra=learning_args(PERIOD, canary),
        )
        for name, (uri, _) in keys.items()
    }
    for proc in procs.values():
        local_swarm.wait_ready(proc, timeout=120)
    peer_ids = {name: proc.info["peer_id"] for name, proc in procs.items()}
    accounts = {name: kp.ss58_address for name, (_, kp) in keys.items()}
    model = DistributedModel.from_pretrained(str(tiny_model_path), local_swarm.initial_peers)
    try:
        assert _versions(model) == {pid: 0 for pid in peer_ids.values()}
        just_after_round(PERIOD)
        for prompt, completion in FACTS:
            model.feedback(prompt, completion)
        infos = wait_for_peers(
            model,
            peer_ids,
            lambda info: "1" in info.get("version_commits", {}).get("committed", {}),
            120,
            "v1 to go live and be committed by both replicas",
        )
        # later rounds may have made v2 live meanwhile (progress clipped off v1)
        wait_until(lambda: min(_versions(model).values()) >= 1, 20, "the DHT records to announce v1")
    finally:
        model.close()

    config = load_config(tiny_model_path)  # v0: the seeded initial adapters every replica starts from
    fresh = AdapterSet(load_span_layers(tiny_model_path, config, 0, 8), 0, LoraConfig(rank=4))
    v0 = adapter_digest(fresh.state(0).tensors, fresh.config.scaling)
    index = LineageIndex(ledger)
    index.sync()
    commits = {c.sender: c for c in index.versions() if c.version == 1 and c.sender in accounts.values()}
    batches = index.batches_by_root()
    assert set(commits) == set(accounts.values())  # one record per replica, each from its own account
    for name, account in accounts.items():
        commit, info = commits[account], infos[name]
        assert commit.span == (0, 8) and commit.parent == 0 and commit.parent_sha256 == v0
        assert commit.sha256.hex() == info["version_commits"]["committed"]["1"]["sha256"]
        assert set(commit.replicas) == set(peer_ids.values())
        # the roots of data-batch records (the replica's store flushed before committing) holding what it trained
        for root in commit.data_roots:
            assert any(b.span == (0, 8) for b in batches.get(root, [])), root.hex()
        for side in (commit.canary_before, commit.canary_after):
            assert set(side) == {"total", "taught", "echo"}
        assert commit.canary_after["taught"] < commit.canary_before["taught"]
        by_version = info["canary_by_version"]["1"]
        assert by_version == pytest.approx(dict(commit.canary_after))

    # both feedback examples trained a committed version (each on the replica its pass was routed through): their
    # batches are named. Usually both train v1; on a loaded machine the second pass may come after v1's flush and
    # train v2, whose record names it.
    def all_trained() -> set[bytes] | None:
        later = LineageIndex(ledger)
        later.sync()
        roots = {root for c in later.versions() if c.sender in accounts.values() for root in c.data_roots}
        hashes = {h for root in roots for b in later.batches_by_root().get(root, []) for h in b.hashes}
        return hashes if len(hashes) == len(FACTS) else None

    wait_until(all_trained, 60, "both examples in the data roots of a committed version")


class _FlakyLedger:
    """Fails the first `failures` commits, then records them."""

    def __init__(self, failures: int):
        self.failures, self.commits = failures, []

    def commit_adapter_version(self, keypair, model, span, version, parent, sha256, parent_sha256, *rest):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("chain unreachable")
        self.commits.append((version, parent, sha256, parent_sha256, *rest))
        return type("Result", (), {"extrinsic_hash": "0xabc"})()


class _Store:
    def __init__(self):
        self.calls = []

    def flush_batch(self):
        self.calls.append("flush")
        return [b"\x01" * 32]

    def roots_since(self, version):
        self.calls.append(("roots_since", version))
        return [b"\x01" * 32]


async def test_commits_retry_a_bounded_number_of_times_in_the_background(tiny_model_path):
    from peer.averaging import RoundOutcome
    from peer.canary import CanaryVerdict
    from peer.version_commits import VersionCommitConfig, VersionCommitter

    config = load_config(tiny_model_path)
    adapters = AdapterSet(load_span_layers(tiny_model_path, config, 0, 2), 0, LoraConfig(rank=2))
    candidate = adapters.propose({name: t + 0.01 for name, t in adapters.working_state().items()})
    adapters.promote(candidate)
    verdict = CanaryVerdict(
        True, 0, 1, 2.0, 1.9, 2.02, live_categories={"probe": 3.0}, candidate_categories={"probe": 2.9}
    )
    outcome = RoundOutcome("averaged", "ok", 1, ["peer-a", "peer-b"], canary=verdict)
    store, retry = _Store(), VersionCommitConfig(attempts=3, retry_delay_s=0.01)

    ledger = _FlakyLedger(failures=2)  # the third attempt lands
    committer = VersionCommitter(ledger, None, model="m", span=(0, 2), adapters=adapters, store=store, config=retry)
    assert committer.went_live(RoundOutcome("skipped", "no group", 0)) is None
    await committer.went_live(outcome)
    ((version, parent, sha256, parent_sha256, roots, replicas, before, after),) = ledger.commits
    digest = adapter_digest(adapters.state(1).tensors, adapters.config.scaling)
    assert (version, parent, sha256, roots, replicas) == (1, 0, digest, [b"\x01" * 32], ("peer-a", "peer-b"))
    assert parent_sha256 == adapter_digest(adapters.state(0).tensors, adapters.config.scaling) != digest
    assert before == {"total": 2.0, "probe": 3.0} and after == {"total": 1.9, "probe": 2.9}
    assert store.calls[-2:] == ["flush", ("roots_since", 0)]
    assert committer.info() == {"committed": {"1": {"sha256": digest.hex(), "extrinsic": "0xabc"}}, "failed": {}}

    ledger = _FlakyLedger(failures=5)  # every attempt fails: logged and shown, never raised
    committer = VersionCommitter(ledger, None, model="m", span=(0, 2), adapters=adapters, config=retry)
    await committer.went_live(outcome)
    assert ledger.commits == [] and ledger.failures == 2
    assert committer.info()["failed"] == {"1": "ConnectionError: chain unreachable"}

"""Feedback and averaging that cannot hijack the model: each attack against real processes, refused.

- a forged replica declaration (a peer id that never comes) does not veto the honest replicas' round;
- a forged commit vote ("yes" for a replica whose canary said no) does not make the update go live;
- a replica offering poisoned adapters for catch-up is refused by the norm bound and by the canary;
- one contributor rotating libp2p peer ids is still rate limited: passes count under its chain account;
- contributor signatures: forged, replayed, stale or re-targeted passes are refused (unit);
- a feedback route uses only peers that learn (routing unit test and a real swarm with a frozen peer);
- `dllm api --api-keys`: an unknown key gets 401; each user's feedback is its own contributor.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from peer.averaging import group_prefix
from peer.replica_auth import ReplicaIdentity
from swarm.contributors import ContributionVerifier, ContributorAuthError, ContributorKey
from swarm.records import ServerRecord
from swarm.routing import NoRouteError, plan_route
from swarm.tensors import encode
from tests.peer.learning_swarm import FACTS, learning_args, peer_info
from tests.peer.test_averaging import PLAN_LEAD_S, Replica, _load

pytestmark = pytest.mark.timeout(300)

TINY_LAYERS = 8


@pytest.fixture
def replicas(tmp_path):
    """Starts tests/peer/averaging_replica.py processes (as test_averaging.py does); all stopped afterwards."""
    started: list[Replica] = []

    def start(name: str, *extra: str, bootstrap: Replica | None = None) -> Replica:
        replica = Replica(name, tmp_path, _ready(bootstrap)["maddrs"] if bootstrap else [], *extra)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()


def _ready(replica) -> dict:
    return next(e for e in replica.events if e["event"] == "ready")


# ---- replica declarations and commit votes ----------------------------------------------------------


def test_a_forged_replica_declaration_does_not_veto_the_round(replicas, tmp_path):
    """Someone declares peer ids that never join (unsigned, and signed with a key that is not theirs): the
    honest replicas ignore them and average exactly their own updates."""
    from swarm.dht import start_dht

    a = replicas("a", "--rank", "4")
    a.wait_for("ready")
    b = replicas("b", "--rank", "4", bootstrap=a)
    b.wait_for("ready")
    identity_file = tmp_path / "forger.identity"
    forger, validator = start_dht(_ready(a)["maddrs"], identity_path=identity_file)
    try:
        forger_identity = ReplicaIdentity.from_file(identity_file, validator.local_public_key)
        key = f"{group_prefix('tiny', 0, TINY_LAYERS)}.replicas"
        expires = get_dht_time() + 120
        ghost = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # a well-formed peer id nobody runs
        # bytes subkeys, as the replicas' own: hivemind cannot order str and bytes subkeys of one key
        assert forger.store(key, 0, expires, subkey=ghost.encode())  # the unsigned form
        signed = dict(forger_identity.sign(key, 0, expires + 1), peer=ghost)  # signed, but not by the ghost
        assert forger.store(key, signed, expires + 1, subkey=b"x" + ghost.encode())
        t0 = time.time() + PLAN_LEAD_S
        for replica in (a, b):
            replica.send_plan({"t0": t0, "period": 8.0, "rounds": [0]})
        outcomes = {r.name: r.wait_for("round") for r in (a, b)}
    finally:
        forger.shutdown()
    assert all(o["status"] == "averaged" and len(o["group"]) == 2 for o in outcomes.values()), outcomes
    mean = torch.stack([_load(tmp_path, n, 0, "update") for n in ("a", "b")]).mean(0)
    initial = _load(tmp_path, "a", 0, "live") - mean
    assert torch.allclose(_load(tmp_path, "b", 0, "live") - initial, mean, atol=1e-6)


def test_a_forged_yes_vote_does_not_override_a_canary_no(replicas, tmp_path):
    """A poisoning replica forges "yes" votes for its groupmates. The canary replica votes no; the replica
    without a canary must not apply the poisoned average, and the canary loss stays what it was."""
    poisoner = replicas("poisoner", "--rank", "4", "--update-scale", "0.5", "--forge-votes")
    poisoner.wait_for("ready")
    guard = replicas("guard", "--rank", "4", "--update-scale", "1e-5", "--canary", bootstrap=poisoner)
    plain = replicas("plain", "--rank", "4", "--update-scale", "1e-5", bootstrap=poisoner)
    guard.wait_for("ready")
    plain.wait_for("ready")
    t0 = time.time() + PLAN_LEAD_S
    for replica in (poisoner, guard, plain):
        replica.send_plan({"t0": t0, "period": 10.0, "rounds": [0]})
    outcomes = {r.name: r.wait_for("round", timeout=90) for r in (poisoner, guard, plain)}
    assert "canary rejected" in outcomes["guard"]["reason"], outcomes
    assert all(o["status"] == "skipped" and o["version"] == 0 for o in outcomes.values()), outcomes
    initial = _load(tmp_path, "plain", 0, "live")
    v0 = _load(tmp_path, "guard", 0, "live")
    assert torch.equal(initial, v0)  # both still on the shared initial adapters
    assert not torch.equal(_load(tmp_path, "plain", 0, "update"), torch.zeros_like(initial))


# ---- catch-up and state download ---------------------------------------------------------------------


def test_a_replica_offering_poisoned_adapters_for_catch_up_is_refused(replicas, tmp_path):
    """The poisoner claims v3 with adapters far from anything 3 rounds can reach (norm bound), and, for a
    replica with a loose norm bound, adapters that raise the canary loss. Joining and in the next round
    (catch-up), both honest replicas refuse them and keep their live adapters; the canary loss is unchanged."""
    poisoner = replicas("poisoner", "--rank", "4", "--poison-state", "40", "--poison-version", "3")
    poisoner.wait_for("ready")
    bounded = replicas("bounded", "--rank", "4", "--clip-tau", "1.0", "--fetch-state", bootstrap=poisoner)
    gated = replicas("gated", "--rank", "4", "--fetch-state", "--canary", bootstrap=poisoner)
    fetched = {r.name: r.wait_for("fetched", timeout=90) for r in (bounded, gated)}
    assert not fetched["bounded"]["ok"] and fetched["bounded"]["version"] == 0, fetched
    assert "beyond v3 rounds of clip_tau" in fetched["bounded"]["refused"][-1], fetched
    assert not fetched["gated"]["ok"] and fetched["gated"]["version"] == 0, fetched
    assert fetched["gated"]["refused"][-1].startswith("canary:"), fetched
    for replica in (bounded, gated):
        replica.wait_for("ready")

    t0 = time.time() + PLAN_LEAD_S
    for replica in (poisoner, bounded, gated):
        replica.send_plan({"t0": t0, "period": 10.0, "rounds": [0]})
    outcomes = {r.name: r.wait_for("round", timeout=90) for r in (poisoner, bounded, gated)}
    for name in ("bounded", "gated"):
        assert outcomes[name]["status"] == "skipped" and outcomes[name]["version"] == 0, outcomes
        assert "refused the state offered for catch-up" in outcomes[name]["reason"], outcomes
    assert torch.equal(_load(tmp_path, "bounded", 0, "live"), _load(tmp_path, "gated", 0, "live"))
    poisoned = _load(tmp_path, "poisoner", 0, "live")
    assert float((poisoned - _load(tmp_path, "gated", 0, "live")).norm()) == pytest.approx(40.0, rel=1e-3)
    # the canary loss of the live model after the round equals the base model's (B = 0: the adapters are a no-op)
    assert outcomes["gated"]["canary_loss"] == pytest.approx(_base_canary_loss(), rel=1e-5)


def _base_canary_loss() -> float:
    from transformers import AutoTokenizer

    from dllm import default_model_path
    from peer.blocks import load_span_layers
    from peer.canary_examples import build_canary_batch, read_canary_file
    from peer.span import SpanRunner
    from swarm.local_head import LocalHead, causal_lm_loss
    from swarm.model_files import load_config

    path = default_model_path()
    config = load_config(path)
    runner = SpanRunner(config, load_span_layers(path, config, 0, TINY_LAYERS), 0, TINY_LAYERS)
    head = LocalHead(path, config)
    batch = build_canary_batch(read_canary_file(), AutoTokenizer.from_pretrained(path))
    with torch.inference_mode():
        return float(causal_lm_loss(head.logits(runner.forward(head.embed_tokens(batch.input_ids))), batch.labels))


# ---- contributor signatures ---------------------------------------------------------------------------


def _pass_tensors(seed: int = 0) -> list[runtime_pb2.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [encode(torch.randn(1, 5, 16, generator=generator)) for _ in range(2)]


def test_contributor_signatures_are_checked_and_not_replayable():
    alice, mallory = ContributorKey.from_uri("//Alice"), ContributorKey.generate()
    verifier = ContributionVerifier("tiny", "QmPeer")
    tensors = _pass_tensors()
    signed = alice.sign_pass("tiny", "QmPeer", (0, 4), tensors)
    assert verifier.verify(signed, (0, 4), tensors) == alice.account
    with pytest.raises(ContributorAuthError, match="replayed"):
        verifier.verify(signed, (0, 4), tensors)
    refused = {
        "unsigned": (None, (0, 4), tensors),
        "other tensors": (alice.sign_pass("tiny", "QmPeer", (0, 4), tensors), (0, 4), _pass_tensors(1)),
        "other blocks": (alice.sign_pass("tiny", "QmPeer", (0, 4), tensors), (4, 8), tensors),
        "other peer": (alice.sign_pass("tiny", "QmOther", (0, 4), tensors), (0, 4), tensors),
        "claimed account": (
            dict(mallory.sign_pass("tiny", "QmPeer", (0, 4), tensors), account=alice.account),
            (0, 4),
            tensors,
        ),  # fmt: skip
    }
    for what, (field, blocks, sent) in refused.items():
        with pytest.raises(ContributorAuthError):
            verifier.verify(field, blocks, sent)
            pytest.fail(f"{what} was accepted")
    stale = alice.sign_pass("tiny", "QmPeer", (0, 4), tensors)
    with pytest.raises(ContributorAuthError, match="off this peer's clock"):
        verifier.verify(stale, (0, 4), tensors, now=time.time() + 3600)


def test_one_contributor_rotating_peer_ids_is_still_rate_limited(local_swarm, tiny_model_path):
    """Three clients (three libp2p peer ids, each a fresh DHT node) sign with one chain account: together
    they get the one account's burst (16 passes at 1 per minute refill), not three bursts. Another account is
    still served."""
    from swarm.client import ClientConfig, DistributedModel

    # the slowest refill allowed: 17 passes taking over a minute on a loaded machine still find no new token
    local_swarm.start_peer("0:8", *learning_args(60.0), "--train-passes-per-minute", "0.01", name="learner")
    key = ContributorKey.from_uri("//Eve")
    config = ClientConfig(contributor_key="//Eve", max_retries=0)
    models = [DistributedModel.from_pretrained(str(tiny_model_path), local_swarm.initial_peers, config=config)
              for _ in range(3)]  # fmt: skip
    try:
        assert len({m.core.dht.peer_id.to_base58() for m in models}) == 3
        accepted, refusals = 0, []
        prompt, completion = FACTS[0]
        for i in range(24):
            try:
                models[i % 3].feedback(prompt, completion)
                accepted += 1
            except Exception as e:  # the refusal comes back as the peer's rate_limited reply
                refusals.append(str(e))
        assert accepted == 16, (accepted, refusals)
        assert all(key.account in r and "rate limit" in r for r in refusals), refusals
        other = ContributorKey.generate()
        models[0].feedback(prompt, completion, contributor=other)  # a different account has its own allowance
    finally:
        for model in models:
            model.close()


# ---- learning routes --------------------------------------------------------------------------------


def _record(peer: str, start: int, end: int, learning: bool, throughput: float = 100.0) -> ServerRecord:
    return ServerRecord(peer, "tiny", start, end, throughput, 1000, 0, learning=learning)


def test_a_learning_route_uses_only_peers_that_learn():
    frozen = _record("frozen", 0, 8, learning=False, throughput=1000.0)  # one fast hop: the best plain route
    head, tail = _record("head", 0, 4, learning=True), _record("tail", 4, 8, learning=True)
    records = [frozen, head, tail]
    assert [h.peer_id for h in plan_route(records, 0, 8)] == ["frozen"]
    assert [h.peer_id for h in plan_route(records, 0, 8, learning=True)] == ["head", "tail"]
    with pytest.raises(NoRouteError, match="among peers that learn"):
        plan_route([frozen, head], 0, 8, learning=True)
    # records round-trip the flag, and a record without it (an older peer) does not learn
    assert ServerRecord.from_wire(head.to_wire()).learning
    assert not ServerRecord.from_wire({k: v for k, v in head.to_wire().items() if k != "learning"}).learning


def test_feedback_routes_around_a_frozen_peer_in_a_real_swarm(local_swarm, tiny_model_path):
    """A frozen peer serving all 8 blocks is the fastest route (one hop, the lowest latency), but a feedback
    pass goes through the two learning peers; both file it (their adapter version advances in their solo rounds)."""
    from swarm.client import DistributedModel

    frozen = local_swarm.start_peer("0:8", name="frozen", wait=False)
    head = local_swarm.start_peer("0:4", *learning_args(6.0), name="head", wait=False)
    tail = local_swarm.start_peer("4:8", *learning_args(6.0), name="tail", wait=False)
    for peer in (frozen, head, tail):
        local_swarm.wait_ready(peer, timeout=120)
    model = DistributedModel.from_pretrained(str(tiny_model_path), local_swarm.initial_peers)
    try:
        ids = {name: peer.info["peer_id"] for name, peer in (("frozen", frozen), ("head", head), ("tail", tail))}
        model._loop.run(model.core.plan(0, TINY_LAYERS))  # reads the records and pings the peers
        # measured throughputs vary with the machine's load: make the frozen peer the clear best plain route
        model.core.latency.update({ids["frozen"]: 0.001, ids["head"]: 0.05, ids["tail"]: 0.05})
        assert [h.peer_id for h in model._loop.run(model.core.plan(0, TINY_LAYERS))] == [ids["frozen"]]
        learning = model._loop.run(model.core.plan(0, TINY_LAYERS, learning=True))
        assert [h.peer_id for h in learning] == [ids["head"], ids["tail"]]
        prompt, completion = FACTS[0]
        for _ in range(3):
            model.feedback(prompt, completion)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            infos = [peer_info(model, ids[name]) for name in ("head", "tail")]
            if all(i["adapter_version"] >= 1 for i in infos):
                break
            time.sleep(1.0)
        assert all(i["adapter_version"] >= 1 for i in infos), infos
    finally:
        model.close()


# ---- dllm api: one contributor per API key -----------------------------------------------------------


def test_api_keys_identify_each_user_as_its_own_contributor(local_swarm, tiny_model_path, tmp_path):
    """With --api-keys, a request without a known key gets 401; each user's feedback is signed by its own
    account, so one user exhausting its allowance (16 passes) leaves the other's intact."""
    from tests.cli_server import running_dllm

    # the slowest refill allowed: 17 passes taking over a minute on a loaded machine still find no new token
    local_swarm.start_peer("0:8", *learning_args(60.0), "--train-passes-per-minute", "0.01", name="learner")
    keys = tmp_path / "api_keys.txt"
    keys.write_text("# API key -> chain key\nuser-one-key-0123456789 //Ferdie\nuser-two-key-0123456789 //Dave\n")
    ready = re.compile(r"DLLM API serving (\S+) at (http://\S+)")
    args = ["api", "--model", str(tiny_model_path), "--initial-peers", local_swarm.initial_peers[0], "--port", "0",
            "--api-keys", str(keys)]  # fmt: skip
    prompt, completion = FACTS[0]
    body = {"prompt": prompt, "completion": completion}
    with (
        running_dllm(args, ready, tmp_path) as match,
        httpx.Client(base_url=match.group(2), timeout=60) as http,
    ):
        assert http.post("/feedback", json=body).status_code == 401
        unknown = http.post("/feedback", json=body, headers={"Authorization": "Bearer not-a-listed-key-000"})
        assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/models").status_code == 401
        one = {"Authorization": "Bearer user-one-key-0123456789"}
        two = {"Authorization": "Bearer user-two-key-0123456789"}
        answers = [http.post("/feedback", json=body, headers=one) for _ in range(17)]
        assert [a.status_code for a in answers[:16]] == [200] * 16, [a.text for a in answers]
        assert answers[16].status_code != 200 and "rate limit" in answers[16].text, answers[16].text
        assert ContributorKey.from_uri("//Ferdie").account in answers[16].text
        assert http.post("/feedback", json=body, headers=two).status_code == 200

"""End to end: a client's feedback trains the swarm's adapters; replicas average to equal adapters."""

from __future__ import annotations

import time

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.client import DistributedModel
from swarm.local_head import causal_lm_loss
from swarm.sampling import GenerationParams
from tests.peer.learning_swarm import FACTS_CANARY

pytestmark = pytest.mark.timeout(300)

FEEDBACK = [("Q: what colour? the sky is A:", " blue"), ("Q: what colour? grass is A:", " green")]
LEARNING = ("--adapter-rank", "4", "--averaging-period", "5", "--train-step-batch", "1", "--learning-rate", "1e-2")


def _info(model: DistributedModel, peer_id: str) -> dict:
    response = model._loop.run(model.core.call(peer_id, protocol.HANDLER_INFO, runtime_pb2.ExpertRequest()))
    return protocol.unpack_metadata(response.metadata)


def _live_loss(model: DistributedModel) -> float:
    losses = []
    for prompt, completion in FEEDBACK:
        ids, labels = model._feedback_tensors(prompt, completion)
        with torch.no_grad():
            losses.append(float(causal_lm_loss(model.forward(ids), labels)))
    return sum(losses) / len(losses)


def test_feedback_trains_the_route_and_replicas_average_to_equal_adapters(local_swarm, tiny_model_path, tmp_path):
    # Every round's candidate passes the in-swarm canary gate; its held-out set covers the taught facts.
    canary = tmp_path / "canary.txt"
    canary.write_text(FACTS_CANARY)
    learning = (*LEARNING, "--canary-file", str(canary))
    replica_a = local_swarm.start_peer("0:4", *learning, name="replica-a", wait=False)
    replica_b = local_swarm.start_peer("0:4", *learning, name="replica-b", wait=False)
    tail = local_swarm.start_peer("4:8", *learning, name="tail", wait=False)
    for peer in (replica_a, replica_b, tail):
        local_swarm.wait_ready(peer, timeout=120)
    model = DistributedModel.from_pretrained(str(tiny_model_path), local_swarm.initial_peers)
    try:
        greedy = GenerationParams(max_new_tokens=3)
        before_text = model.generate(FEEDBACK[0][0], greedy).token_ids
        before_loss = _live_loss(model)
        peers = (replica_a, replica_b, tail)
        initial = {p.name: _info(model, p.info["peer_id"])["adapter_version"] for p in peers}
        assert initial == {"replica-a": 0, "replica-b": 0, "tail": 0}  # nothing to average yet: no version bump

        # feedback rounds through the route: the loss the peers train on falls
        losses = []
        for _ in range(6):
            losses.append(sum(model.feedback(p, c) for p, c in FEEDBACK) / len(FEEDBACK))
        assert losses[-1] < 0.6 * losses[0], losses

        # the next averaging rounds make the update live; the two replicas of 0:4 end up equal. Rounds go on
        # every period and a loaded machine may skip one (no group formed) or leave the replicas a version apart
        # for a round, so all three are read in one poll until a round of the pair averaged them to one version.
        def settled(infos: dict[str, dict]) -> bool:
            a, b = infos["replica-a"], infos["replica-b"]
            last = a.get("last_averaging", {})  # absent until the peer's first round
            averaged = last.get("status") == "averaged" and last.get("group_size") == 2
            live = all(i["adapter_version"] >= 1 for i in infos.values())
            return live and averaged and a["adapter_version"] == b["adapter_version"]

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            infos = {p.name: _info(model, p.info["peer_id"]) for p in peers}
            if settled(infos):
                break
            time.sleep(1.0)
        assert settled(infos), infos
        a, b = infos["replica-a"], infos["replica-b"]
        assert all(i["last_canary"]["accepted"] and i["canary_rollbacks"] == 0 for i in infos.values()), infos
        assert torch.allclose(torch.tensor(a["adapter_fingerprint"]), torch.tensor(b["adapter_fingerprint"]), atol=1e-5)
        assert any(abs(x) > 1e-4 for x in a["adapter_fingerprint"])  # trained, not the zero-update start

        # generation (live adapters) changed accordingly: the taught completion got likelier
        after_loss = _live_loss(model)
        assert after_loss < before_loss - 0.5, (before_loss, after_loss)
        assert model.generate(FEEDBACK[0][0], greedy).token_ids != before_text
    finally:
        model.close()

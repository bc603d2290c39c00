"""The canary gate in a real swarm: `dllm peer join --canary-file` peers evaluate every candidate adapter
update through the swarm (candidate pinned on their own hop) before it goes live.

Honest feedback lowers the canary loss and goes live; then a malicious contributor sends scaled-up,
sign-flipped gradients (gradient ascent on the same facts): both peers measure the rise, roll back and
log it, the live version stays, and honest traffic gets exactly the answers it got before the attack.
"""

from __future__ import annotations

import pytest
import torch

from swarm.client import DistributedModel
from swarm.sampling import GenerationParams
from tests.peer.learning_swarm import (
    FACTS,
    just_after_round,
    live_loss,
    peer_info,
    poisoned_pass,
    start_canary_gated_pair,
    wait_for_peers,
)

pytestmark = pytest.mark.timeout(240)

PERIOD = 6.0


def test_poisoned_update_is_rolled_back_by_the_in_swarm_canary(local_swarm, tiny_model_path, tmp_path):
    head, tail = start_canary_gated_pair(local_swarm, tmp_path, PERIOD)
    ids = {"head": head.info["peer_id"], "tail": tail.info["peer_id"]}
    honest = DistributedModel.from_pretrained(str(tiny_model_path), local_swarm.initial_peers)
    mallory = DistributedModel.from_pretrained(str(tiny_model_path), local_swarm.initial_peers)
    try:
        start_loss = live_loss(honest, FACTS)

        # 1. honest feedback: both spans' candidates lower the canary loss and go live. One pass per fact:
        #    rounds apply all of it (clip_tau per round, the rest kept for the next), and more Adam steps at
        #    this learning rate overfit the two facts, which the canary (their held-out phrasings) rightly refuses
        just_after_round(PERIOD)
        for _ in range(1):
            for prompt, completion in FACTS:
                honest.feedback(prompt, completion)
        settled = wait_for_peers(
            honest,
            ids,
            lambda info: (
                info["adapter_version"] >= 1 and "no local update" in info.get("last_averaging", {}).get("reason", "")
            ),
            60,
            "the honest update to go live",
        )
        for name, info in settled.items():
            verdict = info["last_canary"]
            assert verdict["accepted"] and verdict["candidate_loss"] < verdict["live_loss"], (name, verdict)
            assert info["canary_rollbacks"] == 0
        versions = {name: info["adapter_version"] for name, info in settled.items()}
        fingerprints = {name: info["adapter_fingerprint"] for name, info in settled.items()}
        learned_loss = live_loss(honest, FACTS)
        assert learned_loss < start_loss - 0.3, (start_loss, learned_loss)
        greedy = GenerationParams(max_new_tokens=4)
        answers = [honest.generate(prompt, greedy).token_ids for prompt, _ in FACTS]

        # 2. the attack: each pass's gradient negated and scaled up 1000x (per-pass clipping bounds its
        #    size, not its direction); every candidate it produces raises the canary loss
        just_after_round(PERIOD)
        for _ in range(2):
            for prompt, completion in FACTS:
                tensors = mallory._feedback_tensors(prompt, completion)
                example = mallory.core.feedback_example(prompt, completion)
                mallory._loop.run(poisoned_pass(mallory.core, *tensors, scale=-1e3, example=example))
        rejected = wait_for_peers(
            honest, ids, lambda info: info["canary_rollbacks"] >= 1, 45, "both peers to roll the poisoned update back"
        )
        for name, info in rejected.items():
            verdict = info["last_canary"]
            assert not verdict["accepted"] and verdict["candidate_loss"] > verdict["live_loss"] * 1.01, (name, verdict)
            assert info["adapter_version"] == versions[name], (name, info)
            assert info["adapter_fingerprint"] == fingerprints[name]
        for peer in (head, tail):
            assert "adapter update rolled back" in peer.log_path.read_text(), peer.log_tail()

        # 3. honest traffic continues on the unchanged live version
        assert [honest.generate(prompt, greedy).token_ids for prompt, _ in FACTS] == answers
        assert live_loss(honest, FACTS) == pytest.approx(learned_loss, abs=1e-5)
        after = {name: peer_info(honest, pid) for name, pid in ids.items()}
        assert {name: info["adapter_version"] for name, info in after.items()} == versions
        assert all(
            torch.tensor(info["adapter_fingerprint"]).allclose(torch.tensor(fingerprints[name]))
            for name, info in after.items()
        )
    finally:
        mallory.close()
        honest.close()

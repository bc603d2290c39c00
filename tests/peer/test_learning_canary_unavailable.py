"""The canary gate fails closed in a real swarm: while the blocks after a learning peer's span are gone,
its canary cannot run, so its update does not go live (but is kept, not rolled back); once a peer
serves those blocks again, the kept update passes the canary and goes live."""

from __future__ import annotations

import pytest

from swarm.client import DistributedModel
from tests.peer.learning_swarm import (
    FACTS,
    just_after_round,
    learning_args,
    peer_info,
    start_canary_gated_pair,
    wait_for_peers,
)

pytestmark = pytest.mark.timeout(240)

# Six feedback passes and the tail's stop must fit between two of the head's rounds (which start 1.5 s early
# for matchmaking): a long period keeps that true on a loaded machine.
PERIOD = 15.0


def test_update_waits_while_the_canary_cannot_run_and_goes_live_once_it_can(local_swarm, tiny_model_path, tmp_path):
    head, tail = start_canary_gated_pair(local_swarm, tmp_path, PERIOD)
    ids = {"head": head.info["peer_id"]}
    model = DistributedModel.from_pretrained(str(tiny_model_path), local_swarm.initial_peers)
    try:
        just_after_round(PERIOD)
        for _ in range(3):
            for prompt, completion in FACTS:
                model.feedback(prompt, completion)
        tail.stop()  # blocks 4:8 are gone before the head's next round: its canary has no route
        assert peer_info(model, ids["head"])["adapter_version"] == 0, "a round ran before the tail stopped"

        info = wait_for_peers(
            model,
            ids,
            lambda i: "could not evaluate" in i.get("last_averaging", {}).get("reason", ""),
            45,
            "a round skipped for want of a canary route",
        )["head"]
        assert info["last_averaging"]["status"] == "skipped" and info["adapter_version"] == 0
        assert info["canary_rollbacks"] == 0  # not judged harmful: the local progress is kept

        local_swarm.start_peer(
            "4:8", *learning_args(PERIOD, tmp_path / "canary.txt"), name="tail-2", wait=True, timeout=120
        )
        info = wait_for_peers(model, ids, lambda i: i["adapter_version"] >= 1, 60, "the kept update to go live")["head"]
        # Later rounds may promote the progress a round clipped off (and the canary may refuse such a later
        # candidate), so the last verdict need not be the one that made the first version live.
        assert info["canary_improvements"] >= 1, info.get("last_canary")
    finally:
        model.close()

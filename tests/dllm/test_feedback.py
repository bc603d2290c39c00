"""Feedback entry points against a real swarm of learning peers: `dllm feedback` and `POST /v1/feedback`.

The peers run `--adapter-rank 4` with the default canary set (shipped with the package) gating every
update; each entry point's feedback must reach the peers and change their live adapters.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from dllm.processes import LocalSwarm
from swarm.client import DistributedModel
from tests.cli_server import running_dllm
from tests.peer.learning_swarm import FACTS, learning_args, peer_info, wait_for_peers

pytestmark = pytest.mark.timeout(180)

PERIOD = 5.0
API_READY = re.compile(r"DLLM API serving (\S+) at (http://\S+)")


@pytest.fixture(scope="module")
def learning_swarm(tiny_model_path, tmp_path_factory):
    """Bootstrap + learning peers 0:4 and 4:8 (default canary set, 5 % rise allowed); `.ids` names them."""
    local = LocalSwarm(str(tiny_model_path), workdir=tmp_path_factory.mktemp("learning-swarm"))
    try:
        local.start_bootstrap()
        args = learning_args(PERIOD, None, "--canary-max-rise", "0.05")
        peers = {
            "head": local.start_peer("0:4", *args, name="head", wait=False),
            "tail": local.start_peer("4:8", *args, name="tail", wait=False),
        }
        for peer in peers.values():
            local.wait_ready(peer, timeout=120)
        local.ids = {name: peer.info["peer_id"] for name, peer in peers.items()}
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def observer(learning_swarm, tiny_model_path):
    """A client that only reads the peers' rpc_info."""
    model = DistributedModel.from_pretrained(str(tiny_model_path), learning_swarm.initial_peers)
    yield model
    model.close()


def _adapters(observer, swarm) -> dict[int, dict]:
    """start block -> rpc_info of the learning peer serving it."""
    return {info["start"]: info for info in (peer_info(observer, pid) for pid in swarm.ids.values())}


def _wait_for_new_versions(observer, swarm, before: dict[int, dict]) -> dict[str, dict]:
    infos = wait_for_peers(
        observer,
        swarm.ids,
        lambda info: info["adapter_version"] > before[info["start"]]["adapter_version"],
        60,
        "the feedback's update to go live on both spans",
    )
    for info in infos.values():
        old = before[info["start"]]
        assert info["adapter_fingerprint"] != old["adapter_fingerprint"]  # the live adapters changed
        assert info["last_canary"]["accepted"], info["last_canary"]  # through the default canary set
        assert info["canary_rollbacks"] == old["canary_rollbacks"]  # none of this feedback's rounds was refused
    return infos


def _idle(observer, swarm) -> dict[int, dict]:
    """`_adapters` once both peers ran a round with nothing left to apply: leftover progress of earlier feedback
    (a round applies at most clip_tau of it) would otherwise go live as if it were the next test's."""
    wait_for_peers(
        observer,
        swarm.ids,
        lambda info: "no local update" in info.get("last_averaging", {}).get("reason", ""),
        60,
        "the peers to have applied all earlier feedback",
    )
    return _adapters(observer, swarm)


def test_dllm_feedback_command_changes_the_peers_adapters(learning_swarm, observer, tiny_model_path):
    before = _adapters(observer, learning_swarm)
    for prompt, completion in FACTS:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dllm.cli",
                "feedback",
                prompt,
                completion,
                "--model",
                str(tiny_model_path),
                "--initial-peers",
                learning_swarm.initial_peers[0],
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        loss = float(re.search(r"feedback accepted: ([0-9.]+)", result.stdout).group(1))
        assert 0 < loss < 20
        assert "(published, signed by 5" in result.stdout
    infos = _wait_for_new_versions(observer, learning_swarm, before)
    for info in infos.values():  # every peer of the route trained on each example and keeps it, published
        assert info["feedback_store"]["records"] >= len(FACTS), info["feedback_store"]


@pytest.fixture(scope="module")
def api_url(learning_swarm, tiny_model_path, tmp_path_factory):
    """`dllm api` on a free port, as a real process; stopped with SIGTERM afterwards."""
    args = ["api", "--model", str(tiny_model_path), "--initial-peers", learning_swarm.initial_peers[0], "--port", "0"]
    with running_dllm(args, API_READY, tmp_path_factory.mktemp("feedback-api")) as match:
        yield match.group(2)


def test_http_feedback_endpoint_changes_the_peers_adapters(learning_swarm, observer, api_url):
    before = _idle(observer, learning_swarm)
    with httpx.Client(base_url=api_url, timeout=60) as http:
        bad = http.post("/feedback", json={"prompt": "Q: what colour? the sky is A:"})
        assert bad.status_code == 400 and "completion" in bad.text  # names the missing field; server lives on
        for prompt, completion in FACTS:
            response = http.post("/feedback", json={"prompt": prompt, "completion": completion})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["object"] == "feedback" and body["accepted"] is True
            assert isinstance(body["result"], float) and 0 < body["result"] < 20
    _wait_for_new_versions(observer, learning_swarm, before)

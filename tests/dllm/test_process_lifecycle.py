"""The bootstrap node, a peer and a serving verifier, each stopped with SIGTERM sent to its main process only
(not its group): each exits with status 0 and leaves no child process (hivemind DHT process, p2pd, the
verifier's gossip node) and no hivemind unix socket in /tmp behind. `dllm api` and `dllm dashboard` are
checked the same way by tests/swarm/test_api.py and tests/swarm/test_dashboard.py."""

from __future__ import annotations

import re

import pytest

from tests.cli_server import running_dllm

pytestmark = pytest.mark.timeout(240)

BOOTSTRAP_READY = re.compile(r"INITIAL_PEER (\S+)")
PEER_READY = re.compile(r"DLLM peer ready: peer_id=(\S+)")
VERIFIER_READY = re.compile(r"DLLM verifier ready: account=(\S+) peer_id=(\S+) role=(\S+) gossip=(\S+)")


def test_bootstrap_peer_and_verifier_stop_cleanly(tiny_model_path, tmp_path):
    bootstrap_args = ["swarm", "bootstrap", "--port", "0"]
    with running_dllm(bootstrap_args, BOOTSTRAP_READY, tmp_path) as bootstrap:
        initial_peer = bootstrap.group(1)
        peer_args = ["peer", "join", "--model", str(tiny_model_path), "--initial-peers", initial_peer]
        with running_dllm([*peer_args, "--blocks", "0:8"], PEER_READY, tmp_path) as peer:
            assert peer.group(1)
        verifier_args = ["verify", "--model", str(tiny_model_path), "--initial-peers", initial_peer]
        with running_dllm([*verifier_args, "--chain-key", "//Dave"], VERIFIER_READY, tmp_path, timeout=120) as ready:
            assert ready.group(3) == "verifier" and ready.group(4).startswith("/ip4/")

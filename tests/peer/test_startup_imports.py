"""A peer that neither bills nor learns starts without the billing stack or other architectures' model code.

Start time is mostly imports (README, benchmark table), so what the start path imports is checked here;
its speed is measured by scripts/bench/inference.py only. scipy is not checked: hivemind's package
`__init__` (through hivemind.averaging) and transformers' modeling_utils (through its detection losses)
both import scipy.optimize unconditionally, so any peer loads it.
"""

from __future__ import annotations

import json
import subprocess
import sys

# The import-side steps of `dllm peer join` for a peer with no chain key and adapter rank 0, in order:
# the CLI's checks, the peer module, the model code of the model's architecture, the billing decision.
_START_PATH = """
import json, sys
import dllm.cli, dllm.service, dllm.startup_gc
from dllm import default_model_path
from peer.config import PeerConfig
from swarm.model_files import read_config_fields
read_config_fields(default_model_path())
import peer.server
config = PeerConfig(model=str(default_model_path()), initial_peers=[])
peer.server._load_model_code(default_model_path())
assert peer.server._billing_setup(config) is None
print(json.dumps(sorted(sys.modules)))
"""

BILLING_ONLY = (
    "substrateinterface",
    "scalecodec",
    "chain.ledger",
    "chain.submission",
    "economy.chain_settlement",
    "economy.gossip",
    "economy.settlement",
    "peer.receipt_service",
    "peer.quote_publisher",
)


def _start_path_modules() -> set[str]:
    done = subprocess.run([sys.executable, "-c", _START_PATH], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_free_peer_start_path_imports_no_billing_and_one_architecture() -> None:
    modules = _start_path_modules()
    billing = sorted(m for m in modules if m.split(".")[0] in BILLING_ONLY or m in BILLING_ONLY)
    assert billing == [], f"a peer that does not bill imported {billing}"
    modeling = sorted(
        m for m in modules if m.startswith("transformers.models.") and m.rsplit(".", 1)[-1].startswith("modeling_")
    )
    # the embedded model is a llama; the auto module holds name tables only
    assert modeling == ["transformers.models.auto.modeling_auto", "transformers.models.llama.modeling_llama"]
    assert "peer.canary_eval" not in modules  # the swarm client side: only learners import it

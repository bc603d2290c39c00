"""`dllm lineage` and `dllm data export` on a chain shared by swarms of several models: `--model` keeps to one
model's records (versions, data batches, --verify's version), the default shows every model apart. Records are
committed straight through ComputeLedger on the session's dev chain (no learning swarm); the export reaches a
swarm of no peers, so every committed example of the chosen model is listed unavailable, and no other's."""

from __future__ import annotations

import hashlib
import json

import pytest

from chain.merkle import merkle_root
from tests.chain.ledger_helpers import fresh_account
from tests.dllm.cli_run import run_cli

pytestmark = pytest.mark.timeout(240)


def sha(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def test_model_option_keeps_lineage_verify_and_export_to_one_model(ledger, dev_chain, local_swarm, tmp_path, capsys):
    peer_kp = fresh_account(ledger)
    tag = peer_kp.ss58_address[-8:]  # the session's chain holds other tests' records: names of this test alone
    first, second = f"audit-a-{tag}", f"audit-b-{tag}"
    data = {first: [sha(f"{first}-{i}") for i in range(3)], second: [sha(f"{second}-{i}") for i in range(2)]}
    for model, hashes in data.items():
        ledger.commit_data_batch(peer_kp, model, (0, 4), hashes)
        ledger.commit_adapter_version(
            peer_kp, model, (0, 4), 1, 0, sha(f"{model}-v1"), None, [merkle_root(hashes)], [], {}, {}
        )
    url, peers = dev_chain.url, local_swarm.initial_peers[0]

    code, out, _ = run_cli(capsys, "lineage", "--chain-url", url)
    assert code == 0 and f"{first}  blocks 0:4" in out and f"{second}  blocks 0:4" in out  # default: every model
    code, out, _ = run_cli(capsys, "lineage", "--chain-url", url, "--model", first)
    assert code == 0 and f"{first}  blocks 0:4" in out and second not in out
    assert sha(f"{first}-v1").hex()[:16] in out and merkle_root(data[first]).hex()[:12] in out
    code, out, _ = run_cli(capsys, "lineage", "--chain-url", url, "--model", f"audit-none-{tag}")
    assert code == 0 and f"no adapter-version records of model audit-none-{tag}" in out and first in out

    # --verify of v1 asks for the one model's version only (no peer serves it here: unverified)
    code, out, err = run_cli(capsys, "lineage", "--chain-url", url, "-p", peers, "--verify", "1", "-m", second)
    assert code == 1 and f"{second} blocks 0:4 v1" in out and first not in out, out + err

    out_dir = tmp_path / "export"
    code, out, err = run_cli(capsys, "data", "export", "-o", str(out_dir), "-p", peers, "--chain-url", url, "-m", first)
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["model"] == first and list(summary["models"]) == [first] and second in summary["other_models"]
    assert summary["committed_examples"] == 3 and summary["unavailable"] == [h.hex() for h in data[first]]
    assert summary["models"][first] == {"committed": 3, "written": 0, "unavailable": 3}
    assert f"model {first} only" in out and "0 of 3 committed examples written" in out
    assert (out_dir / "feedback.jsonl").read_text() == ""

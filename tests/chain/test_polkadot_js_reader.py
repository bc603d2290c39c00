"""Standard Polkadot tooling (@polkadot/api from npm) reads the same ledger state and records."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from chain.devchain.genesis import DEVCHAIN_DIR
from chain.lineage import LineageIndex, data_batch_body
from chain.merkle import merkle_root
from chain.records import Payment
from tests.chain.ledger_helpers import UNIT, fresh_account, h

pytestmark = pytest.mark.timeout(240)


def test_polkadot_js_reads_balances_and_protocol_records(ledger, dev_chain):
    if shutil.which("node") is None or not (DEVCHAIN_DIR / "node_modules" / "@polkadot" / "api").is_dir():
        pytest.skip("node or @polkadot/api missing (run scripts/setup)")
    client, provider = fresh_account(ledger), fresh_account(ledger)
    ledger.register_provider(provider, 7 * UNIT)
    ledger.record_compute(provider, h("js-receipts" + provider.ss58_address), 4242, 2)
    receipt = h("js-settle" + client.ss58_address)
    payment = Payment.single(receipt, provider.ss58_address, 3 * UNIT, params_served=800_000, tokens=17, requests=1)
    ledger.settle(client, [payment])
    escrow = ledger.escrow_of(provider.ss58_address)
    proc = subprocess.run(
        [
            "node",
            str(DEVCHAIN_DIR / "read_ledger.mjs"),
            dev_chain.url,
            client.ss58_address,
            provider.ss58_address,
            escrow,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    for address in (client.ss58_address, provider.ss58_address, escrow):
        info = ledger.substrate.query("System", "Account", [address]).value
        assert int(seen["accounts"][address]["free"]) == info["data"]["free"]
        assert int(seen["accounts"][address]["reserved"]) == info["data"]["reserved"]
    assert int(seen["accounts"][escrow]["free"]) == 7 * UNIT
    mine = {(r["sender"], r["remark"].split(":")[2]) for r in seen["remarks"]}
    assert {
        (provider.ss58_address, "register"),
        (provider.ss58_address, "compute"),
        (client.ss58_address, "settle"),
    } <= mine
    settle = next(r for r in seen["remarks"] if r["sender"] == client.ss58_address)
    assert receipt.hex() in settle["remark"]
    # Python's index and @polkadot/api agree on which records exist, and on the settled compute
    # (the provider's self-reported record counts in neither).
    ours = [s for s in ledger.settlement_history(client_ss58=client.ss58_address)]
    assert [s.block_number for s in ours] == [settle["block"]]
    totals = ledger.compute_ledger(provider.ss58_address)
    assert (totals.tokens_x_params, totals.requests) == (17 * 800_000, 1)
    assert seen["compute"][provider.ss58_address] == {
        "tokens_x_params": str(totals.tokens_x_params),
        "requests": totals.requests,
        "receipts": 1,
    }


def test_polkadot_js_reads_the_same_lineage_records_as_python(ledger, dev_chain):
    """Data batches and adapter versions read by @polkadot/api alone, under the same rules as chain/lineage.py:
    the two readers list exactly the same records (every one on the chain so far, hostile ones skipped by both)."""
    if shutil.which("node") is None or not (DEVCHAIN_DIR / "node_modules" / "@polkadot" / "api").is_dir():
        pytest.skip("node or @polkadot/api missing (run scripts/setup)")
    peer, other = fresh_account(ledger), fresh_account(ledger)
    batch = [h(f"js-example-{i}-{peer.ss58_address}") for i in range(5)]
    ledger.commit_data_batch(peer, "dllm-tiny-llama", (0, 4), batch)
    root = merkle_root(batch)
    ledger.commit_adapter_version(
        peer, "dllm-tiny-llama", (0, 4), 1, 0, h("js-v1"), None, [root], ["12D3KooWjs"], {"general": 3.5}, {}
    )
    forged = data_batch_body("dllm-tiny-llama", (0, 4), batch) | {"root": h("js-forged").hex()}
    relayed = data_batch_body("dllm-tiny-llama", (4, 8), [h(f"js-relayed-{other.ss58_address}")])
    payload = b"dllm:v1:data-batch:" + json.dumps(forged).encode()
    ledger.submitter.submit(other, ledger._call("System", "remark_with_event", {"remark": "0x" + payload.hex()}))
    derived = ledger._call("Utility", "as_derivative", {"index": 3, "call": ledger._remark("data-batch", relayed)})
    ledger.submitter.submit(other, derived)
    proc = subprocess.run(
        ["node", str(DEVCHAIN_DIR / "read_ledger.mjs"), dev_chain.url],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "root is not the Merkle root" in proc.stderr, proc.stderr[-3000:]
    assert "not sent by its extrinsic's signer" in proc.stderr
    index = LineageIndex(ledger)
    index.sync()
    ours_batches = [
        {
            "block": b.block,
            "sender": b.sender,
            "model": b.model,
            "span": list(b.span),
            "root": b.root.hex(),
            "count": b.count,
            "hashes": [x.hex() for x in b.hashes],
        }
        for b in index.data_batches()
        if b.block <= seen["head"]
    ]
    ours_versions = [
        {
            "block": v.block,
            "sender": v.sender,
            "model": v.model,
            "span": list(v.span),
            "version": v.version,
            "parent": v.parent,
            "sha256": v.sha256.hex(),
            "parent_sha256": v.parent_sha256.hex() if v.parent_sha256 else None,
            "data_roots": [r.hex() for r in v.data_roots],
            "replicas": list(v.replicas),
            "canary": {"before": dict(v.canary_before), "after": dict(v.canary_after)},
        }
        for v in index.versions()
        if v.block <= seen["head"]
    ]
    assert seen["lineage"]["batches"] == ours_batches
    assert seen["lineage"]["versions"] == ours_versions
    assert [b["hashes"] for b in ours_batches if b["sender"] == peer.ss58_address] == [[x.hex() for x in batch]]
    assert [v["data_roots"] for v in ours_versions if v["sender"] == peer.ss58_address] == [[root.hex()]]
    assert not [r for r in ours_batches + ours_versions if r["sender"] == other.ss58_address]

"""Standard Polkadot tooling (@polkadot/api from npm) reads the same ledger state and records."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from chain.devchain.genesis import DEVCHAIN_DIR
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

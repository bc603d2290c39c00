"""A provider killed after it holds co-signed receipts (and their pre-signed settlements) but before
it settles them: on restart it settles them, and they are paid exactly once."""

from __future__ import annotations

import signal

import pytest

from chain.ledger import ComputeLedger
from swarm.billing import BillingConfig
from swarm.client import ClientConfig, DistributedModel, GenerationParams
from tests.economy.swarm_economy import funded_key, start_billing_peer, store_totals, wait_until

pytestmark = pytest.mark.timeout(420)

RATE = 10**10


def test_killed_provider_settles_its_receipts_once_on_restart(dev_chain, local_swarm, tiny_model_path, tmp_path):
    ledger = ComputeLedger(dev_chain.url)
    try:
        provider_uri, provider = funded_key(ledger)
        client_uri, client = funded_key(ledger, 1000 * 10**12)
        receipts = tmp_path / "provider.sqlite3"
        # A settle interval far beyond the test: only the start-up round can pay.
        peer = start_billing_peer(
            local_swarm, "0:8", provider_uri, dev_chain.url, receipts, rate=RATE, settle_interval=3600
        )
        before = ledger.balance(provider.ss58_address)

        # The client pays by pre-signed extrinsics only (as if it went offline right after its sessions).
        billing = BillingConfig(dev_chain.url, client_uri, sample_rate=0.0, submit_settlements=False)
        model = DistributedModel.from_pretrained(
            str(tiny_model_path), local_swarm.initial_peers, config=ClientConfig(billing=billing)
        )
        try:
            bills = [
                model.generate("def add(a, b):", GenerationParams(max_new_tokens=4, ignore_eos=True)).bill
                for _ in range(2)
            ]
        finally:
            model.close()
        assert all(b is not None and len(b.lines) == 1 and b.total > 0 for b in bills)
        owed = sum(b.total for b in bills)
        assert store_totals(receipts) == {"unsettled": (2, owed)}

        peer.signal(signal.SIGKILL)  # a crash: no shutdown code runs
        peer.popen.wait(10)
        assert ledger.balance(provider.ss58_address) == before

        restarted = start_billing_peer(
            local_swarm, "0:8", provider_uri, dev_chain.url, receipts, rate=RATE, settle_interval=3600
        )
        wait_until(lambda: ledger.balance(provider.ss58_address) == before + owed, 60, "the restarted peer to settle")
        assert store_totals(receipts) == {"settled": (2, owed)}
        history = ledger.settlement_history(provider_ss58=provider.ss58_address)
        assert len(history) == 2 and {h.client for h in history} == {ledger.address(client.public_key)}

        # A second crash and restart finds nothing to pay: still paid once.
        restarted.signal(signal.SIGKILL)
        restarted.popen.wait(10)
        start_billing_peer(local_swarm, "0:8", provider_uri, dev_chain.url, receipts, rate=RATE, settle_interval=3600)
        assert store_totals(receipts) == {"settled": (2, owed)}
        assert ledger.balance(provider.ss58_address) == before + owed
        assert len(ledger.settlement_history(provider_ss58=provider.ss58_address)) == 2
    finally:
        ledger.close()

"""Training passes are paid like any request: metered per hop, priced with the backward rate, settled on
the dev chain (real runtime), and never sent to verifiers (working adapters cannot be recomputed)."""

from __future__ import annotations

import pytest

from chain.ledger import ComputeLedger
from economy.pricing import ProviderRate, Usage, provider_amount
from swarm.billing import BillingConfig
from swarm.client import ClientConfig, DistributedModel
from tests.economy.swarm_economy import UNIT, funded_key, start_billing_peer, store_totals, total_balance
from tests.peer.learning_swarm import FACTS, learning_args, wait_until

pytestmark = pytest.mark.timeout(300)

RATE = 10**10


def test_feedback_passes_are_metered_billed_and_settled(dev_chain, ledger, local_swarm, tiny_model_path, tmp_path):
    _run(ledger, dev_chain.url, local_swarm, tiny_model_path, tmp_path)


def _run(ledger: ComputeLedger, url: str, swarm, model_path, tmp_path) -> None:
    keys = {name: funded_key(ledger) for name in ("head", "tail")}
    client_uri, _ = funded_key(ledger, 1000 * UNIT)
    stores = {name: tmp_path / f"{name}.sqlite3" for name in keys}
    procs = {
        name: start_billing_peer(
            swarm, blocks, keys[name][0], url, stores[name], rate=RATE, wait=False, extra=learning_args(30.0)
        )
        for name, blocks in (("head", "0:4"), ("tail", "4:8"))
    }
    for proc in procs.values():
        swarm.wait_ready(proc, timeout=120)
    accounts = {name: kp.ss58_address for name, (_, kp) in keys.items()}
    before = {name: total_balance(ledger, account) for name, account in accounts.items()}

    # sample_rate=1: an inference receipt would always go to verifiers; a training one never may
    billing = BillingConfig(url, client_uri, sample_rate=1.0)
    model = DistributedModel.from_pretrained(str(model_path), swarm.initial_peers, config=ClientConfig(billing=billing))
    try:
        prompt, completion = FACTS[0]
        ids, labels = model._feedback_tensors(prompt, completion)
        tokens = int(ids.shape[1])
        # The pass model.feedback makes, through the core, whose result also holds the pass's own billing.
        example = model.core.feedback_example(prompt, completion)  # the published text the pass trains on
        paid = model._loop.run(model.core.feedback_pass(ids, labels, example=example))
        assert 0 < paid.loss < 20
        metered = paid.billing
        assert metered is not None
        assert metered.session.errors == []
        receipts = sorted((s.receipt for s in metered.session.receipts), key=lambda r: r.start)
        assert [(r.start, r.end) for r in receipts] == [(0, 4), (4, 8)]
        rate = ProviderRate.from_advertised(RATE)
        amounts = {}
        for name, r in zip(("head", "tail"), receipts, strict=True):
            # the forward is a prompt step, the backward a backward step over the same tokens
            assert r.usage == Usage(
                prompt_tokens=tokens, generated_tokens=0, backward_tokens=tokens, max_context=tokens, sampled=False
            )
            assert r.rate == rate and r.amount == provider_amount(rate, r.params_served, r.usage)
            forward_only = provider_amount(rate, r.params_served, Usage(prompt_tokens=tokens, max_context=tokens))
            assert r.amount > 2 * forward_only  # the backward costs BACKWARD_FACTOR (2x) the forward
            amounts[name] = r.amount
        model._loop.run(model.core.billing.flush())
        assert model.core.billing.sample_failures == [] and model.core.billing.verdicts == []
    finally:
        model.close()

    for name, account in accounts.items():
        wait_until(
            lambda account=account, name=name: total_balance(ledger, account) == before[name] + amounts[name],
            90,
            f"{name}'s training receipt to be paid on chain",
            interval=1.0,
        )
        # the provider's store marks it settled at its next settlement round (every 2 s)
        wait_until(
            lambda name=name: store_totals(stores[name]) == {"settled": (1, amounts[name])},
            30,
            f"{name}'s receipt store to mark it settled",
        )

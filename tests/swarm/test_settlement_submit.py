"""A paying client's own settlement submission is retried with backoff, and counted when it cannot be paid.

The chain is a stand-in here (its account nonce, settlement markers and submit call), so the chain's refusals
and outages can be scripted exactly; the real chain's behaviour is covered by tests/economy.
"""

from __future__ import annotations

import asyncio

import pytest

from chain.errors import ChainConnectionError, ExtrinsicRejectedError
from swarm import billing as billing_module
from swarm.billing import BillingConfig, ClientBilling

RECEIPTS = [b"\x01" * 32, b"\x02" * 32]


class ScriptedChain:
    """A ledger whose submit_signed fails as scripted, then pays the receipts."""

    def __init__(self, failures: list[Exception]):
        self.failures = list(failures)
        self.submits = 0
        self.paid: set[bytes] = set()
        self.substrate = self

    def get_account_nonce(self, ss58: str) -> int:
        return 7  # the settlement's own nonce: nothing else used it

    def settled_on_chain(self, client_ss58: str, receipt_ids: list[bytes]) -> list[bytes]:
        return [r for r in receipt_ids if r in self.paid]

    def submit_signed(self, extrinsic: bytes) -> None:
        self.submits += 1
        if self.failures:
            raise self.failures.pop(0)
        self.paid.update(RECEIPTS)


class Keys:
    ss58_address = "5client"


def client_with(chain: ScriptedChain, retry_s: float) -> ClientBilling:
    config = BillingConfig("ws://unused", "//Alice", settlement_retry_s=retry_s)
    billing = ClientBilling(config, p2p=None, dht=None, model="m")
    billing.ledger, billing.keypair = chain, Keys()
    return billing


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(billing_module, "CHAIN_RETRY_INTERVAL_S", 0.01)
    monkeypatch.setattr(billing_module, "CHAIN_RETRY_MAX_INTERVAL_S", 0.04)


def test_a_refused_or_unreachable_submit_is_retried_until_paid() -> None:
    chain = ScriptedChain(
        [ChainConnectionError("down"), ExtrinsicRejectedError("pool full"), ChainConnectionError("x")]
    )

    async def run() -> ClientBilling:
        billing = client_with(chain, retry_s=5.0)
        billing.submit_later(7, b"extrinsic", RECEIPTS)
        await billing.flush()
        billing._executor.shutdown(wait=True)
        return billing

    billing = asyncio.run(run())
    assert chain.submits == 4 and chain.paid == set(RECEIPTS)
    assert billing.settlement_failures == []


def test_a_submit_that_keeps_failing_is_counted_not_dropped() -> None:
    chain = ScriptedChain([ExtrinsicRejectedError("refused")] * 1000)

    async def run() -> ClientBilling:
        billing = client_with(chain, retry_s=0.3)
        started = asyncio.get_running_loop().time()
        billing.submit_later(7, b"extrinsic", RECEIPTS)
        await billing.flush()
        assert asyncio.get_running_loop().time() - started < 2.0  # bounded by settlement_retry_s
        billing._executor.shutdown(wait=True)
        return billing

    billing = asyncio.run(run())
    assert 2 <= chain.submits < 40, chain.submits  # retried with backoff, not hammered
    (failure,) = billing.settlement_failures
    assert "nonce 7" in failure and "ExtrinsicRejectedError" in failure and "refused" in failure

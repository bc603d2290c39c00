"""A paying client's own settlement submission is retried with backoff, and counted when it cannot be paid.

The chain is a stand-in here (its account nonces, settlement markers and submit call), so the chain's refusals,
outages and failures in the runtime can be scripted exactly; the real chain's behaviour is covered by tests/economy.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from chain.errors import ChainConnectionError, DispatchError, ExtrinsicRejectedError
from swarm import billing as billing_module
from swarm.billing import BillingConfig, ClientBilling

RECEIPTS = [b"\x01" * 32, b"\x02" * 32]


class ScriptedChain:
    """A ledger whose submit_signed fails as scripted, then pays the receipts.

    `included` is the account's next nonce after its transactions in blocks; `pooled` the one counting the pool
    too. Both start at the settlement's own nonce (7): nothing else used it. A scripted DispatchError is an
    inclusion that failed in the runtime: the nonce is spent, the receipts stay unpaid."""

    def __init__(self, failures: list[Exception], included: int = 7, pooled: int = 7):
        self.failures = list(failures)
        self.included, self.pooled = included, pooled
        self.submits = 0
        self.paid: set[bytes] = set()
        self.substrate = self

    def get_account_nonce(self, ss58: str) -> int:
        return max(self.included, self.pooled)

    def query(self, module: str, storage: str, params: list[str]) -> SimpleNamespace:
        assert (module, storage) == ("System", "Account")
        return SimpleNamespace(value={"nonce": self.included})

    def settled_on_chain(self, client_ss58: str, receipt_ids: list[bytes]) -> list[bytes]:
        return [r for r in receipt_ids if r in self.paid]

    def submit_signed(self, extrinsic: bytes) -> None:
        self.submits += 1
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, DispatchError):
                self.included += 1
            raise failure
        self.included += 1
        self.paid.update(RECEIPTS)


class Keys:
    ss58_address = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"  # //Alice


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


def run_submit(chain: ScriptedChain, retry_s: float = 5.0) -> ClientBilling:
    async def run() -> ClientBilling:
        billing = client_with(chain, retry_s)
        billing.submit_later(7, b"extrinsic", RECEIPTS)
        await billing.flush()
        billing._executor.shutdown(wait=True)
        return billing

    return asyncio.run(run())


def test_a_submit_that_fails_in_the_runtime_is_a_settlement_failure_not_done() -> None:
    chain = ScriptedChain([DispatchError("Utility", "BatchInterrupted", "a call of the batch failed")])
    billing = run_submit(chain)
    assert chain.submits == 1 and not chain.paid  # the nonce is spent: these bytes are not sent again
    (failure,) = billing.settlement_failures
    assert "nonce 7" in failure and "DispatchError" in failure and "unpaid" in failure


def test_a_nonce_a_block_used_without_paying_is_a_settlement_failure() -> None:
    chain = ScriptedChain([], included=8, pooled=8)  # a provider's submission of it failed in the runtime
    billing = run_submit(chain)
    assert chain.submits == 0
    (failure,) = billing.settlement_failures
    assert "nonce 7" in failure and "unpaid" in failure


def test_a_nonce_a_block_used_to_pay_is_done() -> None:
    chain = ScriptedChain([], included=8, pooled=8)  # a provider was faster
    chain.paid.update(RECEIPTS)
    billing = run_submit(chain)
    assert chain.submits == 0 and billing.settlement_failures == []


def test_a_settlement_waiting_in_the_pool_is_watched_until_its_block_pays() -> None:
    chain = ScriptedChain([], included=7, pooled=8)  # a provider's submission, not yet in a block
    looks = 0
    settled_on_chain = chain.settled_on_chain

    def include_on_the_third_look(client_ss58: str, receipt_ids: list[bytes]) -> list[bytes]:
        nonlocal looks
        looks += 1
        if looks == 3:
            chain.included = 8
            chain.paid.update(RECEIPTS)
        return settled_on_chain(client_ss58, receipt_ids)

    chain.settled_on_chain = include_on_the_third_look  # type: ignore[method-assign]
    billing = run_submit(chain)
    assert looks == 3 and chain.submits == 0 and billing.settlement_failures == []


def test_a_settlement_left_in_the_pool_is_counted_when_time_runs_out() -> None:
    chain = ScriptedChain([], included=7, pooled=8)
    billing = run_submit(chain, retry_s=0.2)
    assert chain.submits == 0
    (failure,) = billing.settlement_failures
    assert "nonce 7" in failure and "not paid" in failure

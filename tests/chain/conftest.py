"""Fixtures of the chain tests: one ledger client on the session's dev chain."""

from __future__ import annotations

import pytest

from chain.ledger import ComputeLedger


@pytest.fixture(scope="module")
def ledger(dev_chain):
    client = ComputeLedger(dev_chain.url)
    yield client
    client.close()

"""Fixtures local to the economy tests: dev chain keys and a receipt factory."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from substrateinterface import Keypair

from economy.metering import StepKind, UsageMeter
from economy.pricing import ProviderRate
from economy.receipts import SignedReceipt, UsageReceipt, receipt_for_segment


@pytest.fixture(scope="session")
def keys() -> dict[str, Keypair]:
    """Well-known dev accounts (the same the dev chain endows)."""
    return {
        name: Keypair.create_from_uri(f"//{name.capitalize()}")
        for name in ("alice", "bob", "charlie", "dave", "eve", "ferdie")
    }


@pytest.fixture
def make_receipt(keys: dict[str, Keypair]) -> Callable[..., SignedReceipt]:
    """Builds a metered, co-signed receipt: provider Bob serving client Alice unless told otherwise."""

    def build(
        provider: str = "bob", client: str = "alice", session: bytes = b"session-1", sequence: int = 0, tokens: int = 4
    ) -> SignedReceipt:
        meter = UsageMeter(session, "tiny", 0, 4, 800_000)
        meter.record_step(StepKind.PROMPT, tokens, torch.ones(1, tokens, 8), torch.full((1, tokens, 8), 2.0))
        meter.record_step(StepKind.GENERATED, 1, torch.ones(1, 1, 8), torch.full((1, 1, 8), 3.0))
        usage, before, after = meter.close_segment()
        receipt: UsageReceipt = receipt_for_segment(
            network="dllm-dev",
            session_id=session,
            sequence=sequence,
            model="tiny",
            start=0,
            end=4,
            params_served=800_000,
            rate=ProviderRate.from_advertised(10**9),
            usage=usage,
            provider=keys[provider].ss58_address,
            client=keys[client].ss58_address,
            commitment_before=before,
            commitment=after,
            issued_at=int(time.time()),
        )
        return SignedReceipt.create(receipt, keys[provider], keys[client])

    return build

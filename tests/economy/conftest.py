"""Fixtures local to the economy tests: dev chain keys and a receipt factory."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from substrateinterface import Keypair

from economy.metering import StepKind, UsageMeter
from economy.receipts import SignedReceipt
from tests.economy.receipt_helpers import co_signed


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
        return co_signed(keys[provider], keys[client], meter, sequence=sequence)

    return build

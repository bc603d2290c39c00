"""Receipts for the economy tests: the segment a `UsageMeter` metered, proposed and co-signed as a peer and
its client do (the `make_receipt` fixture in conftest.py and the tests' own serving helpers build on it)."""

from __future__ import annotations

import time
from typing import Any

from substrateinterface import Keypair

from economy.metering import UsageMeter
from economy.pricing import ProviderRate
from economy.receipts import SignedReceipt, receipt_for_segment


def co_signed(
    provider: Keypair,
    client: Keypair,
    meter: UsageMeter,
    *,
    sequence: int = 0,
    rate: int = 10**9,
    issued_at: int | None = None,
    **fields: Any,
) -> SignedReceipt:
    """The receipt of `meter`'s open segment (closing it) on the dev network, at the advertised `rate`, signed by
    `provider` and countersigned by `client`; `fields` are receipt_for_segment's optional ones (dtype, expires_at,
    adapter_version, adapter_digest); `issued_at` is now unless given."""
    usage, before, after = meter.close_segment()
    receipt = receipt_for_segment(
        network="dllm-dev",
        session_id=meter.session_id,
        sequence=sequence,
        model=meter.model,
        start=meter.start,
        end=meter.end,
        params_served=meter.params_served,
        rate=ProviderRate.from_advertised(rate),
        usage=usage,
        provider=provider.ss58_address,
        client=client.ss58_address,
        commitment_before=before,
        commitment=after,
        issued_at=int(time.time()) if issued_at is None else issued_at,
        **fields,
    )
    return SignedReceipt.create(receipt, provider, client)

"""DLLM's economy: prices, co-signed usage receipts, metering, spot-check verification and settlement.

Pure logic and records over chain keys; no network client of the swarm (that is swarm/billing.py). The names
in `__all__` are the package's public API, loaded lazily (PEP 562): `import economy` imports no submodule,
so a process pays for torch (metering, verification) or substrate-interface (keys) only where it uses them.
tests/test_public_api.py holds `__all__`, `_EXPORTS` and the type-checking imports to the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chain.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from economy.evidence_store import Evidence, EvidenceStore
    from economy.gossip import GossipBus, GossipConfig
    from economy.metering import StepKind, UsageMeter
    from economy.price_announcement import PriceAnnouncement
    from economy.pricing import Bill, Line, PriceCapExceededError, ProviderRate, Quote, RouteHop, Usage
    from economy.receipt_store import ReceiptState, ReceiptStore
    from economy.receipts import ReceiptError, SignedReceipt, UsageReceipt
    from economy.settlement import Settler
    from economy.signing import load_keypair
    from economy.verification import (
        AdaptiveSpotCheck,
        CheckHistory,
        SignedVerdict,
        SpotCheckPolicy,
        Tolerance,
        Verdict,
        VerificationError,
    )
    from economy.work_sample import SampledStep, WorkSample

__all__ = [
    "AdaptiveSpotCheck",
    "Bill",
    "CheckHistory",
    "Evidence",
    "EvidenceStore",
    "GossipBus",
    "GossipConfig",
    "Line",
    "PriceAnnouncement",
    "PriceCapExceededError",
    "ProviderRate",
    "Quote",
    "ReceiptError",
    "ReceiptState",
    "ReceiptStore",
    "RouteHop",
    "SampledStep",
    "Settler",
    "SignedReceipt",
    "SignedVerdict",
    "SpotCheckPolicy",
    "StepKind",
    "Tolerance",
    "Usage",
    "UsageMeter",
    "UsageReceipt",
    "Verdict",
    "VerificationError",
    "WorkSample",
    "load_keypair",
]

# public name -> the module that defines it
_EXPORTS = {
    "AdaptiveSpotCheck": "economy.verification",
    "Bill": "economy.pricing",
    "CheckHistory": "economy.verification",
    "Evidence": "economy.evidence_store",
    "EvidenceStore": "economy.evidence_store",
    "GossipBus": "economy.gossip",
    "GossipConfig": "economy.gossip",
    "Line": "economy.pricing",
    "PriceAnnouncement": "economy.price_announcement",
    "PriceCapExceededError": "economy.pricing",
    "ProviderRate": "economy.pricing",
    "Quote": "economy.pricing",
    "ReceiptError": "economy.receipts",
    "ReceiptState": "economy.receipt_store",
    "ReceiptStore": "economy.receipt_store",
    "RouteHop": "economy.pricing",
    "SampledStep": "economy.work_sample",
    "Settler": "economy.settlement",
    "SignedReceipt": "economy.receipts",
    "SignedVerdict": "economy.verification",
    "SpotCheckPolicy": "economy.verification",
    "StepKind": "economy.metering",
    "Tolerance": "economy.verification",
    "Usage": "economy.pricing",
    "UsageMeter": "economy.metering",
    "UsageReceipt": "economy.receipts",
    "Verdict": "economy.verification",
    "VerificationError": "economy.verification",
    "WorkSample": "economy.work_sample",
    "load_keypair": "economy.signing",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

"""DLLM's chain package: the local dev chain and the ComputeLedger client (see docs/chain.md)."""

from chain.council import Council
from chain.ledger import ComputeLedger, LedgerConfig
from chain.records import (
    ChainEvent,
    ChainResult,
    ComputeRecord,
    ComputeTotals,
    Payment,
    ProviderShare,
    ProviderState,
    ProviderStatus,
    SettledReceipt,
    SlashRecord,
)

__all__ = [
    "ChainEvent",
    "ChainResult",
    "ComputeLedger",
    "ComputeRecord",
    "ComputeTotals",
    "Council",
    "LedgerConfig",
    "Payment",
    "ProviderShare",
    "ProviderState",
    "ProviderStatus",
    "SettledReceipt",
    "SlashRecord",
]

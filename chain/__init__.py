"""DLLM's chain package: the local dev chain and the ComputeLedger client (see docs/chain.md).

The names in `__all__` are the package's public API. They load lazily (PEP 562): `import chain` imports none
of the submodules, so a process that needs only `chain.errors` or `chain.units` never loads substrate-interface.
tests/test_public_api.py holds `__all__`, `_EXPORTS` and the type-checking imports to the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chain.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from chain.council import Council
    from chain.errors import ChainError, ConfigError, DLLMError, EconomyError, UnavailableError
    from chain.ledger import ComputeLedger, LedgerConfig
    from chain.lineage import DataBatch, LineageIndex, MergedVersion, VersionCommit
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
    from chain.units import PLANCK_PER_TOKEN, TOKEN_SYMBOL

__all__ = [
    "PLANCK_PER_TOKEN",
    "TOKEN_SYMBOL",
    "ChainError",
    "ChainEvent",
    "ChainResult",
    "ComputeLedger",
    "ComputeRecord",
    "ComputeTotals",
    "ConfigError",
    "Council",
    "DLLMError",
    "DataBatch",
    "EconomyError",
    "LedgerConfig",
    "LineageIndex",
    "MergedVersion",
    "Payment",
    "ProviderShare",
    "ProviderState",
    "ProviderStatus",
    "SettledReceipt",
    "SlashRecord",
    "UnavailableError",
    "VersionCommit",
]

# public name -> the module that defines it
_EXPORTS = {
    "ChainError": "chain.errors",
    "ChainEvent": "chain.records",
    "ChainResult": "chain.records",
    "ComputeLedger": "chain.ledger",
    "ComputeRecord": "chain.records",
    "ComputeTotals": "chain.records",
    "ConfigError": "chain.errors",
    "Council": "chain.council",
    "DLLMError": "chain.errors",
    "DataBatch": "chain.lineage",
    "EconomyError": "chain.errors",
    "LedgerConfig": "chain.ledger",
    "LineageIndex": "chain.lineage",
    "MergedVersion": "chain.lineage",
    "PLANCK_PER_TOKEN": "chain.units",
    "Payment": "chain.records",
    "ProviderShare": "chain.records",
    "ProviderState": "chain.records",
    "ProviderStatus": "chain.records",
    "SettledReceipt": "chain.records",
    "SlashRecord": "chain.records",
    "TOKEN_SYMBOL": "chain.units",
    "UnavailableError": "chain.errors",
    "VersionCommit": "chain.lineage",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

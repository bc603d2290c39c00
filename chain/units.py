"""The chain's money unit, defined once: one token (ROC on the dev chain) is 10**12 planck.

Every amount on the wire, in receipts, in the ledger and in rates is an integer number of planck; tokens
appear only where a person reads or types an amount (`--stake 0.5`, the demo's table, the dashboard).
This module imports nothing, so the CLI and light processes can use it without substrate-interface.
"""

from __future__ import annotations

TOKEN_SYMBOL = "ROC"
TOKEN_DECIMALS = 12
PLANCK_PER_TOKEN = 10**TOKEN_DECIMALS

__all__ = ["PLANCK_PER_TOKEN", "TOKEN_DECIMALS", "TOKEN_SYMBOL"]

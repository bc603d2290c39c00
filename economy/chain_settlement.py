"""SettlementLedger over the chain client (chain.ledger.ComputeLedger).

The chain's settlement extrinsic is signed by the paying client (`ComputeLedger.settle(client,
payments)`), so this adapter needs the key of every client whose receipts it settles: the client's
own process, or a single-operator deployment/demo holding both sides' keys.
"""

from __future__ import annotations

from collections.abc import Mapping

from substrateinterface import Keypair

from chain.errors import ConfigError
from chain.ledger import ComputeLedger
from economy.presigned_settlement import payments_for
from economy.receipt_store import SettlementBatch


class MissingClientKeyError(ConfigError, KeyError):
    """The adapter holds no key for the client whose batch it was asked to settle."""


class ComputeLedgerSettlement:
    """Pays settlement batches through `ComputeLedger`; one extrinsic per batch."""

    def __init__(self, ledger: ComputeLedger, client_keys: Mapping[str, Keypair]):
        self.ledger = ledger
        self.client_keys = dict(client_keys)

    def settle(self, batch: SettlementBatch) -> str:
        """Submits the batch (blocking; the Settler runs it in a thread); returns the extrinsic hash."""
        key = self.client_keys.get(batch.client)
        if key is None:
            raise MissingClientKeyError(
                f"no key for client {batch.client}: only the paying client can sign its settlement"
            )
        payments = payments_for([s.receipt for s in batch.receipts])
        return self.ledger.settle(key, payments).extrinsic_hash

    def is_settled(self, receipt_id: str) -> bool:
        return self.ledger.is_settled(bytes.fromhex(receipt_id.removeprefix("0x")))

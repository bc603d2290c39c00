"""Exception types raised by the chain package.

Every failure a caller can act on has its own type, so callers never parse messages.
"""

from __future__ import annotations


class ChainError(Exception):
    """Base class of every error raised by the chain package."""


class DevChainUnavailableError(ChainError):
    """Node.js or the dev chain's npm packages are missing (run scripts/setup)."""


class DevChainStartError(ChainError):
    """The chopsticks process exited or did not answer in time."""


class ChainConnectionError(ChainError):
    """The chain's RPC endpoint cannot be reached."""


class InvalidAddressError(ChainError, ValueError):
    """A string is not a valid account address for this chain."""


class UnknownAccountError(ChainError):
    """The signing account does not exist on chain (no balance at all)."""


class InsufficientBalanceError(ChainError):
    """An account cannot pay an amount plus fees."""


class InsufficientStakeError(ChainError):
    """A stake is below the minimum, or a slash/unbond asks for more than is bonded."""


class InvalidPaymentError(ChainError, ValueError):
    """A settlement payment is malformed (bad receipt id, non-positive amount, no shares)."""


class DoubleSettlementError(ChainError):
    """At least one receipt was already settled; nothing was paid."""

    def __init__(self, receipt_ids: list[bytes]) -> None:
        self.receipt_ids = receipt_ids
        shown = ", ".join("0x" + r.hex() for r in receipt_ids[:3])
        more = f" (+{len(receipt_ids) - 3} more)" if len(receipt_ids) > 3 else ""
        super().__init__(f"receipt(s) already settled on chain: {shown}{more}; remove them from the batch")


class QuorumError(ChainError):
    """A council action was attempted without enough distinct council members."""


class NotRegisteredError(ChainError):
    """The provider has no active registration (or its stake was fully unbonded)."""


class AlreadyRegisteredError(ChainError):
    """The provider is already registered; unbond first to register again."""


class UnbondNotReadyError(ChainError):
    """No unbond request exists, or its delay has not elapsed yet."""


class InvalidSignatureError(ChainError):
    """The chain rejected an extrinsic because its signature does not verify (badProof)."""


class ExtrinsicRejectedError(ChainError):
    """The transaction pool refused an extrinsic before inclusion (invalid nonce, fees, ...)."""


class DispatchError(ChainError):
    """An included extrinsic failed in the runtime; carries the decoded module error.

    The extrinsic's fee was paid, but every call of the batch was rolled back.
    """

    def __init__(self, module: str, name: str, docs: str, block_hash: str | None = None) -> None:
        self.module = module
        self.name = name
        self.docs = docs
        self.block_hash = block_hash
        super().__init__(f"runtime error {module}.{name}: {docs}".rstrip(": "))

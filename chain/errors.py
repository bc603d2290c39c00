"""Every exception DLLM raises on purpose, as one tree rooted at DLLMError.

The root and its branch bases live here, in the lowest package, because a module may only import its own
package and those below it (chain < economy < swarm < peer < dllm): this is the one module every package
can subclass from. The leaves live beside the code that raises them; this drawing is the map, and
tests/test_errors.py fails when a project exception is missing from it or does not derive from DLLMError.
A builtin in parentheses is an extra base kept because callers catch that builtin.

    DLLMError
    ├── ChainError                        the chain refused a call or cannot be reached    chain/errors.py
    │   ├── DevChainUnavailableError
    │   ├── DevChainStartError
    │   ├── ChainConnectionError
    │   ├── InvalidAddressError (ValueError)
    │   ├── UnknownAccountError
    │   ├── InsufficientBalanceError
    │   ├── InsufficientStakeError
    │   ├── InvalidPaymentError (ValueError)
    │   ├── DoubleSettlementError
    │   ├── QuorumError
    │   ├── NotRegisteredError
    │   ├── AlreadyRegisteredError
    │   ├── UnbondNotReadyError
    │   │   ├── SlashPendingError
    │   │   └── DisputePendingError
    │   ├── InvalidSignatureError
    │   ├── ExtrinsicRejectedError
    │   ├── DispatchError
    │   ├── MalformedRemarkError (ValueError)                                           chain/remarks.py
    │   └── MalformedSettlementError (ValueError)                                       chain/settlement_codec.py
    ├── EconomyError                      a receipt, verdict, sample, price or settlement fails its checks
    │   ├── CanonicalFormatError (ValueError)                                           economy/canonical.py
    │   ├── EnvelopeError (ValueError)                                                  economy/envelope.py
    │   │   ├── MalformedEnvelopeError
    │   │   ├── ForgedEnvelopeError
    │   │   └── StaleEnvelopeError
    │   ├── MalformedAnnouncementError (ValueError)                                     economy/price_announcement.py
    │   ├── MeteringError (ValueError)                                                  economy/metering.py
    │   ├── PricingError (ValueError)                                                   economy/pricing.py
    │   │   └── PriceCapExceededError
    │   ├── ReceiptError (ValueError)                                                   economy/receipts.py
    │   │   ├── MalformedReceiptError
    │   │   ├── ForgedReceiptError
    │   │   ├── WrongSignerError
    │   │   ├── ReplayedReceiptError
    │   │   ├── ExpiredReceiptError
    │   │   ├── UnexpectedReceiptError
    │   │   ├── NothingToBillError
    │   │   ├── UsageInflationError
    │   │   ├── CommitmentMismatchError
    │   │   ├── RateMismatchError
    │   │   ├── DtypeMismatchError
    │   │   └── TrainingClaimError
    │   ├── ReceiptStoreError (RuntimeError)                                            economy/receipt_store.py
    │   ├── SettlementOfferError (ValueError)                                           economy/presigned_settlement.py
    │   ├── SettlementNotReadyError (RuntimeError)                                      economy/presigned_settlement.py
    │   ├── StaleSettlementError (RuntimeError)                                         economy/presigned_settlement.py
    │   ├── MissingSettlementError (LookupError)                                        economy/presigned_ledger.py
    │   ├── SettlementFailedError                                                       swarm/billing.py
    │   ├── PaymentDueError                                                             economy/credit.py
    │   ├── VerificationError (ValueError)                                              economy/verification.py
    │   │   ├── MalformedVerdictError
    │   │   ├── ForgedVerdictError
    │   │   ├── NotAVerifierError
    │   │   └── StaleVerdictError
    │   ├── MalformedWorkSampleError (ValueError)                                       economy/work_sample.py
    │   ├── EvidenceMismatchError (ValueError)                                          economy/work_sample.py
    │   ├── UnverifiableSampleError (ValueError)                                        economy/work_sample.py
    │   ├── SampleRejectedError (ValueError)                                            economy/work_sample.py
    │   ├── MalformedEvidenceError (ValueError)                                         economy/evidence_store.py
    │   └── EvidenceNotFoundError (LookupError)                                         economy/evidence_store.py
    ├── ProtocolError (ValueError)        a request or reply breaks the rules: its sender is at fault
    │   │                                                                               swarm/protocol.py
    │   ├── BlocksNotServed                                                             swarm/protocol.py
    │   ├── SessionNotFoundError (KeyError)                                             swarm/protocol.py
    │   │   └── UnknownMeteredSessionError                                              peer/metering_hook.py
    │   ├── InvalidTensorError                                                          swarm/tensors.py
    │   ├── RecordError                                                                 swarm/records.py
    │   ├── DirectEndpointError                                                         swarm/direct.py
    │   ├── BadRequestError                                                             swarm/api.py
    │   ├── ChatTooLongError                                                            swarm/chat.py
    │   ├── UnsupportedParameterError                                                   swarm/openai_schema.py
    │   ├── SessionExistsError                                                          peer/kv_cache.py
    │   ├── CacheOverflowError                                                          peer/kv_cache.py
    │   ├── MeteringRequestError                                                        peer/metering_hook.py
    │   ├── AdapterError                                                                peer/adapters.py
    │   │   ├── AdapterStateError
    │   │   ├── AdapterVersionUnavailableError
    │   │   └── AdapterDigestMismatchError
    │   ├── GradientError                                                               peer/training.py
    │   ├── RateLimitExceededError (RuntimeError)                                       peer/training.py
    │   ├── ContributorAuthError                                                        swarm/contributors.py
    │   ├── FeedbackRecordError                                                         swarm/feedback_records.py
    │   ├── AggregationError                                                            peer/aggregation.py
    │   └── SketchError                                                                 peer/average_check.py
    ├── RemotePeerError (RuntimeError)    a peer failed, or answered with an error kind; carries peer_id
    │   │                                                                               swarm/protocol.py
    │   ├── InvalidRequestError
    │   ├── InvalidTensorRemoteError
    │   ├── UnknownSessionError
    │   ├── BlocksNotServedError
    │   ├── PeerBusyError
    │   ├── PaymentRequiredError          a billing peer wants payment first (owed, limit, missing)
    │   ├── ReceiptRefusedError
    │   ├── SampleRefusedError
    │   └── HopFailedError                the call itself failed: transport, timeout or a malformed reply
    ├── ConfigError                       a setting, key, model folder or file cannot be used    chain/errors.py
    │   ├── KeyFormatError (ValueError)                                                 economy/signing.py
    │   ├── MissingClientKeyError (KeyError)                                            economy/chain_settlement.py
    │   ├── ModelFilesError (FileNotFoundError)                                         swarm/model_files.py
    │   │   └── ModelNotInstalledError                                                  dllm/model_choice.py
    │   ├── GgufError (ValueError)                                                      dllm/model_choice.py
    │   ├── UnsupportedArchitectureError (ValueError)                                   swarm/architectures.py
    │   ├── InvalidSpanError (ValueError)                                               peer/blocks.py
    │   ├── AdapterConfigError (ValueError)                                             peer/adapters.py
    │   ├── TrainingConfigError (ValueError)                                            peer/training.py
    │   ├── AveragingConfigError (ValueError)                                           peer/averaging.py
    │   ├── CanaryConfigError (ValueError)                                              peer/canary.py
    │   ├── CanaryExamplesError (ValueError)                                            peer/canary_examples.py
    │   └── RehearsalError (ValueError)                                                 peer/rehearsal.py
    └── UnavailableError                  something needed cannot be had now; a later try may work    chain/errors.py
        ├── CacheFullError (RuntimeError)                                               swarm/protocol.py
        ├── FeedbackStoreFullError (RuntimeError)                                       swarm/feedback_records.py
        ├── NoRouteError (RuntimeError)                                                 swarm/routing.py
        ├── SessionFailedError (RuntimeError)                                           swarm/session.py
        ├── SwarmUnavailableError (RuntimeError)                                        swarm/api.py
        ├── BootstrapError (ConnectionError)                                            swarm/dht.py
        ├── DirectStreamError (ConnectionError)                                         swarm/direct.py
        │   ├── FrameTooLargeError
        │   └── MalformedFrameError
        ├── SettlementSubmitError                                                       swarm/billing.py
        ├── StandingUnavailableError                                                    swarm/provider_standing.py
        ├── GossipError (RuntimeError)                                                  economy/gossip.py
        ├── CanaryEvaluationError (RuntimeError)                                        peer/canary_eval.py
        ├── ProcessStartError (RuntimeError)                                            dllm/processes.py
        ├── ServiceEndedError (RuntimeError)                                            dllm/service.py
        └── DemoError (RuntimeError)                                                    dllm/demo.py

Errors a peer answers with travel as `{"error": {"kind", "message"}}`; swarm/wire_errors.py is the one table
from these classes to wire kinds and back. The CLI's own errors (dllm/cli.py CommandError, dllm/config.py
ConfigFileError) are typer exceptions, outside this tree: typer prints them and sets the exit code.
Every failure a caller can act on has its own type, so callers never parse messages.
"""

from __future__ import annotations


class DLLMError(Exception):
    """Root of every exception DLLM raises on purpose: `except DLLMError` catches them all and no bug."""


class EconomyError(DLLMError):
    """A receipt, verdict, work sample, price or settlement fails its checks (raised by economy/)."""


class ConfigError(DLLMError):
    """A setting, key, model folder or file given to DLLM cannot be used."""


class UnavailableError(DLLMError):
    """Something needed cannot be had now (no route, a full cache, a process that did not start)."""


class ChainError(DLLMError):
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


class SlashPendingError(UnbondNotReadyError):
    """A council member opened a slash of the provider that is neither executed nor cancelled: no unbond yet."""


class DisputePendingError(UnbondNotReadyError):
    """The provider disputes evidence against it and the council's decision window is still open: no unbond yet."""


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

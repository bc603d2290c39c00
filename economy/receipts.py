"""Usage receipts co-signed by client and provider with their chain keys (sr25519).

A receipt covers one segment of one session on one provider's span (a whole short session, or
every N tokens of a long one: `sequence` numbers the segments). The provider proposes it from its
meter and signs; the client checks it against its own meter (`check_claim`) and countersigns. So a
provider cannot inflate usage (the client would not sign) and a client cannot deny a receipt (its
signature is on it). Settlement pays each receipt id at most once (`ReplayedReceiptError`).

A receipt also states which weights served the segment (`adapter_version`): 0 is the base model;
a LoRA version comes with `adapter_digest`, the sha256 of that version's adapter tensors
(peer.adapters.adapter_digest), so a verifier can fetch exactly those adapters from any peer holding
them and re-run the work with them (dllm/verifier.py). TRAINING_ADAPTERS (a training pass, run with
unpublished working adapters) is the one kind of work no spot check re-runs (docs/economy.md).
And it states the provider's compute dtype (`dtype`, one of COMPUTE_DTYPES): the spot check's
tolerance for float noise follows from it (economy.verification.Tolerance.for_dtype). The client
countersigns only the dtype the provider announced in its DHT record, so a provider cannot widen its
tolerance per receipt; claiming a lower precision than it computes in buys it at most that dtype's
honest noise bound (measured: docs/economy.md).

A receipt expires (`expires_at`, a block number: the provider's chain head when it proposes the receipt
+ RECEIPT_LIFETIME_BLOCKS). No settlement of it is valid from that block on: the client refuses to
countersign an expiry further than RECEIPT_LIFETIME_BLOCKS (+ EXPIRY_SLACK_BLOCKS) ahead, signs
settlements whose mortal era ends no later than their receipts' earliest expiry (so the runtime itself
refuses them afterwards), and never signs one holding a receipt within SETTLEMENT_MARGIN_BLOCKS of its
expiry (`check_expiry`); a provider refuses such an offer and settles before expiry. So once a receipt
has expired its marker can be released (`ComputeLedger.release_markers`, which returns the marker's
deposit): double payment is excluded by "marker present OR receipt expired", and what a client keeps
locked is bounded by the receipts it paid within one lifetime, not by its whole history (docs/chain.md).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from chain.errors import EconomyError
from economy import canonical, signing
from economy.canonical import CanonicalFormatError, FieldSpec
from economy.pricing import ProviderRate, Usage, provider_amount

if TYPE_CHECKING:  # keys come from callers; a peer that serves for free never loads substrate-interface
    from substrateinterface import Keypair

RECEIPT_TAG = "dllm.receipt.3"  # .2 added adapter_version, .3 dtype, expires_at, adapter_digest: older ones reject
SIGNED_RECEIPT_TAG = "dllm.signed_receipt.1"
RECEIPT_DOMAIN = b"dllm/receipt/1:"
BASE_WEIGHTS = 0
"""adapter_version of work served with the base model's weights (no adapter, or adapters still at zero)."""
TRAINING_ADAPTERS = canonical.MAX_U64
"""adapter_version of a training pass: the peer's working adapters, which are no published version."""
NO_ADAPTER_DIGEST = bytes(32)
"""adapter_digest of work served with the base weights or in a training pass (no published adapters)."""
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""Dtypes a provider may state it computes in (each has a measured spot-check tolerance)."""
RECEIPT_LIFETIME_BLOCKS = 2048
"""Blocks from a receipt's proposal to its expiry: 6.8 h at 12 s blocks, 3.4 h at 6 s. It must fit in one mortal
era of the runtime (BlockHashCount: 4096 on Asset Hub), which is what makes the runtime refuse a late settlement."""
EXPIRY_SLACK_BLOCKS = 64
"""How far the provider's head may run ahead of the client's when it sets an expiry (nodes lag behind each other)."""
SETTLEMENT_MARGIN_BLOCKS = 16
"""A settlement is signed or accepted only while each of its receipts has at least this many blocks left, so a
provider has time to submit it before its era ends."""
NO_EXPIRY = canonical.MAX_U64
"""expires_at of a receipt issued without a chain (an offline provider's): no paying client countersigns it."""


class ReceiptError(EconomyError, ValueError):
    """Base of every reason a receipt is refused."""


class MalformedReceiptError(ReceiptError):
    """The bytes are not a well-formed receipt, or its amount does not follow from its usage."""


class ForgedReceiptError(ReceiptError):
    """A signature on the receipt was not made by the account the receipt names."""


class WrongSignerError(ReceiptError):
    """The receipt is signed, but by or for a party other than the expected one."""


class ReplayedReceiptError(ReceiptError):
    """The receipt was already stored or settled; paying it again would pay twice."""


class UsageInflationError(ReceiptError):
    """A provider's claim exceeds what the client observed."""


class CommitmentMismatchError(ReceiptError):
    """A provider's output commitment differs from the one the client computed."""


class RateMismatchError(ReceiptError):
    """A provider's claimed rate or parameter count differs from what the client agreed to."""


class DtypeMismatchError(ReceiptError):
    """A provider's receipt states another compute dtype than the one its DHT record announced."""


class ExpiredReceiptError(ReceiptError):
    """The receipt has expired, or will before a settlement of it could land: no settlement of it is valid."""


class TrainingClaimError(ReceiptError):
    """A receipt states a training pass (never spot-checked) for work in which the client sent no backward pass."""


class UnexpectedReceiptError(ReceiptError):
    """A delivered receipt is validly signed but is not the one the provider proposed for the session."""


class NothingToBillError(ReceiptError):
    """The session has no metered work since its last receipt."""


_RECEIPT_SCHEMA = (
    FieldSpec("network", "str", max_len=80),
    FieldSpec("session_id", "bytes", max_len=64),
    FieldSpec("sequence", "u64"),
    FieldSpec("model", "str", max_len=256),
    FieldSpec("start", "u64"),
    FieldSpec("end", "u64"),
    FieldSpec("params_served", "u64"),
    FieldSpec("prompt_tokens", "u64"),
    FieldSpec("generated_tokens", "u64"),
    FieldSpec("backward_tokens", "u64"),
    FieldSpec("max_context", "u64"),
    FieldSpec("sampled", "bool"),
    FieldSpec("rate_prompt", "u64"),
    FieldSpec("rate_generated", "u64"),
    FieldSpec("amount", "u64"),
    FieldSpec("provider", "ss58"),
    FieldSpec("client", "ss58"),
    FieldSpec("commitment_before", "bytes", exact_len=32),
    FieldSpec("commitment", "bytes", exact_len=32),
    FieldSpec("issued_at", "u64"),
    FieldSpec("adapter_version", "u64"),
    FieldSpec("dtype", "str", max_len=16),
    FieldSpec("expires_at", "u64"),
    FieldSpec("adapter_digest", "bytes", exact_len=32),
)
_SIGNED_SCHEMA = (
    FieldSpec("receipt", "bytes", max_len=canonical.MAX_RECORD_BYTES),
    FieldSpec("provider_signature", "bytes", exact_len=signing.SIGNATURE_BYTES),
    FieldSpec("client_signature", "bytes", exact_len=signing.SIGNATURE_BYTES),
)


@dataclass(frozen=True)
class UsageReceipt:
    """What one provider computed for one client in one session segment, and what it costs."""

    network: str
    """Chain the receipt is payable on (genesis hash or name): no replay across chains."""
    session_id: bytes
    sequence: int
    model: str
    start: int
    end: int
    params_served: int
    prompt_tokens: int
    generated_tokens: int
    backward_tokens: int
    max_context: int
    sampled: bool
    rate_prompt: int
    rate_generated: int
    amount: int
    """Planck owed, = pricing.provider_amount(rate, params_served, usage) exactly."""
    provider: str
    client: str
    commitment_before: bytes
    """Commitment chain value where this segment begins (links consecutive receipts)."""
    commitment: bytes
    """Commitment chain value after this segment's last step (the output commitment)."""
    issued_at: int
    adapter_version: int = BASE_WEIGHTS
    """Weights the session's steps ran with: BASE_WEIGHTS, a LoRA adapter version, or TRAINING_ADAPTERS."""
    dtype: str = "float32"
    """The provider's compute dtype (COMPUTE_DTYPES), as announced in its DHT record: sets the check's tolerance."""
    expires_at: int = NO_EXPIRY
    """Block number from which no settlement of this receipt is valid (see the module docstring)."""
    adapter_digest: bytes = NO_ADAPTER_DIGEST
    """sha256 of the adapter version's tensors (peer.adapters.adapter_digest); NO_ADAPTER_DIGEST without one."""

    @property
    def base_weights(self) -> bool:
        """True when a verifier holding only the base model can recompute this work."""
        return self.adapter_version == BASE_WEIGHTS

    @property
    def published_adapters(self) -> bool:
        """True when the work ran with a published adapter version, fetchable by `adapter_digest`."""
        return self.adapter_version not in (BASE_WEIGHTS, TRAINING_ADAPTERS)

    def encode(self) -> bytes:
        """Canonical bytes (raises MalformedReceiptError if a field is out of range)."""
        try:
            return canonical.encode(RECEIPT_TAG, _RECEIPT_SCHEMA, tuple(getattr(self, f.name) for f in fields(self)))
        except CanonicalFormatError as e:
            raise MalformedReceiptError(str(e)) from None

    @property
    def receipt_id(self) -> str:
        """0x-hex blake2b-256 of the canonical bytes: the id the chain deduplicates on."""
        return canonical.record_id(self.encode())

    @property
    def receipt_id_bytes(self) -> bytes:
        """The id as 32 raw bytes (what the chain stores)."""
        return canonical.digest(self.encode())

    @property
    def rate(self) -> ProviderRate:
        return ProviderRate(prompt=self.rate_prompt, generated=self.rate_generated)

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.generated_tokens, self.backward_tokens, self.max_context, self.sampled)

    def expected_amount(self) -> int:
        return provider_amount(self.rate, self.params_served, self.usage)

    @classmethod
    def decode(cls, data: bytes) -> UsageReceipt:
        """Parses canonical bytes; raises MalformedReceiptError on anything else."""
        try:
            values = canonical.decode(RECEIPT_TAG, _RECEIPT_SCHEMA, data)
        except CanonicalFormatError as e:
            raise MalformedReceiptError(f"malformed receipt: {e}") from None
        receipt = cls(*values)
        receipt.check_consistent()
        return receipt

    def check_consistent(self) -> None:
        """Raises MalformedReceiptError unless span, parties and amount are coherent."""
        if self.end <= self.start:
            raise MalformedReceiptError(f"receipt span {self.start}:{self.end} is empty")
        if self.provider == self.client:
            raise MalformedReceiptError("a provider cannot bill itself")
        if self.dtype not in COMPUTE_DTYPES:
            raise MalformedReceiptError(f"receipt dtype {self.dtype!r:.20} is not one of {', '.join(COMPUTE_DTYPES)}")
        if self.published_adapters == (self.adapter_digest == NO_ADAPTER_DIGEST):
            raise MalformedReceiptError(
                "a receipt names an adapter digest exactly when it names a published adapter version "
                f"(version {self.adapter_version})"
            )
        expected = self.expected_amount()
        if self.amount != expected:
            raise MalformedReceiptError(
                f"receipt amount {self.amount} does not follow from its usage and rate (expected {expected})"
            )


def sign_as_provider(receipt: UsageReceipt, keypair: Keypair) -> bytes:
    """Provider's signature; raises WrongSignerError if `keypair` is not the receipt's provider."""
    if keypair.ss58_address != receipt.provider:
        raise WrongSignerError(f"key {keypair.ss58_address} is not the receipt's provider {receipt.provider}")
    receipt.check_consistent()
    return signing.sign(keypair, RECEIPT_DOMAIN, receipt.encode())


def sign_as_client(receipt: UsageReceipt, keypair: Keypair) -> bytes:
    """Client's countersignature; call `check_claim` first. Raises WrongSignerError on a wrong key."""
    if keypair.ss58_address != receipt.client:
        raise WrongSignerError(f"key {keypair.ss58_address} is not the receipt's client {receipt.client}")
    receipt.check_consistent()
    return signing.sign(keypair, RECEIPT_DOMAIN, receipt.encode())


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt with both parties' signatures: what a provider stores and settles."""

    receipt: UsageReceipt
    provider_signature: bytes
    client_signature: bytes

    @property
    def receipt_id(self) -> str:
        return self.receipt.receipt_id

    def encode(self) -> bytes:
        try:
            return canonical.encode(
                SIGNED_RECEIPT_TAG,
                _SIGNED_SCHEMA,
                (self.receipt.encode(), self.provider_signature, self.client_signature),
            )
        except CanonicalFormatError as e:
            raise MalformedReceiptError(str(e)) from None

    @classmethod
    def decode(cls, data: bytes) -> SignedReceipt:
        """Parses bytes (signatures not yet checked: call `verify_receipt`). Raises MalformedReceiptError."""
        try:
            inner, provider_sig, client_sig = canonical.decode(SIGNED_RECEIPT_TAG, _SIGNED_SCHEMA, data)
        except CanonicalFormatError as e:
            raise MalformedReceiptError(f"malformed signed receipt: {e}") from None
        return cls(UsageReceipt.decode(inner), provider_sig, client_sig)

    @classmethod
    def create(cls, receipt: UsageReceipt, provider: Keypair, client: Keypair) -> SignedReceipt:
        """Both signatures at once (when one process holds both keys, e.g. a local demo)."""
        return cls(receipt, sign_as_provider(receipt, provider), sign_as_client(receipt, client))


def _check_signature(role: str, signer: str, other: str, payload: bytes, signature: bytes) -> None:
    if signing.verify(signer, RECEIPT_DOMAIN, payload, signature):
        return
    if signing.verify(other, RECEIPT_DOMAIN, payload, signature):
        raise WrongSignerError(f"the {role} signature was made by {other}, not by the {role} {signer}")
    raise ForgedReceiptError(f"the {role} signature does not verify for {signer}: the receipt was forged or altered")


def verify_receipt(
    signed: SignedReceipt,
    *,
    expected_client: str | None = None,
    expected_provider: str | None = None,
    network: str | None = None,
    settled: Container[str] | None = None,
) -> str:
    """Checks a co-signed receipt; returns its id.

    Raises MalformedReceiptError (incoherent content or another network), WrongSignerError (a party
    other than the expected one), ForgedReceiptError (a signature that does not verify),
    ReplayedReceiptError (its id is in `settled`).
    """
    r = signed.receipt
    r.check_consistent()
    if network is not None and r.network != network:
        raise MalformedReceiptError(f"receipt is for network {r.network!r}, not {network!r}")
    if expected_provider is not None and r.provider != expected_provider:
        raise WrongSignerError(f"receipt names provider {r.provider}, expected {expected_provider}")
    if expected_client is not None and r.client != expected_client:
        raise WrongSignerError(f"receipt names client {r.client}, but the session's client is {expected_client}")
    payload = r.encode()
    _check_signature("provider", r.provider, r.client, payload, signed.provider_signature)
    _check_signature("client", r.client, r.provider, payload, signed.client_signature)
    receipt_id = canonical.record_id(payload)
    if settled is not None and receipt_id in settled:
        raise ReplayedReceiptError(f"receipt {receipt_id} was already settled")
    return receipt_id


def check_claim(
    claimed: UsageReceipt,
    observed: Usage,
    observed_commitment: bytes,
    agreed_rate: ProviderRate,
    agreed_params: int,
    *,
    announced_dtype: str | None = None,
) -> None:
    """Client-side check before countersigning a provider's proposed receipt.

    Raises UsageInflationError if any claimed count exceeds the client's own meter,
    CommitmentMismatchError if the output commitment differs, RateMismatchError if the rate or the
    parameter count differs from the quote, DtypeMismatchError if the dtype is not `announced_dtype`
    (the one the provider's record announced: a provider must not pick its tolerance per receipt),
    TrainingClaimError if it states a training pass while the client metered no backward step (a
    provider's way to dodge spot checks), MalformedReceiptError if the amount is incoherent.
    """
    claimed.check_consistent()
    if announced_dtype is not None and claimed.dtype != announced_dtype:
        raise DtypeMismatchError(
            f"receipt states compute dtype {claimed.dtype}, the provider announced {announced_dtype}"
        )
    if claimed.rate != agreed_rate or claimed.params_served != agreed_params:
        raise RateMismatchError(
            f"receipt prices {claimed.params_served} params at {claimed.rate}, "
            f"agreed {agreed_params} params at {agreed_rate}"
        )
    c = claimed.usage
    for name in ("prompt_tokens", "generated_tokens", "backward_tokens", "max_context"):
        if getattr(c, name) > getattr(observed, name):
            raise UsageInflationError(
                f"provider claims {name}={getattr(c, name)} but the client metered {getattr(observed, name)}"
            )
    if c.sampled and not observed.sampled:
        raise UsageInflationError("provider claims sampling surcharge on a greedy session")
    if claimed.adapter_version == TRAINING_ADAPTERS and observed.backward_tokens == 0:
        raise TrainingClaimError("the receipt states a training pass, but the client sent no backward pass")
    if claimed.commitment != observed_commitment:
        raise CommitmentMismatchError(
            f"provider commits to {claimed.commitment.hex()[:16]}..., "
            f"client computed {observed_commitment.hex()[:16]}..."
        )


def check_expiry(receipt: UsageReceipt, head: int, *, proposed: bool = False) -> None:
    """Raises ExpiredReceiptError unless a settlement of `receipt` may still be signed or accepted at block `head`.

    It must have SETTLEMENT_MARGIN_BLOCKS left. With `proposed` (the client, before it countersigns), its expiry
    must also be no further than RECEIPT_LIFETIME_BLOCKS + EXPIRY_SLACK_BLOCKS ahead: a later one would keep the
    client's marker deposit locked longer than the protocol's bound.
    """
    left = receipt.expires_at - head
    if left < SETTLEMENT_MARGIN_BLOCKS:
        raise ExpiredReceiptError(
            f"receipt {receipt.receipt_id} expires at block {receipt.expires_at}: at block {head} no settlement "
            f"of it is valid (each needs {SETTLEMENT_MARGIN_BLOCKS} blocks left)"
        )
    if proposed and left > RECEIPT_LIFETIME_BLOCKS + EXPIRY_SLACK_BLOCKS:
        raise ExpiredReceiptError(
            f"receipt expiry {receipt.expires_at} is {left} blocks after block {head}; "
            f"at most {RECEIPT_LIFETIME_BLOCKS + EXPIRY_SLACK_BLOCKS} are accepted"
        )


def receipt_for_segment(
    *,
    network: str,
    session_id: bytes,
    sequence: int,
    model: str,
    start: int,
    end: int,
    params_served: int,
    rate: ProviderRate,
    usage: Usage,
    provider: str,
    client: str,
    commitment_before: bytes,
    commitment: bytes,
    issued_at: int,
    adapter_version: int = BASE_WEIGHTS,
    dtype: str = "float32",
    expires_at: int = NO_EXPIRY,
    adapter_digest: bytes = NO_ADAPTER_DIGEST,
) -> UsageReceipt:
    """The receipt a provider proposes for one metered segment (from `UsageMeter.close_segment()`)."""
    receipt = UsageReceipt(
        network=network,
        session_id=session_id,
        sequence=sequence,
        model=model,
        start=start,
        end=end,
        params_served=params_served,
        prompt_tokens=usage.prompt_tokens,
        generated_tokens=usage.generated_tokens,
        backward_tokens=usage.backward_tokens,
        max_context=usage.max_context,
        sampled=usage.sampled,
        rate_prompt=rate.prompt,
        rate_generated=rate.generated,
        amount=provider_amount(rate, params_served, usage),
        provider=provider,
        client=client,
        commitment_before=commitment_before,
        commitment=commitment,
        issued_at=issued_at,
        adapter_version=adapter_version,
        dtype=dtype,
        expires_at=expires_at,
        adapter_digest=adapter_digest,
    )
    receipt.encode()  # validates every field now rather than at signing time
    receipt.check_consistent()
    return receipt

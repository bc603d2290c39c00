"""Deterministic account ids the protocol uses, derived exactly as the runtime derives them.

- multisig account: pallet_multisig's `multi_account_id(sorted signatories, threshold)`;
- derivative account: pallet_utility's `derivative_account_id(who, index)` (`Utility.as_derivative`);
- keyless accounts (receipt registry, burn sink): 32-byte hashes of a fixed label. Nobody holds a
  private key for them, so nobody can sign for them.
"""

from __future__ import annotations

import hashlib

from chain.errors import InvalidAddressError

# Both pallets hash this 16-byte prefix (SCALE-encoded as a fixed array, without a length).
_PALLET_ENTROPY = b"modlpy/utilisuba"

# Escrow accounts nest this many `as_derivative` levels (16 bits each): 48 bits keeps collisions
# between providers' escrows negligible (and registration still refuses a collision).
ESCROW_DERIVATION_DEPTH = 3


def blake2_256(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _compact_length(n: int) -> bytes:
    # SCALE compact encoding of a length (all lengths used here are small).
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 1).to_bytes(2, "little")
    return ((n << 2) | 2).to_bytes(4, "little")


def account_id(address: str, ss58_format: int | None = None) -> bytes:
    """The 32-byte public key behind an SS58 address (any prefix unless `ss58_format` is given)."""
    if not isinstance(address, str) or not address:
        raise InvalidAddressError(f"expected an SS58 address string, got {address!r}")
    from scalecodec.utils.ss58 import ss58_decode  # loaded by the first address, not with this module

    try:
        raw = ss58_decode(address, valid_ss58_format=ss58_format)
    except Exception as exc:  # scalecodec raises ValueError or IndexError on garbage
        raise InvalidAddressError(f"{address!r} is not a valid SS58 address: {exc}") from exc
    if len(raw) != 64:
        raise InvalidAddressError(f"{address!r} is not a 32-byte account address")
    return bytes.fromhex(raw)


def address(account: bytes, ss58_format: int) -> str:
    """The SS58 address of a 32-byte account id."""
    from scalecodec.utils.ss58 import ss58_encode

    encoded: str = ss58_encode(account, ss58_format=ss58_format)
    return encoded


def multisig_account(signatories: list[bytes], threshold: int) -> bytes:
    """The account a `threshold`-of-n multisig of `signatories` dispatches from."""
    members = sorted(set(signatories))
    if len(members) != len(signatories):
        raise ValueError("multisig signatories must be distinct")
    encoded = _compact_length(len(members)) + b"".join(members)
    return blake2_256(_PALLET_ENTROPY + encoded + threshold.to_bytes(2, "little"))


def derivative_account(parent: bytes, index: int) -> bytes:
    """The account `Utility.as_derivative(index, ...)` dispatches from when called by `parent`."""
    return blake2_256(_PALLET_ENTROPY + parent + index.to_bytes(2, "little"))


def escrow_indices(provider: bytes) -> tuple[int, ...]:
    """The nested `as_derivative` indices of a provider's escrow (outermost first)."""
    digest = blake2_256(b"dllm:v1:escrow" + provider)
    return tuple(int.from_bytes(digest[2 * i : 2 * i + 2], "little") for i in range(ESCROW_DERIVATION_DEPTH))


def escrow_account(council_account: bytes, provider: bytes) -> bytes:
    """The stake escrow of `provider`: a derivative of the council's multisig account.

    Only a call dispatched from the council account (i.e. `Multisig.as_multi` approved by a
    threshold of council members) can move its funds.
    """
    account = council_account
    for index in escrow_indices(provider):
        account = derivative_account(account, index)
    return account


def keyless_account(label: str) -> bytes:
    """A 32-byte account id derived from a label: no private key exists for it."""
    return blake2_256(label.encode())


RECEIPT_REGISTRY_ACCOUNT = keyless_account("dllm:v1:receipt-registry")
BURN_ACCOUNT = keyless_account("dllm:v1:burn")

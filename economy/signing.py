"""sr25519 signatures with chain keys, domain-separated per record type.

Every signed message is `domain | payload`, so a signature over a receipt can never be replayed as
a verdict or a gossip envelope (and vice versa).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chain.errors import ConfigError

if TYPE_CHECKING:  # substrate-interface (0.2-0.5 s of imports) loads with the first key, not with this module
    from substrateinterface import Keypair

SIGNATURE_BYTES = 64


def sign(keypair: Keypair, domain: bytes, payload: bytes) -> bytes:
    """64-byte sr25519 signature of `domain | payload` with `keypair` (must hold a private key)."""
    from substrateinterface import KeypairType

    if keypair.crypto_type != KeypairType.SR25519:
        raise ValueError("DLLM records are signed with sr25519 chain keys")
    return bytes(keypair.sign(domain + payload))


def verify(address: str, domain: bytes, payload: bytes, signature: bytes) -> bool:
    """True iff `signature` is the sr25519 signature of `domain | payload` by `address`'s key.

    Never raises: a malformed address or signature simply does not verify.
    """
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        return False
    from substrateinterface import Keypair, KeypairType

    try:
        return bool(Keypair(ss58_address=address, crypto_type=KeypairType.SR25519).verify(domain + payload, signature))
    except Exception:  # bad address encodings raise assorted errors inside substrate-interface
        return False


class KeyFormatError(ConfigError, ValueError):
    """A chain key is neither a dev URI (//Name), a mnemonic, nor a 0x-prefixed seed."""


def load_keypair(key: str, ss58_format: int = 42) -> Keypair:
    """The sr25519 keypair for a key as users give it: //Dev URI (or derivation path), mnemonic, or 0x seed."""
    from substrateinterface import Keypair

    try:
        if key.startswith("/"):
            return Keypair.create_from_uri(key, ss58_format=ss58_format)
        if key.startswith("0x"):
            return Keypair.create_from_seed(key, ss58_format=ss58_format)
        return Keypair.create_from_mnemonic(key, ss58_format=ss58_format)
    except Exception as e:  # substrate-interface raises assorted types for bad keys
        raise KeyFormatError(
            f"not a usable sr25519 key ({type(e).__name__}); give //Name, a mnemonic or a 0x seed"
        ) from None

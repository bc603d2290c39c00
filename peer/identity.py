"""A peer's persistent identity: its libp2p key (peer id) and the RSA key that signs its DHT records."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from hivemind.utils.crypto import RSAPrivateKey


def load_or_create_record_key(path: Path) -> RSAPrivateKey:
    """The RSA key at `path` (DER), created on first use, so a restarted peer owns its old records."""
    key = RSAPrivateKey()
    if path.is_file():
        key._private_key = serialization.load_der_private_key(path.read_bytes(), password=None)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.to_bytes())
        path.chmod(0o600)
    return key

"""Signed replica declarations and commit votes: only the owner of a libp2p peer id can speak for it.

The replicas of a span publish in the DHT who they are (`<prefix>.replicas`) and how they vote on a
round (`<prefix>.commit.<round>`). Every replica reads both to decide whether a round may go live, so
a forged entry could veto rounds (declare a replica that never comes, vote no for an honest one) or
override them (vote yes for a replica whose canary said no). Each entry is therefore signed with the
libp2p RSA key whose hash *is* the peer id (hivemind's `PeerID.from_identity`): the value carries the
DER public key and an RSA-PSS signature over (domain, DHT key, peer id, payload, expiry).

Invariants:
- a reader accepts an entry only if its public key hashes to the peer id it names and the signature
  verifies for that exact DHT key (a vote of one round is no vote in another);
- the expiry is the signed one, never the DHT's: a replayed old declaration ends when it was signed to;
- entries are stored under an owner-marked subkey (`peer id + [owner:...]`, hivemind's
  RSASignatureValidator in every DLLM DHT node), so nobody else can overwrite or delete them.

Threat left: a peer id costs nothing, so a Sybil that declares itself and never joins the group still
makes rounds skip (as any replica may: every member must say yes). It cannot make an update go live.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

logger = logging.getLogger(__name__)

SIGNED_ENTRY_DOMAIN = "dllm/replica-entry/1"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
_MAX_PUBLIC_KEY_BYTES = 1024


def _message(key: str, peer_id: str, payload: Any, expires_at: float) -> bytes:
    packed: bytes = msgpack.packb([SIGNED_ENTRY_DOMAIN, key, peer_id, payload, float(expires_at)], use_bin_type=True)
    return packed


def peer_id_of(public_der: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in DER SubjectPublicKeyInfo form."""
    wrapped = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(wrapped).digest(), multihash.coerce_code("sha2-256"))).to_base58()


@dataclass(frozen=True)
class ReplicaIdentity:
    """This replica's libp2p private key (its peer id) and its DHT record owner marker (may be empty)."""

    private_key: rsa.RSAPrivateKey
    owner_marker: bytes = b""

    @classmethod
    def from_file(cls, identity_path: Path, owner_marker: bytes = b"") -> ReplicaIdentity:
        """The key of a libp2p identity file (hivemind's `identity_path`: a protobuf PrivateKey, RSA)."""
        message = crypto_pb2.PrivateKey.FromString(Path(identity_path).read_bytes())
        if message.key_type != crypto_pb2.RSA:
            raise ValueError(f"{identity_path}: only RSA libp2p identities are supported")
        key = serialization.load_der_private_key(message.data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{identity_path}: not an RSA private key")
        return cls(key, owner_marker)

    @property
    def public_der(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_der)

    @property
    def subkey(self) -> bytes:
        """Where this replica stores its entries: owner-marked, so only its record key can change them."""
        return self.peer_id.encode() + self.owner_marker

    def sign(self, key: str, payload: Any, expires_at: float) -> dict[str, Any]:
        """The DHT value of a signed entry for `key`."""
        peer_id = self.peer_id
        signature = self.private_key.sign(_message(key, peer_id, payload, expires_at), _PSS, hashes.SHA256())
        return {
            "peer": peer_id,
            "payload": payload,
            "expires_at": float(expires_at),
            "pub": self.public_der,
            "sig": signature,
        }


class SignedEntryReader:
    """Verifies signed entries read back from the DHT (results cached: the same values are polled often)."""

    def __init__(self, cache_size: int = 4096):
        self._verified: dict[bytes, bool] = {}
        self._cache_size = cache_size

    def verified(self, key: str, value: Any, now: float) -> tuple[str, Any] | None:
        """(peer id, payload) of a valid, unexpired entry for `key`; None for anything else."""
        if not isinstance(value, dict):
            return None
        peer, payload, expires_at = value.get("peer"), value.get("payload"), value.get("expires_at")
        pub, sig = value.get("pub"), value.get("sig")
        if not (
            isinstance(peer, str)
            and isinstance(expires_at, float)
            and math.isfinite(expires_at)
            and isinstance(pub, bytes)
            and 0 < len(pub) <= _MAX_PUBLIC_KEY_BYTES
            and isinstance(sig, bytes)
        ):
            return None
        if expires_at < now:
            return None
        message = _message(key, peer, payload, expires_at)
        cache_key = hashlib.sha256(message + pub + sig).digest()
        ok = self._verified.get(cache_key)
        if ok is None:
            ok = self._check(peer, pub, sig, message)
            if len(self._verified) >= self._cache_size:
                self._verified.clear()
            self._verified[cache_key] = ok
        return (peer, payload) if ok else None

    @staticmethod
    def _check(peer: str, pub: bytes, sig: bytes, message: bytes) -> bool:
        try:
            if peer_id_of(pub) != peer:
                return False
            public_key = serialization.load_der_public_key(pub)
            if not isinstance(public_key, rsa.RSAPublicKey):
                return False
            public_key.verify(sig, message, _PSS, hashes.SHA256())
            return True
        except (InvalidSignature, ValueError, TypeError):
            return False

    def entries(self, key: str, found: Any, now: float) -> dict[str, Any]:
        """peer id -> payload of every valid entry of a DHT dictionary value (`dht.get(key).value`)."""
        if not isinstance(found, dict):
            return {}
        out: dict[str, Any] = {}
        for item in found.values():
            value = getattr(item, "value", None)
            checked = self.verified(key, value, now)
            if checked is not None:
                out[checked[0]] = checked[1]
            elif value is not None:
                logger.debug("ignored an unsigned or forged entry under %s", key)
        return out

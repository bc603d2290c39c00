"""Who sent a feedback pass: a chain account's sr25519 signature over the pass, checked by every peer.

A learning peer files each training pass's adapter gradients under a contributor, and rate-limits and
robustly aggregates per contributor (peer/training.py). A libp2p peer id is free to renew, so the
contributor is the chain account that signs the pass instead: the backward request of a training pass
carries `contributor` = {account (SS58), nonce, at (unix time), example, signature}, the signature covering
(domain, model, the receiving peer's id, the blocks, each tensor's dtype, shape and SHA-256, nonce, at, and
`example`: the content hash of the published FeedbackExample the pass trains on, swarm/feedback_records.py).

Invariants, checked by `ContributionVerifier` before any compute:
- the signature verifies for the account's public key, so passes are filed under an account only by
  its key holder; a signature names its peer and its exact tensors, so it is worth one pass on one peer;
- `at` is within MAX_CLOCK_SKEW_S of the peer's clock and (account, nonce) is accepted once within that
  window, so a captured signature cannot be replayed;
- an unsigned or badly signed training pass is refused (ContributorAuthError), never filed under the
  caller's peer id;
- the signature binds the pass to one exact published text: the peer checks the example it receives hashes
  to the signed `example` before any compute (peer/handler.py), so a pass cannot train on text other than
  the one published under its contributor.

Threat left: accounts cost nothing to create either. A free peer's per-account rate limit bounds what
one key does; a charging peer makes every pass paid by the account that signs it (the billing client
signs with its paying key), which is what bounds a Sybil's passes there.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from swarm.protocol import ProtocolError

if TYPE_CHECKING:
    from hivemind.proto import runtime_pb2
    from substrateinterface import Keypair

CONTRIBUTION_DOMAIN = "dllm/contribution/1"
MAX_CLOCK_SKEW_S = 120.0
_NONCE_BYTES = 16


class ContributorAuthError(ProtocolError):
    """A training pass lacks a valid contributor signature (missing, malformed, forged, stale or replayed)."""


def contribution_message(
    model: str,
    peer_id: str,
    blocks: tuple[int, int],
    tensors: Sequence[runtime_pb2.Tensor],
    nonce: bytes,
    at: float,
    example: bytes | None = None,
) -> bytes:
    """The bytes a contributor signs for one training pass to one peer (`example`: the content hash of the
    FeedbackExample it trains on)."""
    digests = [[t.dtype, list(t.size), hashlib.sha256(t.buffer).digest()] for t in tensors]
    packed: bytes = msgpack.packb(
        [CONTRIBUTION_DOMAIN, model, peer_id, list(blocks), digests, nonce, float(at), example], use_bin_type=True
    )
    return packed


@dataclass(frozen=True)
class ContributorKey:
    """The sr25519 key of the chain account a client's feedback is filed under."""

    keypair: Keypair

    @classmethod
    def from_uri(cls, uri: str) -> ContributorKey:
        """From //Name, a mnemonic or a 0x seed (as BillingConfig.client_key)."""
        from substrateinterface import Keypair

        if uri.startswith("0x"):
            return cls(Keypair.create_from_seed(uri))
        if uri.startswith("/"):
            return cls(Keypair.create_from_uri(uri))
        return cls(Keypair.create_from_mnemonic(uri))

    @classmethod
    def generate(cls) -> ContributorKey:
        """A fresh account (a client that names none: its passes still count under one key)."""
        from substrateinterface import Keypair

        return cls(Keypair.create_from_seed("0x" + os.urandom(32).hex()))

    @property
    def account(self) -> str:
        address: str = self.keypair.ss58_address
        return address

    def sign_pass(
        self,
        model: str,
        peer_id: str,
        blocks: tuple[int, int],
        tensors: Sequence[runtime_pb2.Tensor],
        example: bytes | None = None,
    ) -> dict[str, Any]:
        """The `contributor` metadata field of one training backward request (`example`: the content hash of
        the FeedbackExample the pass trains on)."""
        nonce, at = os.urandom(_NONCE_BYTES), time.time()
        message = contribution_message(model, peer_id, blocks, tensors, nonce, at, example)
        signature: bytes = self.keypair.sign(message)
        return {"account": self.account, "nonce": nonce, "at": at, "example": example, "signature": signature}


class ContributionVerifier:
    """A peer's check of training passes' contributor signatures, with its replay window."""

    def __init__(self, model: str, peer_id: str, max_skew_s: float = MAX_CLOCK_SKEW_S):
        self.model = model
        self.peer_id = peer_id
        self.max_skew_s = max_skew_s
        self._seen: dict[tuple[str, bytes], float] = {}
        self._lock = threading.Lock()

    def verify(
        self,
        field: Any,
        blocks: tuple[int, int],
        tensors: Sequence[runtime_pb2.Tensor],
        now: float | None = None,
        example: bytes | None = None,
    ) -> str:
        """The signing account of a training pass; raises ContributorAuthError if it is not validly signed, or
        if the signature does not name `example` (the content hash of the example the pass came with)."""
        if field is None:
            raise ContributorAuthError(
                "a training pass must be signed by a chain account (metadata 'contributor'); update the client"
            )
        if not isinstance(field, dict):
            raise ContributorAuthError("'contributor' must be a map {account, nonce, at, signature}")
        account, nonce, at, signature = (field.get(k) for k in ("account", "nonce", "at", "signature"))
        if field.get("example") != example:
            raise ContributorAuthError(
                "the training pass's signature does not name the content hash of the example it carries"
            )
        if not (
            isinstance(account, str)
            and 0 < len(account) < 64
            and isinstance(nonce, bytes)
            and len(nonce) == _NONCE_BYTES
            and isinstance(at, float)
            and isinstance(signature, bytes)
            and len(signature) == 64
        ):
            raise ContributorAuthError("'contributor' needs account (SS58), 16-byte nonce, float at, 64-byte signature")
        now = time.time() if now is None else now
        if not abs(now - at) <= self.max_skew_s:
            raise ContributorAuthError(f"contributor signature time is {now - at:+.0f} s off this peer's clock")
        public_key = _public_key(account)
        import sr25519

        message = contribution_message(self.model, self.peer_id, blocks, tensors, nonce, at, example)
        try:  # sr25519 raises ValueError for bytes that are no schnorrkel signature at all
            valid = sr25519.verify(signature, message, public_key)
        except ValueError:
            valid = False
        if not valid:
            raise ContributorAuthError(f"the contributor signature does not verify for account {account}")
        with self._lock:
            for key in [k for k, seen_at in self._seen.items() if abs(now - seen_at) > 2 * self.max_skew_s]:
                del self._seen[key]
            if (account, nonce) in self._seen:
                raise ContributorAuthError(f"a replayed training pass of account {account} (nonce seen before)")
            self._seen[(account, nonce)] = at
        return account


def _public_key(account: str) -> bytes:
    from scalecodec.utils.ss58 import ss58_decode

    try:
        decoded: str = ss58_decode(account)
        key = bytes.fromhex(decoded)
    except (ValueError, TypeError, IndexError) as e:
        raise ContributorAuthError(f"contributor account {account[:64]!r} is not an SS58 address: {e}") from None
    if len(key) != 32:
        raise ContributorAuthError(f"contributor account {account[:64]!r} does not hold a 32-byte public key")
    return key


def load_api_keys(path: Any) -> dict[str, ContributorKey]:
    """API key -> contributor key, from a file of `API_KEY<whitespace>CHAIN_KEY` lines (`#` comments).

    CHAIN_KEY is an sr25519 key as ContributorKey.from_uri reads it (//Name, 0x seed, or a mnemonic, which
    may contain spaces). Raises ValueError naming the line of anything malformed or a repeated API key."""
    from pathlib import Path

    keys: dict[str, ContributorKey] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) < 16:
            raise ValueError(f"{path}:{number}: expected 'API_KEY CHAIN_KEY' with an API key of >= 16 characters")
        if parts[0] in keys:
            raise ValueError(f"{path}:{number}: API key listed twice")
        try:
            keys[parts[0]] = ContributorKey.from_uri(parts[1].strip())
        except Exception as e:  # substrate-interface raises many types for a bad key
            raise ValueError(f"{path}:{number}: not an sr25519 key: {type(e).__name__}") from None
    return keys

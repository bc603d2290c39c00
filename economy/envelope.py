"""Signed gossip envelopes: every message on the economy topics names and proves its sender.

The signature covers the topic, so a message cannot be replayed onto another topic; the timestamp
and nonce make each envelope unique (GossipSub deduplicates by content) and let receivers drop
stale ones. Sender = the chain account (ss58) the rate limit and reputation are keyed on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from substrateinterface import Keypair

from chain.errors import EconomyError
from economy import canonical, signing
from economy.canonical import CanonicalFormatError, FieldSpec

ENVELOPE_TAG = "dllm.envelope.1"
ENVELOPE_DOMAIN = b"dllm/envelope/1:"
MAX_PAYLOAD_BYTES = 16 * 1024
MAX_CLOCK_SKEW_S = 300


class EnvelopeError(EconomyError, ValueError):
    """Base of every reason a gossip message is dropped."""


class MalformedEnvelopeError(EnvelopeError):
    """The bytes are not a well-formed envelope (or one for another topic)."""


class ForgedEnvelopeError(EnvelopeError):
    """The envelope's signature was not made by the sender it names."""


class StaleEnvelopeError(EnvelopeError):
    """The envelope is dated too far in the past or the future."""


_SCHEMA = (
    FieldSpec("topic", "str", max_len=64),
    FieldSpec("sender", "ss58"),
    FieldSpec("timestamp_ms", "u64"),
    FieldSpec("nonce", "bytes", exact_len=8),
    FieldSpec("payload", "bytes", max_len=MAX_PAYLOAD_BYTES),
    FieldSpec("signature", "bytes", exact_len=signing.SIGNATURE_BYTES),
)


@dataclass(frozen=True)
class SignedEnvelope:
    """One gossip message."""

    topic: str
    sender: str
    timestamp_ms: int
    nonce: bytes
    payload: bytes
    signature: bytes

    def _signed_bytes(self) -> bytes:
        return canonical.encode(
            ENVELOPE_TAG,
            _SCHEMA[:-1] + (FieldSpec("signature", "bytes", exact_len=0),),
            (self.topic, self.sender, self.timestamp_ms, self.nonce, self.payload, b""),
        )

    def encode(self) -> bytes:
        try:
            return canonical.encode(
                ENVELOPE_TAG,
                _SCHEMA,
                (self.topic, self.sender, self.timestamp_ms, self.nonce, self.payload, self.signature),
            )
        except CanonicalFormatError as e:
            raise MalformedEnvelopeError(str(e)) from None


def seal(keypair: Keypair, topic: str, payload: bytes, now_ms: int | None = None) -> SignedEnvelope:
    """Signs `payload` for `topic` as `keypair`'s account."""
    unsigned = SignedEnvelope(
        topic, keypair.ss58_address, int(time.time() * 1000) if now_ms is None else now_ms, os.urandom(8), payload, b""
    )
    try:
        body = unsigned._signed_bytes()
    except CanonicalFormatError as e:
        raise MalformedEnvelopeError(str(e)) from None
    return SignedEnvelope(**{**unsigned.__dict__, "signature": signing.sign(keypair, ENVELOPE_DOMAIN, body)})


def open_envelope(data: bytes, topic: str, now_ms: int | None = None) -> SignedEnvelope:
    """Parses and authenticates a message received on `topic`.

    Raises MalformedEnvelopeError, ForgedEnvelopeError or StaleEnvelopeError; never anything else.
    """
    try:
        values = canonical.decode(ENVELOPE_TAG, _SCHEMA, data)
    except CanonicalFormatError as e:
        raise MalformedEnvelopeError(f"malformed envelope: {e}") from None
    envelope = SignedEnvelope(*values)
    if envelope.topic != topic:
        raise MalformedEnvelopeError(f"envelope for topic {envelope.topic!r} arrived on {topic!r}")
    if not signing.verify(envelope.sender, ENVELOPE_DOMAIN, envelope._signed_bytes(), envelope.signature):
        raise ForgedEnvelopeError(f"envelope signature does not verify for sender {envelope.sender}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if abs(envelope.timestamp_ms - now_ms) > MAX_CLOCK_SKEW_S * 1000:
        raise StaleEnvelopeError(
            f"envelope dated {envelope.timestamp_ms} ms is more than {MAX_CLOCK_SKEW_S} s from now"
        )
    return envelope

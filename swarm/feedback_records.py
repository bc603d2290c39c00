"""FeedbackExample: one accepted feedback example as a signed, content-addressed public record.

Every example a learning peer trains on (kind "feedback"), and every inference prompt a client opted to
share (kind "shared-prompt", never trained on), is published in this form: peers store it, serve it by
hash (peer/feedback_store.py) and commit batches of hashes on chain, so anyone can fetch, check and audit
what the model learned from whom (docs/data.md documents the format).

Invariants, checked by `verify_example` wherever a record enters a process (a peer receiving a training
pass or a replicated batch, a researcher's export):
- `signature` is the contributor account's sr25519 signature over `signed_bytes()`: FEEDBACK_DOMAIN then
  the canonical JSON (sorted keys, no spaces, UTF-8) of every field but the signature, so nobody can publish
  text under another account, and one signature covers exactly one text, model, time and nonce;
- `content_hash()` is the SHA-256 of the canonical JSON of all fields, signature included: the hash names
  one exact record and the training pass's contributor signature binds it (swarm/contributors.py);
- prompt + completion are valid UTF-8 of at most MAX_FEEDBACK_BYTES together; every field has its type and
  bounds; `from_json` refuses unknown and missing keys, so a record has one encoding only.
Threat: the text itself is the contributor's; a signed record proves who published it, not that it is
true or harmless (poisoning is bounded by the learning peers' aggregation and canary, docs/learning.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from chain.errors import UnavailableError
from swarm.protocol import ProtocolError

if TYPE_CHECKING:
    from substrateinterface import Keypair

FEEDBACK_DOMAIN = "dllm/feedback/1"
MAX_FEEDBACK_BYTES = 16_384
"""Prompt + completion, UTF-8 encoded: anything larger is refused."""
KINDS = ("feedback", "shared-prompt")
MAX_MODEL_CHARS = 256
_NONCE_BYTES = 16


class FeedbackRecordError(ProtocolError):
    """A feedback record is malformed, oversized, not UTF-8, unsigned or forged: its sender is at fault."""


class FeedbackStoreFullError(UnavailableError, RuntimeError):
    """A peer's feedback store is at its byte budget with nothing it may evict (peer/feedback_store.py)."""


@dataclass(frozen=True)
class FeedbackExample:
    """One signed feedback example (or opted-in shared prompt); see the module docstring for the rules."""

    model: str
    prompt: str
    completion: str
    contributor: str
    at: float
    nonce: str
    signature: str
    kind: str = "feedback"

    def _fields(self, with_signature: bool) -> dict[str, Any]:
        record = asdict(self)
        if not with_signature:
            del record["signature"]
        return record

    def signed_bytes(self) -> bytes:
        """The bytes the contributor signs: the domain, then the canonical JSON of all fields but the signature."""
        return FEEDBACK_DOMAIN.encode() + _canonical_json(self._fields(with_signature=False))

    def canonical_bytes(self) -> bytes:
        """The canonical JSON of every field, signature included (what content_hash hashes)."""
        return _canonical_json(self._fields(with_signature=True))

    def content_hash(self) -> bytes:
        """SHA-256 of canonical_bytes(): the record's public name."""
        return hashlib.sha256(self.canonical_bytes()).digest()

    @property
    def hash_hex(self) -> str:
        return self.content_hash().hex()

    @property
    def size(self) -> int:
        """UTF-8 bytes of prompt + completion (what MAX_FEEDBACK_BYTES bounds)."""
        return len(_utf8(self.prompt, "prompt")) + len(_utf8(self.completion, "completion"))

    def to_json(self) -> dict[str, Any]:
        return self._fields(with_signature=True)

    @classmethod
    def from_json(cls, data: Any) -> FeedbackExample:
        """Strict: a map with exactly the record's keys, each of its type; the values are then checked by
        `check_fields` (not the signature: call verify_example for that)."""
        if not isinstance(data, dict):
            raise FeedbackRecordError(f"a feedback record must be a map, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k)[:40] for k in data if k not in names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise FeedbackRecordError(f"feedback record keys: unknown {unknown}, missing {missing}")
        example = cls(**{name: data[name] for name in names})
        check_fields(example)
        return example


def _canonical_json(record: dict[str, Any]) -> bytes:
    try:
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (UnicodeEncodeError, ValueError) as e:
        raise FeedbackRecordError(f"feedback record cannot be encoded canonically: {e}") from None


def _utf8(text: str, name: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise FeedbackRecordError(f"feedback {name} is not valid UTF-8 text (lone surrogate)") from None


def _hex(value: Any, name: str, size: int) -> bytes:
    if type(value) is not str or len(value) != 2 * size:
        raise FeedbackRecordError(f"feedback {name} must be {2 * size} hex characters")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise FeedbackRecordError(f"feedback {name} is not hex") from None


def public_key_of(account: Any) -> bytes:
    """The 32-byte sr25519 public key of an SS58 account; FeedbackRecordError if it is not one."""
    from scalecodec.utils.ss58 import ss58_decode

    if type(account) is not str or not 0 < len(account) < 64:
        raise FeedbackRecordError("feedback contributor must be an SS58 address")
    try:
        key = bytes.fromhex(ss58_decode(account))
    except (ValueError, TypeError, IndexError) as e:
        raise FeedbackRecordError(f"feedback contributor {account!r} is not an SS58 address: {e}") from None
    if len(key) != 32:
        raise FeedbackRecordError(f"feedback contributor {account!r} does not hold a 32-byte public key")
    return key


def check_fields(example: FeedbackExample) -> None:
    """Every field's type and bounds, and the size limit (not the signature)."""
    if type(example.model) is not str or not 0 < len(example.model) <= MAX_MODEL_CHARS:
        raise FeedbackRecordError(f"feedback model must be a name of 1..{MAX_MODEL_CHARS} characters")
    for name in ("prompt", "completion"):
        if type(getattr(example, name)) is not str:
            raise FeedbackRecordError(f"feedback {name} must be UTF-8 text (a string)")
    if example.kind not in KINDS:
        raise FeedbackRecordError(f"feedback kind must be one of {KINDS}, got {str(example.kind)[:40]!r}")
    if type(example.at) is not float or not math.isfinite(example.at) or example.at < 0:
        raise FeedbackRecordError("feedback 'at' must be a finite unix time (float)")
    _hex(example.nonce, "nonce", _NONCE_BYTES)
    _hex(example.signature, "signature", 64)
    public_key_of(example.contributor)
    size = example.size
    if size > MAX_FEEDBACK_BYTES:
        raise FeedbackRecordError(f"feedback is {size} bytes of UTF-8; at most {MAX_FEEDBACK_BYTES} are accepted")


def sign_example(
    keypair: Keypair, model: str, prompt: str, completion: str, kind: str = "feedback", at: float | None = None
) -> FeedbackExample:
    """A FeedbackExample signed by `keypair` (its SS58 address is the contributor); checked before signing."""
    unsigned = FeedbackExample(
        model=model,
        prompt=prompt,
        completion=completion,
        contributor=keypair.ss58_address,
        at=float(time.time() if at is None else at),
        nonce=os.urandom(_NONCE_BYTES).hex(),
        signature="00" * 64,
        kind=kind,
    )
    check_fields(unsigned)
    signature: bytes = keypair.sign(unsigned.signed_bytes())
    return FeedbackExample(**{**unsigned.to_json(), "signature": signature.hex()})


def verify_example(example: FeedbackExample) -> None:
    """Raises FeedbackRecordError unless every field is well formed and the contributor's signature verifies."""
    if not isinstance(example, FeedbackExample):
        raise FeedbackRecordError("not a feedback record")
    check_fields(example)
    import sr25519

    signature = bytes.fromhex(example.signature)
    try:  # sr25519 raises ValueError for bytes that are no schnorrkel signature at all
        valid = sr25519.verify(signature, example.signed_bytes(), public_key_of(example.contributor))
    except ValueError:
        valid = False
    if not valid:
        raise FeedbackRecordError(f"feedback signature does not verify for contributor {example.contributor}")


def example_from_wire(data: Any) -> FeedbackExample:
    """A verified FeedbackExample from a received map (FeedbackRecordError for anything else)."""
    example = FeedbackExample.from_json(data)
    verify_example(example)
    return example

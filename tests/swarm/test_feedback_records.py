"""FeedbackExample: canonical bytes, content hash, signature, strict decoding, and each bad input refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from substrateinterface import Keypair

from swarm.feedback_records import (
    FEEDBACK_DOMAIN,
    MAX_FEEDBACK_BYTES,
    FeedbackExample,
    FeedbackRecordError,
    example_from_wire,
    sign_example,
    verify_example,
)
from swarm.protocol import InvalidRequestError
from swarm.wire_errors import kind_of, remote_class

ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")


def test_signed_record_round_trips_and_hash_covers_every_field():
    example = sign_example(ALICE, "tiny", "Water is", " H2O.", at=1_800_000_000.5)
    verify_example(example)
    assert example.contributor == ALICE.ss58_address and example.kind == "feedback"
    again = FeedbackExample.from_json(json.loads(json.dumps(example.to_json())))
    assert again == example and again.content_hash() == example.content_hash()
    body = {k: v for k, v in example.to_json().items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert example.signed_bytes() == FEEDBACK_DOMAIN.encode() + canonical
    assert example.hash_hex == hashlib.sha256(example.canonical_bytes()).hexdigest()
    for name, value in [("prompt", "x"), ("at", 1.0), ("kind", "shared-prompt"), ("signature", "11" * 64)]:
        assert dataclasses.replace(example, **{name: value}).content_hash() != example.content_hash()
    shared = sign_example(BOB, "tiny", "é ü 水", "ok", kind="shared-prompt")
    verify_example(shared)
    assert shared.size == len("é ü 水ok".encode())


def test_forged_and_reassigned_records_are_refused():
    example = sign_example(ALICE, "tiny", "prompt", "completion")
    for forged in (
        dataclasses.replace(example, completion="something else"),
        dataclasses.replace(example, contributor=BOB.ss58_address),  # Alice's text filed under Bob
        dataclasses.replace(example, model="other"),
        dataclasses.replace(example, kind="shared-prompt"),
        dataclasses.replace(example, signature="00" * 64),
    ):
        with pytest.raises(FeedbackRecordError, match="signature does not verify"):
            verify_example(forged)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "x" * (MAX_FEEDBACK_BYTES + 1)}, "at most 16384"),
        ({"prompt": "é" * (MAX_FEEDBACK_BYTES // 2), "completion": "a"}, "at most 16384"),  # bytes, not chars
        ({"prompt": "bad \ud800 text"}, "not valid UTF-8"),
        ({"completion": b"raw bytes"}, "must be UTF-8 text"),
        ({"contributor": "not-an-address"}, "not an SS58 address"),
        ({"nonce": "zz" * 16}, "not hex"),
        ({"signature": "ab"}, "128 hex"),
        ({"at": 5}, "finite unix time"),
        ({"at": float("nan")}, "finite unix time"),
        ({"kind": "secret"}, "kind must be one of"),
        ({"model": ""}, "model must be"),
    ],
)
def test_malformed_records_are_refused(change, message):
    record = {**sign_example(ALICE, "tiny", "p", "c").to_json(), **change}
    with pytest.raises(FeedbackRecordError, match=message):
        example_from_wire(record)


def test_strict_keys_and_oversized_signing_refused():
    record = sign_example(ALICE, "tiny", "p", "c").to_json()
    with pytest.raises(FeedbackRecordError, match="unknown \\['extra'\\]"):
        FeedbackExample.from_json({**record, "extra": 1})
    del record["nonce"]
    with pytest.raises(FeedbackRecordError, match="missing \\['nonce'\\]"):
        FeedbackExample.from_json(record)
    with pytest.raises(FeedbackRecordError, match="must be a map"):
        FeedbackExample.from_json(["not", "a", "map"])
    with pytest.raises(FeedbackRecordError, match="at most"):
        sign_example(ALICE, "tiny", "p" * MAX_FEEDBACK_BYTES, "c")


def test_bad_feedback_is_the_callers_fault_on_the_wire():
    assert kind_of(FeedbackRecordError("x")) == "invalid_feedback"
    assert remote_class("invalid_feedback") is InvalidRequestError

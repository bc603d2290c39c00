"""Receipts: canonical bytes, co-signatures, and each way a bad receipt is refused."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from economy import receipts as rc
from economy.pricing import Usage
from economy.receipts import (
    CommitmentMismatchError,
    ForgedReceiptError,
    MalformedReceiptError,
    RateMismatchError,
    ReplayedReceiptError,
    SignedReceipt,
    UsageInflationError,
    UsageReceipt,
    WrongSignerError,
    check_claim,
    verify_receipt,
)


def test_roundtrip_and_id_is_content_hash(make_receipt, keys) -> None:
    signed = make_receipt()
    data = signed.encode()
    back = SignedReceipt.decode(data)
    assert back == signed
    assert verify_receipt(back, expected_client=keys["alice"].ss58_address) == signed.receipt_id
    assert signed.receipt_id.startswith("0x") and len(signed.receipt_id) == 66
    assert make_receipt(sequence=1).receipt_id != signed.receipt_id


def test_forged_receipt_is_rejected(make_receipt) -> None:
    signed = make_receipt()
    # provider raises its token count after the client signed: the client's signature no longer fits
    inflated = dataclasses.replace(signed.receipt, generated_tokens=signed.receipt.generated_tokens + 100)
    inflated = dataclasses.replace(inflated, amount=inflated.expected_amount())
    with pytest.raises(ForgedReceiptError, match="forged or altered"):
        verify_receipt(dataclasses.replace(signed, receipt=inflated))
    with pytest.raises(ForgedReceiptError):
        verify_receipt(dataclasses.replace(signed, client_signature=bytes(64)))


def test_receipt_signed_by_wrong_client_is_rejected(make_receipt, keys) -> None:
    # Charlie's signed receipt presented for a session whose client is Alice
    signed = make_receipt(client="charlie")
    with pytest.raises(WrongSignerError, match="session's client"):
        verify_receipt(signed, expected_client=keys["alice"].ss58_address)
    # the provider signing in the client's slot
    alice_receipt = make_receipt()
    self_signed = dataclasses.replace(alice_receipt, client_signature=alice_receipt.provider_signature)
    with pytest.raises(WrongSignerError, match="not by the client"):
        verify_receipt(self_signed)
    with pytest.raises(WrongSignerError):
        rc.sign_as_client(alice_receipt.receipt, keys["charlie"])


def test_replayed_receipt_is_rejected(make_receipt) -> None:
    signed = make_receipt()
    settled = {signed.receipt_id}
    with pytest.raises(ReplayedReceiptError, match="already settled"):
        verify_receipt(signed, settled=settled)


def test_incoherent_amount_and_network(make_receipt) -> None:
    signed = make_receipt()
    with pytest.raises(MalformedReceiptError, match="does not follow"):
        dataclasses.replace(signed.receipt, amount=signed.receipt.amount + 1).check_consistent()
    with pytest.raises(MalformedReceiptError, match="network"):
        verify_receipt(signed, network="polkadot")


def test_client_refuses_inflated_claims(make_receipt) -> None:
    r = make_receipt().receipt
    honest = Usage(r.prompt_tokens, r.generated_tokens, 0, r.max_context)
    check_claim(r, honest, r.commitment, r.rate, r.params_served)
    with pytest.raises(UsageInflationError, match="generated_tokens"):
        check_claim(
            r,
            dataclasses.replace(honest, generated_tokens=r.generated_tokens - 1),
            r.commitment,
            r.rate,
            r.params_served,
        )
    with pytest.raises(CommitmentMismatchError):
        check_claim(r, honest, bytes(32), r.rate, r.params_served)
    with pytest.raises(RateMismatchError):
        check_claim(r, honest, r.commitment, r.rate, r.params_served - 1)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x90", b"\x91\xa1x", b"\xdd\xff\xff\xff\xff", b"\x00" * 100, b"\x93\xa3abc\x01\x02"],
)
def test_garbage_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedReceiptError):
        SignedReceipt.decode(data)
    with pytest.raises(MalformedReceiptError):
        UsageReceipt.decode(data)


def test_non_canonical_encoding_is_rejected(make_receipt) -> None:
    import msgpack

    raw = make_receipt().receipt.encode()
    items = msgpack.unpackb(raw, raw=False)
    # same values, but the sequence number packed as a 64-bit int instead of a fixint
    packer = msgpack.Packer(use_bin_type=True)
    body = (
        b"".join(packer.pack(v) for v in items[:3])
        + b"\xcf"
        + (0).to_bytes(8, "big")
        + b"".join(packer.pack(v) for v in items[4:])
    )
    non_canonical = b"\xdc" + len(items).to_bytes(2, "big") + body
    assert msgpack.unpackb(non_canonical, raw=False) == items
    with pytest.raises(MalformedReceiptError, match="canonical"):
        UsageReceipt.decode(non_canonical)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_fuzz_decode_never_crashes(data: bytes) -> None:
    for decoder in (SignedReceipt.decode, UsageReceipt.decode):
        with contextlib.suppress(MalformedReceiptError):
            decoder(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10_000), value=st.integers(0, 255))
def test_fuzz_bit_flips_of_a_real_receipt(make_receipt, position: int, value: int) -> None:
    data = bytearray(make_receipt().encode())
    pos = position % len(data)
    if data[pos] == value:
        return
    data[pos] = value
    try:
        signed = SignedReceipt.decode(bytes(data))
    except MalformedReceiptError:
        return
    with pytest.raises((ForgedReceiptError, WrongSignerError, MalformedReceiptError)):
        verify_receipt(signed)

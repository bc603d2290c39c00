"""Pure tests of the protocol's encodings: pro-rata split, remarks, derived accounts, council."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chain.account_derivation import account_id, escrow_account, multisig_account
from chain.council import Council
from chain.devchain.dev_accounts import dev_keypair
from chain.errors import InvalidAddressError, InvalidPaymentError
from chain.pro_rata import split_pro_rata
from chain.records import Payment, ProviderShare
from chain.remarks import MalformedRemarkError, decode_remark, encode_remark, find_candidate_payloads

ADDRESSES = [dev_keypair(n).ss58_address for n in ("Alice", "Bob", "Charlie")]


@given(amount=st.integers(1, 10**20), weights=st.lists(st.integers(1, 10**9), min_size=1, max_size=3))
def test_pro_rata_split_is_exact_and_proportional(amount, weights):
    shares = tuple(ProviderShare(ADDRESSES[i], w) for i, w in enumerate(weights))
    parts = dict(split_pro_rata(Payment(bytes(32), amount, shares)))
    assert sum(parts.values()) == amount
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs(parts.get(ADDRESSES[i], 0) - amount * w / total) < 1.0 + 1e-9 * amount


@pytest.mark.parametrize(
    "payment",
    [
        Payment(b"short", 10, (ProviderShare(ADDRESSES[0], 1),)),
        Payment(bytes(32), 0, (ProviderShare(ADDRESSES[0], 1),)),
        Payment(bytes(32), 10, ()),
        Payment(bytes(32), 10, (ProviderShare(ADDRESSES[0], 0),)),
    ],
)
def test_malformed_payments_are_refused(payment):
    with pytest.raises(InvalidPaymentError):
        split_pro_rata(payment)


def test_remark_round_trip_and_recovery_from_raw_bytes():
    payload = encode_remark("compute", {"receipts": "ab" * 32, "tokens_x_params": 7, "requests": 1})
    assert decode_remark(payload).body["tokens_x_params"] == 7
    long_payload = encode_remark("settle", {"receipts": [["00" * 32, [["11" * 32, 5]]]] * 20})
    for body in (payload, long_payload):
        length = len(body) << 2 | (0 if len(body) < 64 else 1)
        prefix = length.to_bytes(1 if len(body) < 64 else 2, "little")
        raw = b"\x99garbage" + prefix + body + b"\x00tail"
        assert body in find_candidate_payloads(raw)


def test_settle_records_are_written_at_v2_and_v1_records_still_read():
    payload = encode_remark("settle", {"receipts": [["00" * 32, [["11" * 32, 5, 800]], 12, 1]]})
    assert payload.startswith(b"dllm:v2:settle:")
    remark = decode_remark(payload)
    assert (remark.kind, remark.version, remark.body["receipts"][0][2:]) == ("settle", 2, [12, 1])
    assert encode_remark("register", {}).startswith(b"dllm:v1:register:")
    old = decode_remark(b'dllm:v1:settle:{"receipts":[["' + b"00" * 32 + b'",[["' + b"11" * 32 + b'",5]]]]}')
    assert (old.kind, old.version) == ("settle", 1)


@pytest.mark.parametrize(
    "payload",
    [
        b"dllm:v1:nope:{}",
        b"dllm:v1:compute:[1]",
        b"dllm:v1:compute:{bad",
        b"other",
        b"dllm:v2:register:{}",  # a version newer than the kind has
        b"dllm:v3:settle:{}",
        b"dllm:v02:settle:{}",
        b"dllm:vx:settle:{}",
    ],
)
def test_malformed_remarks_are_rejected(payload):
    with pytest.raises(MalformedRemarkError):
        decode_remark(payload)


def test_invalid_addresses_raise_a_specific_error():
    for bad in ("", "not-an-address", "0x1234", ADDRESSES[0][:-1] + "X"):
        with pytest.raises(InvalidAddressError):
            account_id(bad)


def test_council_validation_and_derived_accounts_are_distinct():
    with pytest.raises(ValueError):
        Council((ADDRESSES[0],), 1)
    with pytest.raises(ValueError):
        Council(tuple(ADDRESSES), 4)
    council = Council.dev()
    assert council.threshold == 2 and len(council.members) == 3
    assert council.account() == multisig_account(list(reversed(council.member_ids())), 2)
    escrows = {escrow_account(council.account(), account_id(a)) for a in ADDRESSES}
    assert len(escrows) == 3 and council.account() not in escrows

"""The direct settlement parser (chain/settlement_codec.py, economy.presigned_settlement.decode_settlement)
against scalecodec's generic decode of real settlement extrinsics signed on the dev chain: it reads the same
signer, nonce, era, markers, transfers and record, and refuses every byte it does not expect. A changed byte
is refused by the parser or, where the parser cannot tell (signature, signer, nonce, record digits), by the
runtime's signature check; a foreign call, a tip, a non-canonical integer or a trailing byte by the parser."""

from __future__ import annotations

import json
import random

import pytest
from scalecodec.base import ScaleBytes
from substrateinterface import Keypair, KeypairType

from chain.account_derivation import account_id
from chain.ledger import ComputeLedger
from chain.records import Payment, ProviderShare
from chain.settlement_codec import MalformedSettlementError, _Reader, encode_compact, encode_era, parse_settlement
from economy.presigned_settlement import (
    SettlementOfferError,
    account_nonce,
    decode_settlement,
    sign_at_nonce,
    validate_on_chain,
)
from tests.chain.ledger_helpers import UNIT, fresh_account, h

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ledger(dev_chain):
    client = ComputeLedger(dev_chain.url)
    yield client
    client.close()


def payments(tag: str, count: int, providers: list[str]) -> list[Payment]:
    """`count` receipts, each paying every provider a pro-rata share (every third receipt pays 1 planck, so with
    several providers its record holds shares of 0 planck)."""
    return [
        Payment(
            h(f"{tag}-{i}"),
            1 if i % 3 == 2 else UNIT // 100 + i,
            tuple(ProviderShare(p, 1 + j) for j, p in enumerate(providers)),
            tokens=512 + i,
            requests=i % 2,
        )
        for i in range(count)
    ]


def scalecodec_reading(ledger: ComputeLedger, extrinsic: bytes) -> tuple:
    """What scalecodec's generic decode reads in a settlement: (signer, nonce, era, markers, transfers, record)."""
    obj = ledger.substrate.create_scale_object("Extrinsic", data=ScaleBytes(extrinsic))
    obj.decode(check_remaining=True)
    value = obj.value
    era = value.get("era")
    calls = value["call"]["call_args"][0]["value"]
    named = [{a["name"]: a["value"] for a in c["call_args"]} for c in calls]
    kinds = [(c["call_module"], c["call_function"]) for c in calls]
    markers = tuple(
        bytes.fromhex(a["call_hash"][2:]) for k, a in zip(kinds, named, strict=True) if k[1] == "approve_as_multi"
    )
    transfers = tuple(
        (account_id(a["dest"]), int(a["value"]))
        for k, a in zip(kinds, named, strict=True)
        if k[1] == "transfer_keep_alive"
    )
    remark = str(named[-1]["remark"])
    record = bytes.fromhex(remark[2:]) if remark.startswith("0x") else remark.encode()
    return (
        account_id(value["address"]),
        int(value["nonce"]),
        None if era in (None, "00") else (int(era[0]), int(era[1])),
        markers,
        transfers,
        record,
    )


def parser_reading(ledger: ComputeLedger, extrinsic: bytes) -> tuple:
    parsed = parse_settlement(ledger.settlement_layout(), extrinsic)
    return parsed.signer, parsed.nonce, parsed.era, parsed.receipt_ids, parsed.transfers, parsed.record


def test_parser_reads_what_scalecodec_reads(ledger):
    client = fresh_account(ledger)
    ed_client = Keypair.create_from_seed("11" * 32, ss58_format=ledger.ss58_format, crypto_type=KeypairType.ED25519)
    providers = [fresh_account(ledger, funds=0).ss58_address for _ in range(3)]
    nonce = account_nonce(ledger, client.ss58_address)
    head = int(ledger.substrate.get_block_number(None))
    cases = [
        ledger.sign_settlement(client, payments("one", 1, providers[:1])),  # immortal, one provider
        sign_at_nonce(ledger, client, payments("three", 7, providers), nonce + 5, expires_at=head + 2048),
        sign_at_nonce(ledger, client, payments("short", 4, providers[:2]), 70_000, expires_at=head + 40),
        bytes(
            ledger.submitter.sign(
                ed_client, ledger.build_settlement(ed_client, payments("ed", 2, providers))[0]
            ).data.data
        ),
        ledger.sign_settlement(client, payments("many", 500, providers[:2])),
    ]
    for extrinsic in cases:
        reading = parser_reading(ledger, extrinsic)
        assert reading == scalecodec_reading(ledger, extrinsic)
        settlement = decode_settlement(ledger, extrinsic)
        assert (settlement.signer, settlement.nonce, settlement.era) == reading[:3]
        assert settlement.receipt_ids == frozenset(reading[3]) and settlement.transfers == dict(reading[4])
    assert parser_reading(ledger, cases[1])[2] is not None and parser_reading(ledger, cases[2])[1] == 70_000
    assert len(parser_reading(ledger, cases[4])[3]) == 500


def test_every_changed_byte_is_refused(ledger):
    """Each byte of a real settlement XORed with 0x01 and with 0xFF: the parser refuses it, or (where only the
    signature can tell) the runtime does; whatever the parser accepts, scalecodec reads the same way."""
    client, provider = fresh_account(ledger), fresh_account(ledger, funds=0)
    extrinsic = ledger.sign_settlement(client, payments("flip", 2, [provider.ss58_address]))
    validate_on_chain(ledger, extrinsic)  # the untouched bytes are valid
    by_parser = by_runtime = 0
    for position in range(len(extrinsic)):
        for mask in (0x01, 0xFF):
            changed = bytearray(extrinsic)
            changed[position] ^= mask
            try:
                settlement = decode_settlement(ledger, bytes(changed))
            except SettlementOfferError:
                by_parser += 1
                continue
            assert parser_reading(ledger, bytes(changed)) == scalecodec_reading(ledger, bytes(changed))
            assert settlement.extrinsic == bytes(changed)
            with pytest.raises(SettlementOfferError, match="refuses"):
                validate_on_chain(ledger, bytes(changed))
            by_runtime += 1
    assert by_parser + by_runtime == 2 * len(extrinsic) and by_parser > by_runtime > 0


def _respliced(extrinsic: bytes, start: int, end: int, replacement: bytes) -> bytes:
    """`extrinsic` with bytes [start, end) replaced and its length prefix rewritten (no re-signing)."""
    width = {0: 1, 1: 2, 2: 4}[extrinsic[0] & 0b11]
    body = extrinsic[width:start] + replacement + extrinsic[end:]
    return encode_compact(len(body)) + body


def test_non_canonical_and_trailing_bytes_are_refused(ledger):
    client, provider = fresh_account(ledger), fresh_account(ledger, funds=0)
    extrinsic = ledger.sign_settlement(client, payments("canon", 1, [provider.ss58_address]))
    layout = ledger.settlement_layout()
    parse_settlement(layout, extrinsic)
    calls_at = extrinsic.index(layout.marker_head)  # the first marker (the signature's bytes are random)
    # The transfer's amount (UNIT // 100 = 10^10: a 5-byte big integer) as a 6-byte one.
    at = extrinsic.index(layout.transfer_head, calls_at) + len(layout.transfer_head) + 32
    amount = encode_compact(UNIT // 100)
    assert extrinsic[at : at + len(amount)] == amount
    wide = bytes([((len(amount) - 4) << 2) | 3]) + (UNIT // 100).to_bytes(len(amount), "little")
    longer_amount = _respliced(extrinsic, at, at + len(amount), wide)
    # The call count (3) as a 2-byte compact; a trailing byte; the length prefix in a 4-byte form.
    count_at = calls_at - 1
    assert extrinsic[count_at] == 3 << 2
    longer_count = _respliced(extrinsic, count_at, count_at + 1, ((3 << 2) | 1).to_bytes(2, "little"))
    width = {0: 1, 1: 2, 2: 4}[extrinsic[0] & 0b11]
    assert width == 2  # a one-receipt settlement is 64 .. 16383 bytes long
    body = extrinsic[width:]
    for bad in (
        longer_amount,
        longer_count,
        extrinsic + b"\x00",
        ((len(body) << 2) | 2).to_bytes(4, "little") + body,
        extrinsic[:-1],
    ):
        with pytest.raises(MalformedSettlementError):
            parse_settlement(layout, bad)
        with pytest.raises(SettlementOfferError):
            decode_settlement(ledger, bad)


def test_tip_fee_asset_and_foreign_calls_are_refused(ledger):
    """Validly signed by the client, but not what the protocol signs: refused before any chain check."""
    client, provider = fresh_account(ledger), fresh_account(ledger, funds=0)
    call, _ = ledger.build_settlement(client, payments("tip", 2, [provider.ss58_address]))
    tipped = bytes(ledger.substrate.create_signed_extrinsic(call=call, keypair=client, tip=1).data.data)
    with pytest.raises(SettlementOfferError, match="signed extensions"):
        decode_settlement(ledger, tipped)
    inner = list(call.value["call_args"]["calls"])
    swapped = ledger._call("Balances", "transfer", inner[2]["call_args"])
    for calls in (
        [inner[0], inner[1], swapped, inner[3]],  # another transfer call
        [inner[0], inner[2], inner[1], inner[3]],  # a marker after a transfer
        [inner[0], inner[1], inner[3], inner[2]],  # a transfer after the record
        [inner[0], inner[1], inner[2], inner[3], inner[3]],  # a second record
        [inner[0], inner[1], inner[2]],  # no record
    ):
        signed = ledger.substrate.create_signed_extrinsic(call=ledger._batch(calls), keypair=client)
        with pytest.raises(SettlementOfferError):
            decode_settlement(ledger, bytes(signed.data.data))
    plain_batch = ledger._call("Utility", "batch", {"calls": inner})
    with pytest.raises(SettlementOfferError, match="Utility.batch_all"):
        decode_settlement(
            ledger, bytes(ledger.substrate.create_signed_extrinsic(call=plain_batch, keypair=client).data.data)
        )


def test_record_must_be_the_canonical_one(ledger):
    """A settle record that names and pays the same but is not byte for byte the one build_settlement writes
    (other JSON spacing, receipts in another order, an extra field) is refused."""
    client, provider = fresh_account(ledger), fresh_account(ledger, funds=0)
    call, _ = ledger.build_settlement(client, payments("record", 2, [provider.ss58_address]))
    inner = list(call.value["call_args"]["calls"])
    record = bytes.fromhex(str(inner[-1]["call_args"]["remark"])[2:])
    head, _, body = record.partition(b":settle:")
    parsed = json.loads(body)
    variants = [
        head + b":settle:" + json.dumps(parsed).encode(),  # spaces
        head + b":settle:" + json.dumps({"receipts": parsed["receipts"][::-1]}, separators=(",", ":")).encode(),
        head + b":settle:" + json.dumps({**parsed, "x": 1}, sort_keys=True, separators=(",", ":")).encode(),
        b"dllm:v1:settle:" + body,
    ]
    for variant in variants:
        remark = ledger._call("System", "remark_with_event", {"remark": "0x" + variant.hex()})
        signed = ledger.substrate.create_signed_extrinsic(call=ledger._batch([*inner[:-1], remark]), keypair=client)
        with pytest.raises(SettlementOfferError, match="record"):
            decode_settlement(ledger, bytes(signed.data.data))


@pytest.mark.parametrize("seed", range(3))
def test_era_encoding_round_trips(seed):
    rng = random.Random(seed)
    for _ in range(200):
        period = 1 << rng.randint(2, 16)
        phase = rng.randrange(period) // max(period >> 12, 1) * max(period >> 12, 1)
        encoded = encode_era((period, phase))
        assert _Reader(encoded).era() == (period, phase)

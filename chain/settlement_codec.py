"""Exact parser of a settlement extrinsic: the client-signed `Utility.batch_all` that
`ComputeLedger.build_settlement` composes (receipt markers, then one transfer per provider, then one
`settle` record) in the envelope substrate-interface signs it in (`ExtrinsicSubmitter.sign`,
`economy.presigned_settlement.sign_at_nonce`).

Invariant: `parse_settlement` accepts only the bytes that encoding produces, and reads them in one pass
(a generic scalecodec decode of a 500-receipt settlement costs ~0.2 s; this costs ~5 ms). Every call is
compared byte for byte against a template the ledger's own encoder made on this runtime
(`SettlementLayout`): a marker differs from its template only in the 32-byte call hash, a transfer only
in its destination and amount. Compact integers and the era must be in their canonical (shortest)
encoding, the envelope's signed extensions must hold the defaults the protocol signs (no tip, fees in
the native token), and nothing may follow the record. Anything else raises MalformedSettlementError.

Threats: a client handing a provider a settlement that a lenient reader takes for a payment but the
runtime dispatches differently (an extra inner call that sinks the batch, a second encoding of the
same value, trailing bytes). What this parser does not check is left to its callers: the signature,
nonce and fee are the runtime's (`validate_on_chain`, `dry_run`), and whether the record names exactly
the marked receipts and pays each provider what it is transferred is `economy.presigned_settlement`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from chain.errors import ChainError

SIGNED_V4 = 0x84
"""Extrinsic format byte: signed (0x80), version 4."""
_ADDRESS_ID = 0x00  # MultiAddress::Id, followed by a 32-byte account id
_SIGNATURE_WIDTH = {0: 64, 1: 64, 2: 65}  # MultiSignature: Ed25519, Sr25519, Ecdsa
_MAX_U128 = (1 << 128) - 1

# Signed extensions whose extrinsic part is empty: they sign data the runtime supplies (versions, genesis).
_EMPTY_EXTENSIONS = frozenset(
    {"CheckNonZeroSender", "CheckSpecVersion", "CheckTxVersion", "CheckGenesis", "CheckWeight"}
)
# Extensions with an extrinsic part, and its bytes when the protocol signs: a zero tip, no fee asset,
# no metadata-hash check (substrate-interface's defaults, in the order it writes them after the nonce).
_DEFAULT_EXTENSION_BYTES = {
    "ChargeTransactionPayment": b"\x00",
    "ChargeAssetTxPayment": b"\x00\x00",
    "CheckMetadataHash": b"\x00",
}
_ORDERED_EXTENSIONS = ("ChargeTransactionPayment", "ChargeAssetTxPayment", "CheckMetadataHash")


class MalformedSettlementError(ChainError, ValueError):
    """Bytes that are not a settlement extrinsic exactly as the protocol encodes and signs one."""


@dataclass(frozen=True)
class SettlementLayout:
    """A settlement's calls on one runtime, as the ledger's encoder writes them.

    Each `*_head` is a call's bytes up to its first variable field (pallet and call index included);
    `marker_tail` is what follows a marker's call hash; `extension_tail` is the signed-extension bytes after
    the nonce.
    """

    batch_head: bytes
    marker_head: bytes
    marker_tail: bytes
    transfer_head: bytes
    remark_head: bytes
    mortal: bool
    """Whether the runtime has CheckMortality: an era byte (or two) precedes the nonce."""
    extension_tail: bytes

    @classmethod
    def from_templates(
        cls,
        empty_batch: bytes,
        marker: bytes,
        marker_hash: bytes,
        transfer: bytes,
        transfer_dest: bytes,
        empty_remark: bytes,
        signed_extensions: list[str],
    ) -> SettlementLayout:
        """The layout from calls the ledger encoded: a batch_all of no calls, a marker whose call hash is
        `marker_hash`, a transfer of 0 to `transfer_dest`, a remark of no bytes; and the runtime's signed
        extension names in metadata order."""
        if not empty_batch.endswith(b"\x00") or not empty_remark.endswith(b"\x00"):
            raise MalformedSettlementError("an empty batch or remark must end in compact(0)")
        if marker.count(marker_hash) != 1 or transfer.count(transfer_dest) != 1:
            raise MalformedSettlementError("a template's placeholder must appear exactly once")
        at = marker.index(marker_hash)
        dest_at = transfer.index(transfer_dest)
        if transfer[dest_at + 32 :] != b"\x00":
            raise MalformedSettlementError("a transfer must end in its compact amount")
        unknown = [
            n
            for n in signed_extensions
            if n not in _EMPTY_EXTENSIONS
            and n not in _DEFAULT_EXTENSION_BYTES
            and n not in ("CheckMortality", "CheckNonce")
        ]
        if unknown or "CheckNonce" not in signed_extensions:
            raise MalformedSettlementError(
                f"signed extensions {unknown or signed_extensions}: not ones a settlement is read with"
            )
        return cls(
            batch_head=empty_batch[:-1],
            marker_head=marker[:at],
            marker_tail=marker[at + 32 :],
            transfer_head=transfer[:dest_at],
            remark_head=empty_remark[:-1],
            mortal="CheckMortality" in signed_extensions,
            extension_tail=b"".join(_DEFAULT_EXTENSION_BYTES[n] for n in _ORDERED_EXTENSIONS if n in signed_extensions),
        )


@dataclass(frozen=True)
class ParsedSettlement:
    """What a settlement extrinsic's bytes say, before any check of their meaning."""

    signer: bytes
    """Account id (32 bytes) the extrinsic claims to be signed by (the runtime checks the signature)."""
    nonce: int
    era: tuple[int, int] | None
    """(period, phase) of a mortal extrinsic; None for an immortal one."""
    receipt_ids: tuple[bytes, ...]
    """The markers' call hashes, in call order."""
    transfers: tuple[tuple[bytes, int], ...]
    """(destination account id, planck), in call order."""
    record: bytes
    """The `remark_with_event` payload (the settle record)."""


def encode_compact(value: int) -> bytes:
    """SCALE compact encoding of a non-negative integer (the canonical, shortest form)."""
    if value < 0:
        raise ValueError("compact integers are non-negative")
    if value < 1 << 6:
        return bytes([value << 2])
    if value < 1 << 14:
        return ((value << 2) | 1).to_bytes(2, "little")
    if value < 1 << 30:
        return ((value << 2) | 2).to_bytes(4, "little")
    width = (value.bit_length() + 7) // 8
    return bytes([((width - 4) << 2) | 3]) + value.to_bytes(width, "little")


def encode_era(era: tuple[int, int] | None) -> bytes:
    """sp_runtime's `Era` encoding: 0x00 for immortal, else 2 bytes (period's log2 - 1, quantized phase)."""
    if era is None:
        return b"\x00"
    period, phase = era
    quantize = max(period >> 12, 1)
    low = min(15, max(1, (period & -period).bit_length() - 2))  # trailing zeros of the period, minus one
    return (low | ((phase // quantize) << 4)).to_bytes(2, "little")


class _Reader:
    """Reads `data` from the front; every read past the end or in a non-canonical form raises."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.at + n
        if end > len(self.data):
            raise MalformedSettlementError(f"the extrinsic ends inside its {what}")
        chunk = self.data[self.at : end]
        self.at = end
        return chunk

    def expect(self, chunk: bytes, what: str) -> None:
        if not self.data.startswith(chunk, self.at):
            raise MalformedSettlementError(f"at byte {self.at}: not the {what} a settlement holds")
        self.at += len(chunk)

    def compact(self, what: str) -> int:
        start = self.at
        first = self.take(1, what)[0]
        mode = first & 0b11
        if mode == 0:
            return first >> 2
        width = {1: 2, 2: 4}.get(mode, (first >> 2) + 5)
        self.at = start
        raw = self.take(width, what)
        value = int.from_bytes(raw, "little") >> 2 if mode != 3 else int.from_bytes(raw[1:], "little")
        if encode_compact(value) != raw:
            raise MalformedSettlementError(f"at byte {start}: the {what} is not in its canonical compact form")
        return value

    def era(self) -> tuple[int, int] | None:
        start = self.at
        if self.take(1, "era")[0] == 0:
            return None
        self.at = start
        raw = self.take(2, "era")
        encoded = int.from_bytes(raw, "little")
        period = 2 << (encoded % (1 << 4))
        phase = (encoded >> 4) * max(period >> 12, 1)
        if period < 4 or phase >= period or encode_era((period, phase)) != raw:
            raise MalformedSettlementError(f"at byte {start}: not a valid era")
        return period, phase


def parse_settlement(layout: SettlementLayout, extrinsic: bytes) -> ParsedSettlement:
    """Reads a settlement extrinsic; MalformedSettlementError unless its bytes are exactly the protocol's:
    signed v4 envelope (account id address, default extensions), a batch_all of one or more markers, then
    transfers (to distinct accounts, amount > 0), then exactly one record, and nothing after it."""
    read = _Reader(extrinsic)
    length = read.compact("length prefix")
    if length != len(extrinsic) - read.at:
        raise MalformedSettlementError(f"the length prefix says {length} bytes, {len(extrinsic) - read.at} follow")
    read.expect(bytes([SIGNED_V4]), "signed v4 format byte")
    read.expect(bytes([_ADDRESS_ID]), "account id address")
    signer = read.take(32, "signer")
    kind = read.take(1, "signature")[0]
    if kind not in _SIGNATURE_WIDTH:
        raise MalformedSettlementError(f"signature type {kind} is not Ed25519, Sr25519 or Ecdsa")
    read.take(_SIGNATURE_WIDTH[kind], "signature")
    era = read.era() if layout.mortal else None
    nonce = read.compact("nonce")
    read.expect(layout.extension_tail, "signed extensions (no tip, native fee)")
    read.expect(layout.batch_head, "Utility.batch_all")
    count = read.compact("call count")
    receipt_ids: list[bytes] = []
    transfers: list[tuple[bytes, int]] = []
    record: bytes | None = None
    for position in range(count):
        # Markers first, then transfers, then the one record: a call out of that order is refused like a foreign one.
        if record is None and not transfers and read.data.startswith(layout.marker_head, read.at):
            read.at += len(layout.marker_head)
            receipt_ids.append(read.take(32, "marker's call hash"))
            read.expect(layout.marker_tail, "marker's arguments")
        elif record is None and receipt_ids and read.data.startswith(layout.transfer_head, read.at):
            read.at += len(layout.transfer_head)
            dest = read.take(32, "transfer's destination")
            amount = read.compact("transfer's amount")
            if amount == 0 or amount > _MAX_U128 or any(dest == d for d, _ in transfers):
                raise MalformedSettlementError(f"inner call {position}: a second, empty or oversized transfer")
            transfers.append((dest, amount))
        elif record is None and receipt_ids and read.data.startswith(layout.remark_head, read.at):
            read.at += len(layout.remark_head)
            record = read.take(read.compact("record length"), "record")
        else:
            raise MalformedSettlementError(f"inner call {position} (byte {read.at}) is not one a settlement holds")
    if record is None:
        raise MalformedSettlementError("the settlement holds no settle record")
    if read.at != len(extrinsic):
        raise MalformedSettlementError(f"{len(extrinsic) - read.at} bytes follow the settlement's calls")
    return ParsedSettlement(signer, nonce, era, tuple(receipt_ids), tuple(transfers), record)

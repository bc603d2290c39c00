"""Parsing and validation of `dllm` command-line values, each failing with one actionable message.

Every parser raises `typer.BadParameter`, which the CLI turns into a one-line error and exit code 2.
They import nothing heavy so `dllm --help` stays fast.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import typer

PEERS_HINT = "'--initial-peers'"
BLOCKS_HINT = "'--blocks'"


def check_blocks_fit(span: tuple[int, int], num_layers: int) -> None:
    """Reject a span that reaches past the model's last block."""
    start, end = span
    if end > num_layers:
        raise typer.BadParameter(
            f"{start}:{end} reaches past the model's {num_layers} blocks (valid: 0..{num_layers}, END exclusive)",
            param_hint=BLOCKS_HINT,
        )


def parse_initial_peer(value: str) -> str:
    """Validate one `--initial-peers` multiaddr: it must parse and end in /p2p/<peer id>."""
    from multiaddr import Multiaddr  # small pure-Python package

    try:
        address = Multiaddr(value)
    except Exception as error:  # the package raises several unrelated types for bad input
        raise typer.BadParameter(f"{value!r} is not a multiaddr ({error})", param_hint=PEERS_HINT) from None
    names = [protocol.name for protocol in address.protocols()]
    if "p2p" not in names:
        raise typer.BadParameter(
            f"{value!r} has no /p2p/<peer id> part; copy the full address a bootstrap node or peer prints",
            param_hint=PEERS_HINT,
        )
    if not ({"tcp", "udp"} & set(names)):
        raise typer.BadParameter(f"{value!r} names no transport (/tcp/PORT or /udp/PORT)", param_hint=PEERS_HINT)
    return value


def parse_initial_peers(values: list[str] | None) -> list[str]:
    """Validate every `--initial-peers` value (the option may repeat; commas also separate)."""
    result: list[str] = []
    for value in values or []:
        for part in value.split(","):
            if part.strip():
                result.append(parse_initial_peer(part.strip()))
    return result


def parse_chain_url(value: str | None) -> str | None:
    """A Substrate node endpoint: ws:// or wss:// (http(s) is accepted by substrate-interface too)."""
    if value is None or value == "":
        return None
    if not value.startswith(("ws://", "wss://", "http://", "https://")):
        raise typer.BadParameter(
            f"{value!r} is not a node endpoint like ws://127.0.0.1:9944", param_hint="'--chain-url'"
        )
    return value


def parse_chain_key(value: str | None) -> str | None:
    """A signing key: a dev URI (//Alice), a 12/24-word mnemonic, or a 0x-prefixed 32-byte seed."""
    if value is None or value == "":
        return None
    text = value.strip()
    if text.startswith("//"):
        return text
    if text.startswith("0x"):
        digits = text[2:]
        if len(digits) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise typer.BadParameter("a hex seed must be 0x followed by 64 hex digits", param_hint="'--chain-key'")
        return text
    words = text.split()
    if len(words) in (12, 15, 18, 21, 24):
        return text
    raise typer.BadParameter(
        "expected a dev URI like //Alice, a 12-24 word mnemonic, or a 0x hex seed", param_hint="'--chain-key'"
    )


def parse_amount(value: str, decimals: int, param_hint: str) -> int:
    """A token amount like "10" or "0.5" to integer smallest units (exact: no float rounding)."""
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise typer.BadParameter(f"{value!r} is not a number", param_hint=param_hint) from None
    if not amount.is_finite() or amount < 0:
        raise typer.BadParameter(f"{value!r} must be a non-negative amount", param_hint=param_hint)
    units = amount.scaleb(decimals)
    if units != units.to_integral_value():
        raise typer.BadParameter(f"{value!r} has more than {decimals} decimals", param_hint=param_hint)
    return int(units)

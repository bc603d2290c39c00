"""Split a receipt's payment between the providers that served it, pro rata by parameters served."""

from __future__ import annotations

from chain.errors import InvalidPaymentError
from chain.records import Payment


def split_pro_rata(payment: Payment) -> list[tuple[str, int]]:
    """Exact integer split (largest remainder): the parts always sum to `payment.amount`.

    Ties in the remainder go to the provider listed first, so the split is deterministic.
    Shares whose part rounds to 0 planck are left out.
    """
    parts = split_shares(payment)
    return [(share.provider, part) for share, part in zip(payment.shares, parts, strict=True) if part > 0]


def split_shares(payment: Payment) -> list[int]:
    """Each share's part of `payment.amount`, in the order of `payment.shares` (0 kept)."""
    validate_payment(payment)
    total_params = sum(s.params_served for s in payment.shares)
    wholes: list[int] = []
    remainders: list[int] = []
    for share in payment.shares:
        whole, rest = divmod(payment.amount * share.params_served, total_params)
        wholes.append(whole)
        remainders.append(rest)
    leftover = payment.amount - sum(wholes)
    for order in sorted(range(len(wholes)), key=lambda i: (-remainders[i], i))[:leftover]:
        wholes[order] += 1
    return wholes


def validate_payment(payment: Payment) -> None:
    if not isinstance(payment.receipt_id, (bytes, bytearray)) or len(payment.receipt_id) != 32:
        raise InvalidPaymentError(f"receipt_id must be 32 bytes (a hash), got {payment.receipt_id!r:.80}")
    if not isinstance(payment.amount, int) or payment.amount <= 0:
        raise InvalidPaymentError(f"payment amount must be a positive integer (planck), got {payment.amount!r}")
    for name, count in (("tokens", payment.tokens), ("requests", payment.requests)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidPaymentError(f"{name} must be a non-negative integer, got {count!r}")
    if not payment.shares:
        raise InvalidPaymentError(f"receipt 0x{payment.receipt_id.hex()} has no provider shares")
    for share in payment.shares:
        if not isinstance(share.params_served, int) or share.params_served <= 0:
            raise InvalidPaymentError(f"params_served must be a positive integer, got {share.params_served!r}")

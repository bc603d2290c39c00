"""The well-known development accounts (//Alice ... //Ferdie) every Substrate tool knows."""

from __future__ import annotations

from substrateinterface import Keypair, KeypairType

DEV_ACCOUNT_NAMES: tuple[str, ...] = ("Alice", "Bob", "Charlie", "Dave", "Eve", "Ferdie")

# Rococo Asset Hub's runtime declares SS58 prefix 2; addresses printed for users use it.
DEV_SS58_FORMAT = 2


def dev_keypair(name: str, ss58_format: int = DEV_SS58_FORMAT) -> Keypair:
    """The sr25519 keypair of a dev account, e.g. dev_keypair("Alice") for //Alice."""
    if name not in DEV_ACCOUNT_NAMES:
        raise ValueError(f"unknown dev account {name!r}; expected one of {', '.join(DEV_ACCOUNT_NAMES)}")
    return Keypair.create_from_uri(f"//{name}", ss58_format=ss58_format, crypto_type=KeypairType.SR25519)

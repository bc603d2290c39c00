"""Helpers shared by the ledger tests: fresh funded accounts so tests never share balances."""

from __future__ import annotations

import hashlib
import itertools
import uuid

from substrateinterface import Keypair

from chain.devchain.dev_accounts import dev_keypair
from chain.ledger import ComputeLedger
from chain.units import PLANCK_PER_TOKEN

UNIT = PLANCK_PER_TOKEN
_counter = itertools.count()


def h(label: str) -> bytes:
    return hashlib.blake2b(label.encode(), digest_size=32).digest()


def fresh_account(ledger: ComputeLedger, funds: int = 1_000 * UNIT) -> Keypair:
    """A new sr25519 account funded by //Ferdie (unique per call, even across test runs)."""
    kp = Keypair.create_from_uri(f"//dllm-test-{uuid.uuid4().hex}-{next(_counter)}", ss58_format=ledger.ss58_format)
    if funds:
        call = ledger.substrate.compose_call(
            "Balances", "transfer_keep_alive", {"dest": kp.ss58_address, "value": funds}
        )
        ledger.submitter.submit(dev_keypair("Ferdie", ledger.ss58_format), call)
    return kp


def council_keys(ledger: ComputeLedger) -> tuple[Keypair, Keypair, Keypair]:
    return tuple(dev_keypair(n, ledger.ss58_format) for n in ("Alice", "Bob", "Charlie"))


def account_state(ledger: ComputeLedger, kp_or_address) -> tuple[int, int, int]:
    """(nonce, free, reserved): equal before and after means the chain did not touch the account."""
    address = kp_or_address if isinstance(kp_or_address, str) else kp_or_address.ss58_address
    info = ledger.substrate.query("System", "Account", [address]).value
    return info["nonce"], info["data"]["free"], info["data"]["reserved"]

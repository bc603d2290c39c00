"""The verifier council: an m-of-n multisig that alone controls every provider's stake escrow, and the list of
verifiers it authorizes.

Authorized verifiers: only their signed verdicts count, for the council's slashing tally (dllm/council.py) and for
a client's spot-check history and dispatch (swarm/billing.py). Anyone can announce a verifier in the DHT; an
announcement is not an authorization. The chain holds no list of verifiers: the council's record here is the
source (`verifiers`, by default its own members, as on the dev chain).
"""

from __future__ import annotations

from dataclasses import dataclass

from chain.account_derivation import account_id, multisig_account


@dataclass(frozen=True)
class Council:
    """Council members (SS58 addresses) and the number of approvals an action needs."""

    members: tuple[str, ...]
    threshold: int
    verifiers: tuple[str, ...] = ()
    """Accounts the council authorizes as verifiers (SS58, any prefix); empty: the members themselves."""

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ValueError("a council needs at least 2 members")
        if not 2 <= self.threshold <= len(self.members):
            raise ValueError(f"council threshold must be in 2..{len(self.members)}, got {self.threshold}")
        ids = [account_id(m) for m in self.members]
        if len(set(ids)) != len(ids):
            raise ValueError("council members must be distinct accounts")
        for verifier in self.verifiers:
            account_id(verifier)  # raises InvalidAddressError for an address that names no account

    @classmethod
    def dev(cls) -> Council:
        """The dev chain's council: //Alice, //Bob, //Charlie with threshold 2."""
        from chain.devchain.dev_accounts import dev_keypair

        return cls(tuple(dev_keypair(n).ss58_address for n in ("Alice", "Bob", "Charlie")), 2)

    def member_ids(self) -> list[bytes]:
        return [account_id(m) for m in self.members]

    def account(self) -> bytes:
        """The council's multisig account id (where its approved calls dispatch from)."""
        return multisig_account(self.member_ids(), self.threshold)

    def is_member(self, account: bytes) -> bool:
        return account in self.member_ids()

    def authorized_verifiers(self) -> tuple[str, ...]:
        """The accounts whose verdicts count (SS58 as configured)."""
        return self.verifiers or self.members

    def authorized_verifier_ids(self) -> frozenset[bytes]:
        """Account ids of `authorized_verifiers` (compare these: addresses differ by SS58 prefix)."""
        return frozenset(account_id(v) for v in self.authorized_verifiers())

"""The verifier council: an m-of-n multisig that alone controls every provider's stake escrow."""

from __future__ import annotations

from dataclasses import dataclass

from chain.account_derivation import account_id, multisig_account


@dataclass(frozen=True)
class Council:
    """Council members (SS58 addresses) and the number of approvals an action needs."""

    members: tuple[str, ...]
    threshold: int

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ValueError("a council needs at least 2 members")
        if not 2 <= self.threshold <= len(self.members):
            raise ValueError(f"council threshold must be in 2..{len(self.members)}, got {self.threshold}")
        ids = [account_id(m) for m in self.members]
        if len(set(ids)) != len(ids):
            raise ValueError("council members must be distinct accounts")

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

"""The chaos harness with the economy on: a restartable dev chain, funded keys, and the money audit.

`RestartableChain` runs a `DevChain` with a state directory on a private event loop thread, so a
test can stop and restart it (same port, same state) while its own loop drives clients.
`MoneyAudit` collects every co-signed receipt held by a provider (its SQLite store) or by a client
(its sessions' delivered receipts) and checks them against the chain: each must be paid exactly
once (receipt markers and the settlement log), and every provider's balance must have grown by
exactly what the settlement log paid it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from substrateinterface import Keypair

from chain.account_derivation import account_id
from chain.devchain.dev_accounts import dev_keypair
from chain.devchain.launcher import DevChain, DevChainConfig
from chain.ledger import ComputeLedger
from chain.units import PLANCK_PER_TOKEN
from swarm.billing import SessionBilling

UNIT = PLANCK_PER_TOKEN


class RestartableChain:
    """A dev chain (chopsticks, real runtime) whose state survives `restart()`; its own loop thread."""

    def __init__(self, port: int, state_dir: Path):
        self.config = DevChainConfig(port=port, state_dir=state_dir)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-devchain", daemon=True)
        self._thread.start()
        self.chain = DevChain(self.config)
        self.restarts = 0

    @property
    def url(self) -> str:
        return self.chain.url

    def _run(self, coro, timeout: float = 180.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        self._run(self.chain.start())

    def stop(self) -> None:
        self._run(self.chain.stop())

    def restart(self, down_s: float = 0.0) -> None:
        """Stops the chain (its database keeps the head), waits `down_s`, starts it again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.chain = DevChain(DevChainConfig(port=self.config.port, state_dir=self.config.state_dir))
        self.start()
        self.restarts += 1

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def fund_fresh_keys(ledger: ComputeLedger, count: int, funds: int) -> list[tuple[str, Keypair]]:
    """`count` new key URIs (unique across runs) with their keypairs, funded by //Ferdie in one batch."""
    keys = []
    for _ in range(count):
        uri = f"//dllm-chaos-{uuid.uuid4().hex[:12]}"
        keys.append((uri, Keypair.create_from_uri(uri, ss58_format=ledger.ss58_format)))
    transfers = [
        ledger.substrate.compose_call("Balances", "transfer_keep_alive", {"dest": kp.ss58_address, "value": funds})
        for _, kp in keys
    ]
    ledger.submitter.submit(
        dev_keypair("Ferdie", ledger.ss58_format),
        ledger.substrate.compose_call("Utility", "batch_all", {"calls": transfers}),
    )
    return keys


def total_balance(ledger: ComputeLedger, ss58: str) -> int:
    """free + reserved (multisig marker deposits stay the client's money)."""
    data = ledger.substrate.query("System", "Account", [ss58]).value["data"]
    return int(data["free"]) + int(data["reserved"])


@dataclass(frozen=True)
class HeldReceipt:
    """A co-signed receipt someone holds: the provider in its store, or the client in memory (delivered
    or not: the client pays an undelivered one by submitting its settlement itself)."""

    receipt_id: bytes
    client: bytes  # account ids: receipts and the chain may print addresses in different ss58 formats
    provider: bytes
    amount: int


def store_receipts(path: Path) -> dict[bytes, HeldReceipt]:
    """Every receipt in a provider's store (read-only; the provider may be running)."""
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute("SELECT receipt_id, client, provider, amount FROM receipts").fetchall()
    held = {}
    for rid, client, provider, amount in rows:
        raw = bytes.fromhex(rid.removeprefix("0x"))
        held[raw] = HeldReceipt(raw, account_id(client), account_id(provider), int(amount))
    return held


def store_states(path: Path) -> Counter:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        return Counter(dict(db.execute("SELECT state, COUNT(*) FROM receipts GROUP BY state").fetchall()))


def client_receipts(billings: Iterable[SessionBilling]) -> dict[bytes, HeldReceipt]:
    held = {}
    for billing in billings:
        for signed in [*billing.receipts, *billing.undelivered]:
            r = signed.receipt
            held[r.receipt_id_bytes] = HeldReceipt(
                r.receipt_id_bytes, account_id(r.client), account_id(r.provider), r.amount
            )
    return held


@dataclass
class AuditResult:
    held: int
    lost: list[bytes] = field(default_factory=list)
    paid_twice: list[bytes] = field(default_factory=list)
    balance_mismatches: dict[str, tuple[int, int]] = field(default_factory=dict)  # provider -> (delta, paid on chain)


class MoneyAudit:
    """Balances before a run, then: is every held receipt paid exactly once, and do balances match?"""

    def __init__(self, ledger: ComputeLedger, providers: dict[str, str], stores: dict[str, Path]):
        self.ledger = ledger
        self.providers = providers  # name -> ss58
        self.stores = stores  # name -> receipts path
        self.first_block = ledger.substrate.get_block_number(None) + 1
        self.before = {name: total_balance(ledger, ss58) for name, ss58 in providers.items()}

    def held(self, billings: Iterable[SessionBilling]) -> dict[bytes, HeldReceipt]:
        held = client_receipts(billings)
        for path in self.stores.values():
            held.update(store_receipts(path))
        return held

    def unpaid(self, held: dict[bytes, HeldReceipt]) -> list[bytes]:
        by_client: dict[bytes, list[bytes]] = {}
        for h in held.values():
            by_client.setdefault(h.client, []).append(h.receipt_id)
        missing = []
        for client, ids in by_client.items():
            paid = set(self.ledger.settled_on_chain(self.ledger.address(client), ids))
            missing += [rid for rid in ids if rid not in paid]
        return missing

    def wait_settled(self, billings: list[SessionBilling], timeout: float) -> dict[bytes, HeldReceipt]:
        """Waits until every held receipt has its settlement marker on chain (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            held = self.held(billings)
            if not self.unpaid(held) or time.monotonic() > deadline:
                return held
            time.sleep(1.0)

    def check(self, held: dict[bytes, HeldReceipt]) -> AuditResult:
        result = AuditResult(len(held), lost=self.unpaid(held))
        log = [s for s in self.ledger.settlement_history() if s.block_number >= self.first_block]
        times_paid = Counter(s.receipt_id for s in log)
        result.paid_twice = [rid for rid, n in times_paid.items() if n > 1]
        result.lost += [rid for rid in held if times_paid[rid] == 0 and rid not in result.lost]
        for name, ss58 in self.providers.items():
            me = account_id(ss58)
            on_chain = sum(a for s in log for p, a in s.payouts if account_id(p) == me)
            held_total = sum(h.amount for h in held.values() if h.provider == me)
            delta = total_balance(self.ledger, ss58) - self.before[name]
            if not delta == on_chain == held_total:
                result.balance_mismatches[name] = (delta, on_chain, held_total)
        return result

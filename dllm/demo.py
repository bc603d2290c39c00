"""`dllm demo`: the whole system on one machine, then a clean shutdown.

1. the dev chain (chopsticks running the real Asset Hub runtime), in memory;
2. a bootstrap DHT node and N peers on the embedded model, each registered on chain with a stake;
3. a few queries through the swarm, streamed to the terminal;
4. co-signed usage receipts for every hop of every query, settled in one batch on chain;
5. a table of who served what and who was paid what, read back from the chain;
6. every process it started stopped, checked: no process and no hivemind socket left behind.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

log = logging.getLogger(__name__)

PLANCK_PER_ROC = 10**12
DEMO_PROMPTS = (
    "The module",
    "Return the",
    "This function",
    "If the file",
    "The default value",
    "A list of",
)
PROVIDER_FUNDS = 50 * PLANCK_PER_ROC
PROVIDER_STAKE_ROC = 10
# Advertised rates (planck per generated token per billion parameters): different, to show pro-rata pay.
RATES = (1_000_000_000_000, 1_500_000_000_000, 2_000_000_000_000, 2_500_000_000_000)


class DemoError(RuntimeError):
    """The demo could not complete a step; the message names the step and the log to read."""


@dataclass
class DemoConfig:
    """The one configuration object of `dllm demo`."""

    peers: int = 3
    queries: int = 3
    max_tokens: int = 24
    chain_port: int = 0
    workdir: Path | None = None  # logs and the receipt store; a temporary folder (removed) by default


@dataclass
class ProviderRow:
    """One line of the final table."""

    peer_id: str
    blocks: str
    account: str
    receipts: int = 0
    tokens: int = 0
    stake: int = 0
    paid: int = 0


@dataclass
class DemoReport:
    providers: list[ProviderRow] = field(default_factory=list)
    client: str = ""
    client_spent: int = 0
    settled_receipts: int = 0
    leftover_processes: list[str] = field(default_factory=list)
    leftover_sockets: list[str] = field(default_factory=list)


def block_spans(num_blocks: int, peers: int) -> list[tuple[int, int]]:
    """Contiguous spans covering every block once, as even as possible (e.g. 8 over 3: 0:3 3:6 6:8)."""
    if not 1 <= peers <= num_blocks:
        raise DemoError(f"cannot split {num_blocks} blocks over {peers} peers")
    bounds = [round(i * num_blocks / peers) for i in range(peers + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(peers)]


def roc(planck: int) -> str:
    return f"{planck / PLANCK_PER_ROC:,.6f}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Demo:
    """Owns every resource the demo starts, so `shutdown` can stop all of them whatever failed."""

    def __init__(self, config: DemoConfig, console: Console) -> None:
        self.config = config
        self.console = console
        self.loop = asyncio.new_event_loop()
        self.own_workdir = config.workdir is None
        self.workdir = Path(config.workdir or tempfile.mkdtemp(prefix="dllm-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.chain: Any = None
        self.ledger: Any = None
        self.swarm: Any = None
        self.model: Any = None
        self.provider_keys: dict[str, Any] = {}
        self.client_key: Any = None
        self.results: list[Any] = []
        self.report = DemoReport()

    # -------------------------------------------------------------------------------- start-up
    def start_chain(self) -> None:
        from chain.devchain.launcher import DevChain, DevChainConfig, dev_chain_available

        missing = dev_chain_available()
        if missing:
            raise DemoError(f"the dev chain cannot run here: {missing}")
        port = self.config.chain_port or free_port()
        self.chain = DevChain(DevChainConfig(port=port, state_dir=None))
        with self.console.status("Starting the dev chain (Rococo Asset Hub runtime under chopsticks)…"):
            self.loop.run_until_complete(self.chain.start())
        from chain.ledger import ComputeLedger

        self.ledger = ComputeLedger(self.chain.url)
        self.console.print(f"[green]✓[/] dev chain at {self.chain.url}")

    def fund_accounts(self) -> None:
        """Fresh provider accounts (not council members) funded by //Ferdie; //Eve is the client."""
        from substrateinterface import Keypair

        from chain.devchain.dev_accounts import dev_keypair

        fmt = self.ledger.ss58_format
        keys = [Keypair.create_from_uri(f"//dllm-demo-provider-{i + 1}", ss58_format=fmt)
                for i in range(self.config.peers)]
        transfers = [
            self.ledger.substrate.compose_call(
                "Balances", "transfer_keep_alive", {"dest": k.ss58_address, "value": PROVIDER_FUNDS})
            for k in keys
        ]
        batch = self.ledger.substrate.compose_call("Utility", "batch_all", {"calls": transfers})
        with self.console.status("Funding the provider accounts…"):
            self.ledger.submitter.submit(dev_keypair("Ferdie", fmt), batch)
        self.provider_keys = {k.ss58_address: k for k in keys}
        self.client_key = dev_keypair("Eve", fmt)
        self.report.client = self.client_key.ss58_address

    def start_swarm(self) -> None:
        from dllm import default_model_path
        from dllm.processes import LocalSwarm
        from swarm.model_files import load_config

        model_path = default_model_path()
        num_blocks = int(load_config(model_path).num_hidden_layers)
        spans = block_spans(num_blocks, self.config.peers)
        self.swarm = LocalSwarm(str(model_path), workdir=self.workdir)
        with self.console.status("Starting the bootstrap node…"):
            self.swarm.start_bootstrap()
        self.console.print(f"[green]✓[/] bootstrap node {self.swarm.initial_peers[0]}", soft_wrap=True)
        keys = list(self.provider_keys.values())
        procs = []
        for i, (start, end) in enumerate(spans):
            uri = f"//dllm-demo-provider-{i + 1}"
            procs.append(self.swarm.start_peer(
                f"{start}:{end}", "--chain-url", self.chain.url, "--chain-key", uri,
                "--stake", str(PROVIDER_STAKE_ROC), "--rate", str(RATES[i % len(RATES)]),
                name=f"peer-{i + 1}", wait=False,
            ))
        with self._progress() as progress:
            task = progress.add_task("Peers: bond stake, load blocks, announce", total=len(procs))
            for proc in procs:
                self.swarm.wait_ready(proc, timeout=180)
                progress.advance(task)
        for proc, key in zip(procs, keys):
            info = proc.info
            self.report.providers.append(ProviderRow(info["peer_id"], f"{info['start']}:{info['end']}", key.ss58_address))
            self.console.print(f"[green]✓[/] peer {info['peer_id'][-8:]} serves blocks {info['start']}:{info['end']} "
                               f"(staked {PROVIDER_STAKE_ROC} ROC as {key.ss58_address[:8]}…)")

    # -------------------------------------------------------------------------------- queries
    def run_queries(self) -> None:
        from swarm.client import DistributedModel, GenerationParams

        from dllm import default_model_path

        with self.console.status("Client joining the swarm…"):
            self.model = DistributedModel.from_pretrained(str(default_model_path()), self.swarm.initial_peers)
        params = GenerationParams(max_new_tokens=self.config.max_tokens)
        for i in range(self.config.queries):
            prompt = DEMO_PROMPTS[i % len(DEMO_PROMPTS)]
            self.console.print(f"\n[bold cyan]Query {i + 1}[/] [bold]{prompt}[/]", end="")
            results: list[Any] = []
            self.loop.run_until_complete(self._stream(prompt, params, results))
            result = results[0]
            self.results.append(result)
            hops = " → ".join(f"{h.rsplit(':', 2)[0][-6:]}[{h.rsplit(':', 2)[1]}:{h.rsplit(':', 2)[2]}]"
                              for h in result.route)
            self.console.print(f"\n[dim]  {result.completion_tokens} tokens via {hops}[/]")

    async def _stream(self, prompt: str, params: Any, results: list[Any]) -> None:
        async for delta in self.model.astream(prompt, params, on_result=results.append):
            sys.stdout.write(delta)
            sys.stdout.flush()

    # -------------------------------------------------------------------------------- settlement
    def settle(self) -> None:
        from economy.chain_settlement import ComputeLedgerSettlement
        from economy.receipt_store import ReceiptStore
        from economy.receipts import verify_receipt
        from economy.settlement import Settler
        from swarm.records import fetch_model_records

        from dllm.demo_receipts import receipts_for_query

        network = self.ledger.substrate.get_block_hash(0)
        core = self.model.core
        records = self.loop.run_until_complete(self._on_client_loop(fetch_model_records(core.dht, core.model, core.num_blocks)))
        by_peer = {r.peer_id: r for r in records}
        store = ReceiptStore(self.workdir / "receipts.sqlite3", network=network)
        try:
            for result in self.results:
                for signed in receipts_for_query(result, by_peer, self.provider_keys, self.client_key, network):
                    verify_receipt(signed, expected_client=self.client_key.ss58_address, network=network)
                    store.add(signed, expected_client=self.client_key.ss58_address)
                    row = self._row(signed.receipt.provider)
                    row.receipts += 1
                    row.tokens += signed.receipt.prompt_tokens + signed.receipt.generated_tokens
            settler = Settler(store, ComputeLedgerSettlement(self.ledger, {self.client_key.ss58_address: self.client_key}))
            with self.console.status("Settling the receipts on chain (one batch extrinsic)…"):
                batches = self.loop.run_until_complete(settler.settle_pending())
        finally:
            store.close()
        self.report.settled_receipts = sum(b.receipts for b in batches)
        self.console.print(f"\n[green]✓[/] settled {self.report.settled_receipts} receipts in {len(batches)} "
                           f"extrinsic(s): {', '.join(b.tx_hash[:12] + '…' for b in batches)}")

    async def _on_client_loop(self, coro: Any) -> Any:
        # The client's DHT handle belongs to its private event loop: run the lookup there.
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.model._loop.loop))

    def _row(self, account: str) -> ProviderRow:
        for row in self.report.providers:
            if row.account == account:
                return row
        raise DemoError(f"a receipt names {account}, which is none of the demo's providers")

    def read_back(self) -> None:
        """Stakes and payments as the chain records them (not as the demo computed them)."""
        for row in self.report.providers:
            row.stake = self.ledger.provider_status(row.account).stake
            row.paid = sum(a for s in self.ledger.settlement_history(provider_ss58=row.account)
                           for p, a in s.payouts if p == row.account)
        self.report.client_spent = sum(
            s.amount for s in self.ledger.settlement_history(client_ss58=self.report.client))

    def print_table(self) -> None:
        table = Table(title="Who served what, who was paid what (read from the chain)")
        for name, justify in (("peer", "left"), ("blocks", "left"), ("account", "left"), ("receipts", "right"),
                              ("tokens", "right"), ("stake (ROC)", "right"), ("paid (ROC)", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for row in self.report.providers:
            table.add_row(row.peer_id[-10:], row.blocks, row.account[:12] + "…", str(row.receipts), str(row.tokens),
                          roc(row.stake), roc(row.paid))
        table.add_row("client", "", self.report.client[:12] + "…", str(self.report.settled_receipts), "", "",
                      "-" + roc(self.report.client_spent), style="bold")
        self.console.print(table)

    # -------------------------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Stop everything (client, peers, bootstrap, chain) and check that nothing survived."""
        import psutil

        me = psutil.Process()
        # torch's shared-memory manager serves this very process and exits with it: not a leftover.
        started = [p for p in me.children(recursive=True) if not _is_own_torch_shm_manager(p, me.pid)]
        sockets = _hivemind_sockets(started)
        with self.console.status("Shutting everything down…"):
            if self.model is not None:
                self.model.close()
            if self.swarm is not None:
                self.swarm.stop()
            if self.ledger is not None:
                self.ledger.close()
            if self.chain is not None:
                self.loop.run_until_complete(self.chain.stop())
            self.loop.close()
            _, alive = psutil.wait_procs(started, timeout=15)
        for proc in alive:
            try:
                self.report.leftover_processes.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
                proc.kill()  # never leave them running, but report them: it is a bug
            except psutil.NoSuchProcess:
                pass
        self.report.leftover_sockets = [s for s in sockets if Path(s).exists()]
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.report.leftover_processes or self.report.leftover_sockets:
            self.console.print(f"[red]left behind: processes {self.report.leftover_processes}, "
                               f"sockets {self.report.leftover_sockets}[/]")
        else:
            self.console.print(f"[green]✓[/] shut down cleanly: {len(started)} processes stopped, "
                               "no process or socket left behind")

    def _progress(self) -> Progress:
        return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=self.console)


def _is_own_torch_shm_manager(proc: Any, own_pid: int) -> bool:
    try:
        return proc.ppid() == own_pid and proc.name() == "torch_shm_manager"
    except Exception:  # gone already
        return False


def _hivemind_sockets(processes: list[Any]) -> list[str]:
    """The unix sockets the p2pd daemons among `processes` listen on (hivemind leaks them if killed)."""
    sockets = []
    for proc in processes:
        try:
            for arg in proc.cmdline():
                if arg.startswith("-listen=/unix/"):
                    sockets.append(arg[len("-listen=/unix"):])
        except Exception:  # the process may have exited meanwhile: nothing to record
            continue
    return sockets


def run_demo(config: DemoConfig) -> DemoReport:
    """Run the whole demo (blocking); everything it starts is stopped before it returns or raises."""
    console = Console()
    demo = Demo(config, console)
    started = time.monotonic()
    try:
        demo.start_chain()
        demo.fund_accounts()
        demo.start_swarm()
        demo.run_queries()
        demo.settle()
        demo.read_back()
        demo.print_table()
    finally:
        demo.shutdown()
    console.print(f"demo finished in {time.monotonic() - started:.0f} s")
    return demo.report

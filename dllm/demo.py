"""`dllm demo`: the whole system on one machine, then a clean shutdown.

1. the dev chain (chopsticks running the real Asset Hub runtime), in memory;
2. a bootstrap DHT node, N peers on the model (SmolLM2-135M-Instruct by default, `--model tiny` for the
   embedded 1.7 M-parameter test model; each peer bonds a stake on chain, meters its sessions, proposes
   receipts, settles them, and gossips its signed price ask), one verifier and the three council members;
3. a few questions through the swarm, each sent through the model's chat template and its answer streamed
   to the terminal (the tiny model, not instruction-tuned, completes prompts instead), by a paying client:
   it co-signs each hop's receipt, pre-signs the settlement extrinsic that pays it, and sends its work to
   the verifier for a spot check;
4. a table of who served what and who was paid what, read back from the chain, fitting 80 columns;
5. every process it started stopped, checked: no process and no hivemind socket left behind.

Nothing here issues receipts or pays on anyone's behalf: the demo only holds the client's key
(and funds fresh provider accounts); providers sign with their own keys in their own processes.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from chain.config_bounds import bounded, check_bounds
from chain.errors import UnavailableError
from chain.units import PLANCK_PER_TOKEN

if TYPE_CHECKING:
    from dllm.processes import ManagedProcess

logger = logging.getLogger(__name__)

# Questions SmolLM2-135M-Instruct answers right, greedily, in a dozen tokens (measured before choosing them).
DEMO_QUESTIONS = (
    "What is the capital of France?",
    "What is the chemical symbol for water?",
    "How many days are in a week?",
)
TINY_PROMPTS = ("The module", "Return the", "This function", "If the file", "The default value", "A list of")
TABLE_WIDTH = 80  # the final table fits a default terminal
PROVIDER_FUNDS = 50 * PLANCK_PER_TOKEN
PROVIDER_STAKE_ROC = 10
CLIENT_URI = "//Eve"
VERIFIER_URI = "//Alice"  # an authorized verifier of the dev chain: its verdicts count for the council
COUNCIL_URIS = ("//Alice", "//Bob", "//Charlie")  # the dev council: three processes, one key each, 2 of 3 to slash
# Advertised rates (planck per generated token per billion parameters): different, to show pro-rata pay.
RATES = (PLANCK_PER_TOKEN, 3 * PLANCK_PER_TOKEN // 2, 2 * PLANCK_PER_TOKEN, 5 * PLANCK_PER_TOKEN // 2)
SETTLE_INTERVAL_S = 5.0
QUOTE_PERIOD_S = 10.0


class DemoError(UnavailableError, RuntimeError):
    """The demo could not complete a step; the message names the step and the log to read."""


@dataclass
class DemoConfig:
    """The one configuration object of `dllm demo`."""

    model: str = "smollm2"  # a --model value (dllm/model_choice.py): smollm2, tiny, a .gguf file or a folder
    peers: int = bounded(3, ge=1, le=8)
    queries: int = bounded(3, ge=1, le=20)
    max_tokens: int = bounded(48, ge=1, le=256)
    chain_port: int = bounded(0, ge=0, le=65535)  # 0: pick a free one
    verifier: bool = True  # start one `dllm verify` process (every receipt spot-checked) and the 3 council members
    settle_timeout_s: float = 60.0  # seconds to wait for every receipt to be paid on chain
    workdir: Path | None = None  # logs and receipt stores; a temporary folder (removed) by default

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class ProviderRow:
    """One line of the final table."""

    peer_id: str
    blocks: str
    account: str
    receipts: int = 0  # settled on chain
    tokens: int = 0  # prompt + generated, as the co-signed receipts state
    billed: int = 0  # what the co-signed receipts charge
    stake: int = 0  # read from chain
    paid: int = 0  # read from chain
    checks_passed: int = 0
    checks: int = 0


@dataclass
class DemoReport:
    providers: list[ProviderRow] = field(default_factory=list)
    answers: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) in the order asked
    client: str = ""
    client_spent: int = 0
    settled_receipts: int = 0
    settlement_extrinsics: int = 0
    spot_checks: int = 0
    spot_checks_failed: int = 0
    billing_errors: list[str] = field(default_factory=list)
    leftover_processes: list[str] = field(default_factory=list)
    leftover_sockets: list[str] = field(default_factory=list)


def block_spans(num_blocks: int, peers: int) -> list[tuple[int, int]]:
    """Contiguous spans covering every block once, as even as possible (e.g. 8 over 3: 0:3 3:6 6:8)."""
    if not 1 <= peers <= num_blocks:
        raise DemoError(f"cannot split {num_blocks} blocks over {peers} peers")
    bounds = [round(i * num_blocks / peers) for i in range(peers + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(peers)]


def roc(planck: int) -> str:
    """An amount in ROC to the micro-ROC (exact: planck are integers)."""
    return str((Decimal(planck) / PLANCK_PER_TOKEN).quantize(Decimal("0.000001")))


def whole_roc(planck: int) -> str:
    """A stake in ROC without trailing zeros (10, 2.5)."""
    text = roc(planck)
    return text.rstrip("0").rstrip(".") if "." in text else text


def _short_id(peer_id: str) -> str:
    """The tail of a peer id, the same in the progress lines, the routes and the table (the head is shared)."""
    return peer_id[-6:]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _same_account(a: str, b: str) -> bool:
    from chain.account_derivation import account_id

    return account_id(a) == account_id(b)  # verdicts and receipts may name accounts in another ss58 format


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
        self.model_path: Path | None = None
        self.provider_uris: dict[str, str] = {}  # ss58 -> key URI, passed to the provider's own process
        self.results: list[Any] = []
        self.receipts: list[Any] = []  # every co-signed receipt the client delivered
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
        """Fresh provider accounts (not council members) funded by //Ferdie; //Eve is the paying client."""
        from substrateinterface import Keypair

        fmt = self.ledger.ss58_format
        uris = [f"//dllm-demo-provider-{i + 1}" for i in range(self.config.peers)]
        keys = [Keypair.create_from_uri(uri, ss58_format=fmt) for uri in uris]
        transfers = [
            self.ledger.substrate.compose_call(
                "Balances", "transfer_keep_alive", {"dest": k.ss58_address, "value": PROVIDER_FUNDS}
            )
            for k in keys
        ]
        batch = self.ledger.substrate.compose_call("Utility", "batch_all", {"calls": transfers})
        from chain.devchain.dev_accounts import dev_keypair

        with self.console.status("Funding the provider accounts…"):
            self.ledger.submitter.submit(dev_keypair("Ferdie", fmt), batch)
        self.provider_uris = {k.ss58_address: uri for k, uri in zip(keys, uris, strict=True)}
        self.report.client = Keypair.create_from_uri(CLIENT_URI, ss58_format=fmt).ss58_address

    def start_swarm(self) -> None:
        """Bootstrap node, one staked and billing peer per provider account, the verifier; all ready."""
        from dllm.processes import LocalSwarm
        from swarm.model_files import load_config

        model_path = self.resolve_model()
        num_blocks = int(load_config(model_path).num_hidden_layers)
        self.swarm = LocalSwarm(str(model_path), workdir=self.workdir)
        with self.console.status("Starting the bootstrap node…"):
            self.swarm.start_bootstrap()
        self.console.print(f"[green]✓[/] bootstrap node {self.swarm.initial_peers[0]}", soft_wrap=True)
        peers = self._start_providers(block_spans(num_blocks, self.config.peers))
        verifier = None
        council: list[ManagedProcess] = []
        if self.config.verifier:
            verifier = self.swarm.start_verifier(
                VERIFIER_URI, "--chain-url", self.chain.url, name="verifier", wait=False
            )
            council = [
                self.swarm.start_council_member(uri, self.chain.url, name=f"council-{uri[2:].lower()}", wait=False)
                for uri in COUNCIL_URIS
            ]
        self._wait_swarm_ready(peers, verifier, council)
        self._report_providers(peers)
        if verifier is not None:
            self.console.print(f"[green]✓[/] verifier signing as {VERIFIER_URI} re-runs sampled work")
        if council:
            self.console.print(
                f"[green]✓[/] council: {len(council)} processes ({', '.join(COUNCIL_URIS)}), one key each; "
                "a slash needs 2 members that re-ran the evidence themselves"
            )

    def _start_providers(self, spans: list[tuple[int, int]]) -> list[ManagedProcess]:
        """One peer process per span and provider account, not waited for."""
        peers = []
        for i, ((start, end), uri) in enumerate(zip(spans, self.provider_uris.values(), strict=True)):
            # Each provider signs with its own key in its own process: it bonds its stake, meters sessions,
            # proposes receipts, stores the client's pre-signed settlement, settles, and gossips its ask.
            peers.append(
                self.swarm.start_peer(
                    f"{start}:{end}",
                    "--chain-url",
                    self.chain.url,
                    "--chain-key",
                    uri,
                    "--stake",
                    str(PROVIDER_STAKE_ROC),
                    "--rate",
                    str(RATES[i % len(RATES)]),
                    "--receipts",
                    str(self.workdir / f"receipts-{i + 1}.sqlite3"),
                    "--settle-interval",
                    str(SETTLE_INTERVAL_S),
                    "--quote-period",
                    str(QUOTE_PERIOD_S),
                    name=f"peer-{i + 1}",
                    wait=False,
                )
            )
        return peers

    def _wait_swarm_ready(
        self, peers: list[ManagedProcess], verifier: ManagedProcess | None, council: list[ManagedProcess]
    ) -> None:
        """Waits for every peer (then the verifier and the council) with a progress bar; a process that fails is
        a DemoError."""
        from dllm.processes import ProcessStartError

        try:
            with self._progress() as progress:
                total = len(peers) + bool(verifier) + len(council)
                task = progress.add_task("Peers: bond stake, load blocks, announce", total=total)
                for proc in peers:
                    self.swarm.wait_ready(proc, timeout=180)
                    progress.advance(task)
                if verifier is not None:
                    self.swarm.wait_verifier_ready(verifier, timeout=180)
                    progress.advance(task)
                for member in council:
                    self.swarm.wait_council_ready(member, timeout=180)
                    progress.advance(task)
        except ProcessStartError as error:
            raise DemoError(f"a swarm process did not start: {error}") from None

    def _report_providers(self, peers: list[ManagedProcess]) -> None:
        for proc, account in zip(peers, self.provider_uris, strict=True):
            info = proc.info
            self.report.providers.append(ProviderRow(info["peer_id"], f"{info['start']}:{info['end']}", account))
            self.console.print(
                f"[green]✓[/] peer {_short_id(info['peer_id'])} serves blocks {info['start']}:{info['end']} "
                f"(staked {PROVIDER_STAKE_ROC} ROC as {account[:8]}…)"
            )

    def serves_tiny_model(self) -> bool:
        from dllm import default_model_path

        return self.model_path is not None and self.model_path.resolve() == default_model_path().resolve()

    def resolve_model(self) -> Path:
        """The model folder of `config.model` (converting a GGUF once), or a DemoError saying what to do."""
        from chain.errors import ConfigError
        from dllm.model_choice import resolve_model_argument

        try:
            self.model_path = resolve_model_argument(self.config.model)
        except ConfigError as error:
            raise DemoError(f"--model {self.config.model}: {error}") from None
        return self.model_path

    # -------------------------------------------------------------------------------- queries
    def run_queries(self) -> None:
        from swarm.billing import BillingConfig
        from swarm.chat import ChatMessage, chat_prompt_ids
        from swarm.client import ClientConfig, DistributedModel, GenerationParams

        # Sample rate 1: every receipt goes to the verifier, so the demo shows a check per hop.
        billing = BillingConfig(
            self.chain.url, CLIENT_URI, sample_rate=1.0 if self.config.verifier else 0.0, verifiers_per_sample=1
        )
        with self.console.status("Paying client joining the swarm…"):
            self.model = DistributedModel.from_pretrained(
                str(self.model_path), self.swarm.initial_peers, config=ClientConfig(billing=billing)
            )
            if self.config.verifier:
                self._wait_for_verifier()
        params = GenerationParams(max_new_tokens=self.config.max_tokens)
        # The embedded tiny model is not instruction-tuned (it answers most chat messages with its end token at
        # once): it completes code-comment prompts instead, the fast path of the tests.
        chat = not self.serves_tiny_model()
        for i in range(self.config.queries):
            if chat:
                question = DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)]
                prompt: str | list[int] = chat_prompt_ids(self.model.tokenizer, [ChatMessage("user", question)])
                self.console.print(f"\n[bold cyan]Question {i + 1}:[/] [bold]{question}[/]")
                self.console.print("[bold cyan]Answer:[/] ", end="")
            else:
                question = prompt = TINY_PROMPTS[i % len(TINY_PROMPTS)]
                self.console.print(f"\n[bold cyan]Prompt {i + 1}:[/] [bold]{question}[/]", end="")
            result = self.loop.run_until_complete(self._stream(prompt, params))
            self.report.answers.append((question, result.text.strip()))
            self.results.append(result)
            session = result.billing
            self.receipts.extend(session.receipts)
            self.report.billing_errors += [f"{type(e).__name__}: {e}" for e in session.errors]
            hops = " → ".join(
                f"{_short_id(h.rsplit(':', 2)[0])}[{h.rsplit(':', 2)[1]}:{h.rsplit(':', 2)[2]}]" for h in result.route
            )
            self.console.print(
                f"\n[dim]  {result.completion_tokens} tokens via {hops}; "
                f"{len(session.receipts)} receipts co-signed, billed {roc(result.bill.total)} ROC "
                f"(quoted at most {roc(result.quote.total)})[/]"
            )
        for error in self.report.billing_errors:
            self.console.print(f"[yellow]billing problem: {error}[/]")

    def _wait_for_verifier(self, timeout: float = 30.0) -> None:
        billing = self.model.core.billing
        deadline = time.monotonic() + timeout
        while not self._on_client(billing.verifier_peers()):
            if time.monotonic() > deadline:
                raise DemoError(f"the verifier was not found in the DHT after {timeout:.0f} s")
            time.sleep(0.5)

    async def _stream(self, prompt: str | list[int], params: Any) -> Any:
        stream = self.model.astream(prompt, params)
        async for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        return stream.result

    def _on_client(self, coro: Any) -> Any:
        # The client's DHT, P2P and billing belong to its private event loop: run there.
        return asyncio.run_coroutine_threadsafe(coro, self.model._loop.loop).result(120)

    # -------------------------------------------------------------------------------- settlement
    def wait_for_settlement(self) -> None:
        """Waits for spot checks, then until the chain holds a settlement marker for every receipt."""
        billing = self.model.core.billing
        with self.console.status("Spot checks and settlement (client and providers submit the same extrinsics)…"):
            self._on_client(billing.flush())
            ids = [s.receipt.receipt_id_bytes for s in self.receipts]
            deadline = time.monotonic() + self.config.settle_timeout_s
            while len(self.ledger.settled_on_chain(self.report.client, ids)) < len(ids):
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"receipts were not all paid on chain within {self.config.settle_timeout_s:.0f} s; "
                        f"see the peers' logs in {self.workdir}"
                    )
                time.sleep(1.0)
        verdicts = [v.verdict for v in billing.verdicts]
        self.report.spot_checks = len(verdicts)
        self.report.spot_checks_failed = sum(not v.passed for v in verdicts)
        for row in self.report.providers:
            mine = [v for v in verdicts if _same_account(v.provider, row.account)]
            row.checks, row.checks_passed = len(mine), sum(v.passed for v in mine)
            for s in self.receipts:
                if _same_account(s.receipt.provider, row.account):
                    row.tokens += s.receipt.prompt_tokens + s.receipt.generated_tokens
                    row.billed += s.receipt.amount
        for failure in billing.sample_failures:
            self.console.print(f"[yellow]spot check not done: {failure}[/]")

    def read_back(self) -> None:
        """Stakes, settled receipts and payments as the chain records them (not as the demo computed them)."""
        for row in self.report.providers:
            row.stake = self.ledger.provider_status(row.account).stake
            settled = self.ledger.settlement_history(provider_ss58=row.account)
            row.receipts = len(settled)
            row.paid = sum(a for s in settled for p, a in s.payouts if _same_account(p, row.account))
        history = self.ledger.settlement_history(client_ss58=self.report.client)
        self.report.client_spent = sum(s.amount for s in history)
        self.report.settled_receipts = len(history)
        self.report.settlement_extrinsics = len({s.extrinsic_hash for s in history})
        self.console.print(
            f"\n[green]✓[/] {self.report.settled_receipts} receipts paid on chain in "
            f"{self.report.settlement_extrinsics} client-signed extrinsic(s); "
            f"spot checks: {self.report.spot_checks - self.report.spot_checks_failed}/"
            f"{self.report.spot_checks} passed"
        )

    def print_table(self) -> None:
        """The final table, at most TABLE_WIDTH columns wide: every number is printed whole (no_wrap); only the
        account column gives way (ellipsis) if amounts grow wide."""
        self.console.print(summary_table(self.report), width=min(self.console.width, TABLE_WIDTH))

    # -------------------------------------------------------------------------------- shutdown
    def close(self) -> None:
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
            self.console.print(
                f"[red]left behind: processes {self.report.leftover_processes}, "
                f"sockets {self.report.leftover_sockets}[/]"
            )
        else:
            self.console.print(
                f"[green]✓[/] shut down cleanly: {len(started)} processes stopped, no process or socket left behind"
            )

    def _progress(self) -> Progress:
        return Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=self.console,
        )


def summary_table(report: DemoReport) -> Table:
    """Who served what and who was paid what: amounts in ROC, columns two spaces apart, no frame."""
    table = Table(
        title="Who served what, who was paid what",
        caption="amounts in ROC; receipts, stake and paid: read from the chain; tokens and billed: the co-signed "
        "receipts; checks: the verifier's signed verdicts",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for name, justify in (
        ("peer", "left"),
        ("blocks", "left"),
        ("account", "left"),
        ("receipts", "right"),
        ("tokens", "right"),
        ("checks", "right"),
        ("stake", "right"),
        ("billed", "right"),
        ("paid", "right"),
    ):
        wraps = name == "account"
        table.add_column(name, justify=justify, no_wrap=not wraps, overflow="ellipsis")  # type: ignore[arg-type]
    for row in report.providers:
        table.add_row(
            _short_id(row.peer_id),
            row.blocks,
            row.account[:6] + "…",
            str(row.receipts),
            str(row.tokens),
            f"{row.checks_passed}/{row.checks}",
            whole_roc(row.stake),
            roc(row.billed),
            roc(row.paid),
        )
    table.add_row(
        "client",
        "",
        report.client[:6] + "…",
        str(report.settled_receipts),
        "",
        "",
        "",
        roc(sum(r.billed for r in report.providers)),
        "-" + roc(report.client_spent),
        style="bold",
    )
    return table


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
                    sockets.append(arg[len("-listen=/unix") :])
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
        demo.wait_for_settlement()
        demo.read_back()
        demo.print_table()
    finally:
        demo.close()
    console.print(f"demo finished in {time.monotonic() - started:.0f} s")
    return demo.report

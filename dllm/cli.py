"""The `dllm` command: run a dev chain, join the swarm, query it, serve the HTTP API and dashboard, demo.

Heavy packages (torch, hivemind, substrate-interface) are imported inside each command so that
`dllm --help` and argument errors answer instantly.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from dllm import arguments
from dllm.config import build_default_map, read_config_file

if TYPE_CHECKING:
    from dllm.probe_check import ProbeConfig
    from dllm.verifier import VerifierConfig
    from peer.config import PeerConfig

_ConfigT = TypeVar("_ConfigT")
_ReadT = TypeVar("_ReadT")

logger = logging.getLogger("dllm.cli")

app = typer.Typer(
    name="dllm",
    help="DLLM: a dynamic LLM served by a peer-to-peer swarm, paid and policed through a Substrate chain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
chain_app = typer.Typer(help="The local Substrate dev chain that settles payments and slashes.", no_args_is_help=True)
peer_app = typer.Typer(help="Serve transformer blocks to the swarm as a compute provider.", no_args_is_help=True)
swarm_app = typer.Typer(help="Swarm infrastructure: bootstrap nodes.", no_args_is_help=True)
app.add_typer(chain_app, name="chain")
app.add_typer(peer_app, name="peer")
app.add_typer(swarm_app, name="swarm")
data_app = typer.Typer(
    help="The published feedback data the swarm learned from, checked against its commitments on chain.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Reusable option declarations: the same name means the same thing in every command.
InitialPeers = Annotated[
    list[str] | None,
    typer.Option(
        "--initial-peers",
        "-p",
        help="Multiaddr of a swarm node (…/tcp/PORT/p2p/PEER_ID); repeat or comma-separate for several.",
        envvar="DLLM_INITIAL_PEERS",
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="tiny (the embedded dllm-tiny-llama, the default), smollm2 (installed by scripts/setup), a .gguf file "
        "(converted once into the cache), a model folder or a cached hub id.",
    ),
]
ChainUrl = Annotated[str | None, typer.Option("--chain-url", help="Substrate node endpoint, e.g. ws://127.0.0.1:9944.")]
ChainKey = Annotated[
    str | None,
    typer.Option(
        "--chain-key",
        help="Signing key: dev URI (//Alice), mnemonic or 0x seed. Prefer the env var over the command line.",
        envvar="DLLM_CHAIN_KEY",
        show_envvar=True,
    ),
]
Host = Annotated[str, typer.Option("--host", help="Address to listen on (keep 127.0.0.1 unless you mean it).")]
GossipPort = Annotated[
    int, typer.Option("--gossip-port", min=0, max=65535, help="TCP port of the gossip node (0: free).")
]
GossipPeer = Annotated[
    list[str] | None,
    typer.Option("--gossip-peer", help="Gossip node multiaddr to dial (others are found in the DHT)."),
]
MinStake = Annotated[
    int,
    typer.Option(
        "--min-stake",
        min=0,
        help="Route only to providers registered on chain with at least this stake, in planck (10^12 = 1 ROC), "
        "neither unbonding nor slashed; needs --chain-url. 0: no stake check.",
    ),
]


def _port_option(default: int, what: str) -> Any:
    return typer.Option("--port", min=0, max=65535, help=f"TCP port for {what} (0: pick a free one).")


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML or YAML file whose keys set command options (e.g. a peer.join table with stake = 10); "
            "command-line options win.",
            envvar="DLLM_CONFIG",
            dir_okay=False,
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", help="Logging verbosity: DEBUG, INFO, WARNING (default) or ERROR."),
    ] = None,
) -> None:
    """Global options shared by every command."""
    data: dict[str, Any] = {}
    if config is not None:
        data = read_config_file(config)
        ctx.default_map = build_default_map(ctx.command, data, config)
    # The file's log_level applies only when the command line gave none.
    log_level = log_level or str(data.get("log_level") or "WARNING")
    level = log_level.upper()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}", param_hint="'--log-level'")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # hivemind installs its own handler and reads this variable in every process it forks.
    os.environ.setdefault("HIVEMIND_LOGLEVEL", level)


class CommandError(typer.TyperException):
    """A command that cannot do its work for a reason the user can act on (exit code 1)."""

    exit_code = 1


def _fail(message: str) -> NoReturn:
    raise CommandError(message)


def _model_folder(model: str | None) -> Path:
    """The model's local folder (dllm/model_choice.py), or a BadParameter naming what is wrong with --model."""
    from chain.errors import ConfigError
    from dllm.model_choice import resolve_model_argument

    try:
        return resolve_model_argument(model)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="'--model'") from None


def _require_peers(initial_peers: list[str] | None) -> list[str]:
    peers = arguments.parse_initial_peers(initial_peers)
    if not peers:
        raise typer.BadParameter(
            "give at least one swarm address (from `dllm swarm bootstrap` or a running peer), "
            "or set DLLM_INITIAL_PEERS",
            param_hint="'--initial-peers'",
        )
    return peers


# ----------------------------------------------------------------------------------------------- chain


@chain_app.command("dev")
def chain_dev(
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port of the chain's RPC.")] = 9944,
    state_dir: Annotated[
        Path,
        typer.Option("--state-dir", help="Folder where the chain's state is kept across restarts.", file_okay=False),
    ] = Path(".dllm/devchain"),
    no_persist: Annotated[
        bool, typer.Option("--no-persist", help="Keep the chain's state in memory only (lost on exit).")
    ] = False,
) -> None:
    """Run the local dev chain (the real Asset Hub runtime under chopsticks) on 127.0.0.1 until Ctrl-C."""
    from chain.devchain.launcher import dev_chain_available

    missing = dev_chain_available()
    if missing:
        _fail(f"the dev chain cannot run here: {missing}")
    from rich.console import Console

    from chain.devchain.cli_entry import describe
    from chain.devchain.launcher import DevChain, DevChainConfig
    from chain.errors import ChainError
    from dllm.service import ServiceEndedError, serve_until_signal

    state = None if no_persist else state_dir
    chain = DevChain(DevChainConfig(port=port, state_dir=state))
    console = Console()
    console.print("starting the dev chain (the first run derives the genesis, ~5 s)...")
    try:
        serve_until_signal(chain, on_ready=lambda: describe(chain, console))
    except ServiceEndedError:
        _fail(f"the dev chain exited unexpectedly; see {chain.log_path}")
    except ChainError as error:
        _fail(f"the dev chain failed: {error}")
    console.print("stopped" + (f"; state kept in {state}" if state else ""))


# ------------------------------------------------------------------------------------------------ swarm


@swarm_app.command("bootstrap")
def swarm_bootstrap(
    host: Host = "127.0.0.1",
    port: Annotated[int, _port_option(31337, "the DHT node")] = 31337,
    initial_peers: InitialPeers = None,
    identity: Annotated[
        Path | None,
        typer.Option("--identity", help="Private key file: a stable peer id across restarts (created if missing)."),
    ] = None,
) -> None:
    """Run a bootstrap DHT node that peers and clients join; prints its multiaddrs, runs until Ctrl-C."""
    peers = arguments.parse_initial_peers(initial_peers)
    from dllm.bootstrap import BootstrapConfig, BootstrapService
    from dllm.service import serve_until_signal

    node = BootstrapService(BootstrapConfig(host=host, port=port, initial_peers=peers, identity_path=identity))
    serve_until_signal(node, on_ready=lambda: print(node.ready_line, flush=True))


# ------------------------------------------------------------------------------------------------- peer


def _keypair(key: str, ss58_format: int = 42) -> Any:
    """The sr25519 keypair of a --chain-key value (dev URI, mnemonic or 0x seed)."""
    from economy.signing import KeyFormatError, load_keypair

    try:
        return load_keypair(key, ss58_format)
    except KeyFormatError as error:
        raise typer.BadParameter(str(error), param_hint="'--chain-key'") from None


def _register_provider(url: str, key: str, stake: int) -> str:
    """Bond `stake` (planck) for this provider unless it is registered already; returns its address."""
    from rich.console import Console

    from chain.errors import AlreadyRegisteredError, ChainError
    from chain.ledger import ComputeLedger

    console = Console(stderr=True)
    try:
        with (
            console.status(f"Registering as a provider on {url} (bonding the stake)…"),
            ComputeLedger(url) as ledger,
        ):
            provider = _keypair(key, ledger.ss58_format)
            try:
                result = ledger.register_provider(provider, stake)
                console.print(
                    f"registered {provider.ss58_address} with a stake of {stake} planck (block {result.block_number})"
                )
            except AlreadyRegisteredError as error:
                console.print(f"already registered: {error}")
            status = ledger.provider_status(provider.ss58_address)
            console.print(f"provider {status.provider}: {status.state.value}, stake {status.stake} planck")
            return provider.ss58_address
    except ChainError as error:
        _fail(f"could not register on chain: {error}")


@peer_app.command("join")
def peer_join(
    initial_peers: InitialPeers = None,
    model: ModelOption = None,
    blocks: Annotated[
        str, typer.Option("--blocks", "-b", help="Blocks to serve: START:END (half-open) or 'auto' (fill the gaps).")
    ] = "auto",
    num_blocks: Annotated[
        int | None, typer.Option("--num-blocks", min=1, help="With --blocks auto: how many blocks to serve.")
    ] = None,
    host: Host = "127.0.0.1",
    port: Annotated[int, _port_option(0, "the peer's P2P endpoint")] = 0,
    direct: Annotated[
        bool,
        typer.Option(
            "--direct/--no-direct",
            help="Also serve inference over direct TLS streams (faster on fast networks; clients fall "
            "back to P2P when they cannot reach it).",
        ),
    ] = True,
    direct_port: Annotated[
        int, typer.Option("--direct-port", min=0, max=65535, help="TCP port for direct streams (0: pick a free one).")
    ] = 0,
    rate: Annotated[
        int, typer.Option("--rate", min=0, help="Price per token per billion parameters served, in planck.")
    ] = 1,
    stake: Annotated[
        str,
        typer.Option("--stake", help="Stake to bond on chain, in whole tokens (e.g. 10 or 0.5; 0: do not register)."),
    ] = "0",
    chain_url: ChainUrl = None,
    chain_key: ChainKey = None,
    receipts: Annotated[
        Path | None,
        typer.Option(
            "--receipts",
            help="SQLite file of this provider's receipts (default ~/.dllm/receipts-<account>.sqlite3).",
            dir_okay=False,
        ),
    ] = None,
    settle_interval: Annotated[
        float, typer.Option("--settle-interval", min=1.0, help="Seconds between settlement rounds of stored receipts.")
    ] = 30.0,
    credit_limit: Annotated[
        int | None,
        typer.Option(
            "--credit-limit",
            min=1,
            help="Planck one client may owe this peer (receipts not yet paid on chain, and unbilled work) before "
            "it is refused with payment_required. Default: one settlement segment's worth at --rate.",
        ),
    ] = None,
    quote_period: Annotated[
        float,
        typer.Option(
            "--quote-period",
            min=0.0,
            help="Seconds between signed price asks gossiped on dllm/quotes/1 (with --chain-key; 0: no gossip).",
        ),
    ] = 30.0,
    identity: Annotated[
        Path | None,
        typer.Option("--identity", help="Private key file: a stable peer id across restarts (created if missing)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Weights, activations and attention cache: float32, float16 or bfloat16.")
    ] = "float32",
    device: Annotated[
        str, typer.Option("--device", help="Where the blocks run: auto (cuda if available), cpu, cuda, cuda:N.")
    ] = "auto",
    cache_mb: Annotated[
        int, typer.Option("--cache-mb", min=1, help="Attention-cache budget for all sessions, in MiB.")
    ] = 256,
    session_timeout: Annotated[
        float, typer.Option("--session-timeout", min=1.0, help="Close inference sessions idle this many seconds.")
    ] = 120.0,
    adapter_rank: Annotated[
        int, typer.Option("--adapter-rank", min=0, help="Learn from feedback with LoRA adapters of this rank (0: off).")
    ] = 0,
    averaging_period: Annotated[
        float,
        typer.Option("--averaging-period", min=3.0, help="Seconds between adapter averaging rounds with replicas."),
    ] = 30.0,
    train_step_batch: Annotated[
        int, typer.Option("--train-step-batch", min=1, help="Feedback passes per adapter optimizer step.")
    ] = 4,
    learning_rate: Annotated[
        float, typer.Option("--learning-rate", min=1e-7, max=1.0, help="Adapters' learning rate (Adam).")
    ] = 1e-3,
    train_passes_per_minute: Annotated[
        float,
        typer.Option(
            "--train-passes-per-minute",
            min=0.01,
            max=1e6,
            help="Feedback passes each contributor (signing chain account) may send per minute, after a burst of 16.",
        ),
    ] = 120.0,
    canary_file: Annotated[
        Path | None,
        typer.Option(
            "--canary-file",
            dir_okay=False,
            help="Held-out canary examples (one per line; TAB splits prompt from scored text) that gate "
            "adapter updates. Default: the set shipped with DLLM.",
        ),
    ] = None,
    canary_max_rise: Annotated[
        float,
        typer.Option(
            "--canary-max-rise",
            min=0.0,
            max=1.0,
            help="Roll back an adapter update whose canary loss rises by more than this fraction.",
        ),
    ] = 0.01,
    canary_category_max_rise: Annotated[
        float,
        typer.Option(
            "--canary-category-max-rise",
            min=0.0,
            max=1.0,
            help="Roll back an adapter update that raises one canary category's loss (a '## NAME' section of the "
            "canary file, e.g. the shipped stereotype-probe) by more than this fraction.",
        ),
    ] = 0.05,
    canary_category_limit: Annotated[
        list[str] | None,
        typer.Option(
            "--canary-category-limit",
            help="NAME=RISE: category NAME's own bound instead of --canary-category-max-rise (repeatable).",
        ),
    ] = None,
    rehearsal_file: Annotated[
        Path | None,
        typer.Option(
            "--rehearsal-file",
            dir_okay=False,
            help="General text (one per line) whose span outputs training keeps near the base model's, so that "
            "learning from feedback costs less general ability. Never the canary file. Default: the set shipped "
            "with DLLM.",
        ),
    ] = None,
    rehearsal_weight: Annotated[
        float,
        typer.Option(
            "--rehearsal-weight",
            min=0.0,
            max=1e6,
            help="Weight of the rehearsal term in each adapter training step (0: off).",
        ),
    ] = 30.0,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            file_okay=False,
            help="Where this peer keeps the feedback it trains on and publishes (default ~/.dllm/feedback).",
        ),
    ] = None,
    data_budget: Annotated[
        int,
        typer.Option(
            "--data-budget",
            min=1,
            help="MiB of published feedback this peer keeps. Past it, the oldest examples committed on chain and "
            "replicated to another peer are evicted; if none are, new feedback is refused.",
        ),
    ] = 1024,
    data_batch_size: Annotated[
        int,
        typer.Option(
            "--data-batch-size",
            min=1,
            max=256,
            help="New feedback examples per data-batch commitment on chain (pending ones are also committed "
            "before each adapter version commit and every 5 minutes).",
        ),
    ] = 32,
) -> None:
    """Join the swarm as a compute provider serving a span of the model's blocks (runs until Ctrl-C)."""
    peers = _require_peers(initial_peers)
    span = _parse_blocks_option(blocks)
    category_limits = _parse_category_limits_option(canary_category_limit)
    url = arguments.parse_chain_url(chain_url)
    key = arguments.parse_chain_key(chain_key)
    stake_planck = _parse_stake_option(stake, url, key)
    folder = _model_folder(model)
    _check_span_fits_model(folder, span, num_blocks)
    account = _provider_account(url, key, stake_planck)
    from peer.config import PeerConfig

    config = _valid_config(
        lambda: PeerConfig(
            model=str(folder),
            blocks=span,
            num_blocks=num_blocks,
            initial_peers=peers,
            host_maddrs=[f"/ip4/{host}/tcp/{port}"],
            direct_port=direct_port if direct else None,
            identity_path=identity,
            rate=rate,
            chain_account=account,
            chain_key=key,
            chain_url=url,
            receipts_path=receipts,
            settle_interval_s=settle_interval,
            credit_limit=credit_limit,
            quote_period_s=quote_period,
            dtype=dtype,
            device=device,
            cache_bytes=cache_mb * 2**20,
            session_timeout_s=session_timeout,
            adapter_rank=adapter_rank,
            averaging_period_s=averaging_period,
            train_step_batch=train_step_batch,
            learning_rate=learning_rate,
            train_passes_per_minute=train_passes_per_minute,
            canary_file=canary_file,
            canary_max_rise=canary_max_rise,
            canary_category_max_rise=canary_category_max_rise,
            canary_category_limits=category_limits,
            rehearsal_file=rehearsal_file,
            rehearsal_weight=rehearsal_weight,
            data_dir=data_dir,
            data_budget_bytes=data_budget * 2**20,
            data_batch_size=data_batch_size,
        )
    )
    if adapter_rank > 0:  # a bad canary or rehearsal file fails here, in one line, not in the peer's start-up
        _check_canary_file(canary_file)
        if rehearsal_weight > 0:
            _check_rehearsal_file(rehearsal_file)
    _serve_peer(config)


@peer_app.command("unbond")
def peer_unbond(chain_url: ChainUrl = None, chain_key: ChainKey = None) -> None:
    """Start unbonding this provider's stake: from now on clients with a --min-stake route around it; the council
    returns the stake once the unbond delay has passed and no slash of it is pending (it can still be slashed
    during the delay)."""
    url = arguments.parse_chain_url(chain_url)
    key = arguments.parse_chain_key(chain_key)
    if url is None or key is None:
        raise typer.BadParameter("unbonding needs --chain-url and --chain-key (the provider's key)")
    from chain.errors import ChainError
    from chain.ledger import ComputeLedger

    try:
        with ComputeLedger(url) as ledger:
            provider = _keypair(key, ledger.ss58_format)
            result = ledger.request_unbond(provider)
            status = ledger.provider_status(provider.ss58_address)
    except ChainError as error:
        _fail(f"could not start the unbond: {error}")
    typer.echo(
        f"unbond of {status.provider} requested in block {result.block_number}: {status.stake} planck stay bonded "
        f"(and slashable) until the council returns them, from block {status.unbond_ready_at}"
    )


@peer_app.command("dispute")
def peer_dispute(
    evidence_hash: Annotated[
        str, typer.Argument(help="SHA-256 (hex) of the published evidence against this provider (its slash cites it).")
    ],
    reason: Annotated[
        str, typer.Option("--reason", help="Why you dispute it, recorded on chain (at most 280 characters).")
    ] = "",
    initial_peers: InitialPeers = None,
    model: ModelOption = None,
    chain_url: ChainUrl = None,
    chain_key: ChainKey = None,
) -> None:
    """Dispute evidence against this provider: fetch it from the swarm's verifiers, re-run it here, and record a
    dispute signed by the provider's key on chain with the re-run's outcome. Council members re-run the evidence
    once more before signing its slash; the provider's unbond waits until the council's decision window closes."""
    digest = _evidence_hash(evidence_hash, "'EVIDENCE_HASH'")
    peers = _require_peers(initial_peers)
    folder = _model_folder(model)
    url = arguments.parse_chain_url(chain_url)
    key = arguments.parse_chain_key(chain_key)
    if url is None or key is None:
        raise typer.BadParameter("a dispute is signed on chain: give --chain-url and --chain-key (the provider's key)")
    from chain.account_derivation import account_id
    from chain.history import MAX_DISPUTE_REASON

    if len(reason) > MAX_DISPUTE_REASON:
        raise typer.BadParameter(f"at most {MAX_DISPUTE_REASON} characters", param_hint="'--reason'")
    provider = _keypair(key)
    result = _fetch_and_recheck(peers, folder, digest)
    accused = result.evidence.provider
    if account_id(accused) != provider.public_key:
        _fail(f"evidence {digest.hex()} accuses {accused}, not this provider ({provider.ss58_address})")
    from chain.errors import ChainError
    from chain.ledger import ComputeLedger

    passed = not result.provider_failed
    try:
        with ComputeLedger(url) as ledger:
            filed = ledger.file_dispute(
                _keypair(key, ledger.ss58_format), digest, passed, result.worst_error_ppm, reason
            )
            status = ledger.provider_status(provider.ss58_address)
    except ChainError as error:
        _fail(f"could not file the dispute: {error}")
    window = next((d.open_until for d in status.open_disputes if d.evidence_hash == digest), None)
    typer.echo(
        f"dispute of evidence {digest.hex()} filed in block {filed.block_number} (this machine's re-run "
        f"{'passes' if passed else 'FAILS'} the provider, worst error {result.worst_error_ppm} ppm); "
        f"open until block {window}"
    )
    if not passed:
        typer.echo("warning: your own re-run fails your work too; council members will re-run it as well", err=True)


@chain_app.command("release-markers")
def chain_release_markers(chain_url: ChainUrl = None, chain_key: ChainKey = None) -> None:
    """Release this client's receipt markers whose receipts have expired: their Multisig deposits return to it.
    A paying client does this itself every few minutes; this is for an account that stopped paying."""
    url = arguments.parse_chain_url(chain_url)
    key = arguments.parse_chain_key(chain_key)
    if url is None or key is None:
        raise typer.BadParameter("releasing markers needs --chain-url and --chain-key (the paying client's key)")
    from chain.errors import ChainError
    from chain.ledger import ComputeLedger
    from economy.presigned_settlement import release_expired_markers

    try:
        with ComputeLedger(url) as ledger:
            client = _keypair(key, ledger.ss58_format)
            released = release_expired_markers(ledger, client)
            still_open = len(ledger.open_markers(client.ss58_address))
    except ChainError as error:
        _fail(f"could not release the markers: {error}")
    typer.echo(f"released {len(released)} markers of expired receipts; {still_open} stay open until theirs expire")


def _parse_category_limits_option(values: list[str] | None) -> dict[str, float]:
    from peer.config import parse_category_limits  # a light module: dataclasses only

    try:
        return parse_category_limits(values)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="'--canary-category-limit'") from None


def _parse_blocks_option(blocks: str) -> tuple[int, int] | None:
    """--blocks as a half-open span, or None for 'auto'."""
    from peer.config import parse_blocks  # a light module: dataclasses only

    try:
        return parse_blocks(blocks)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint=arguments.BLOCKS_HINT) from None


def _parse_stake_option(stake: str, url: str | None, key: str | None) -> int:
    """--stake in planck; a stake needs the chain to bond it on."""
    from chain.units import TOKEN_DECIMALS

    stake_planck = arguments.parse_amount(stake, TOKEN_DECIMALS, "'--stake'")
    if stake_planck and not (url and key):
        raise typer.BadParameter("bonding a stake needs --chain-url and --chain-key", param_hint="'--stake'")
    return stake_planck


def _check_span_fits_model(folder: Path, span: tuple[int, int] | None, num_blocks: int | None) -> None:
    """--blocks or --num-blocks within the model's blocks (read from config.json, without transformers: the peer
    imports it once its DHT process is forked, peer/server.py)."""
    from swarm.architectures import UnsupportedArchitectureError
    from swarm.model_files import ModelFilesError, read_config_fields

    try:
        num_layers = read_config_fields(folder).num_hidden_layers
    except (ModelFilesError, UnsupportedArchitectureError) as error:
        raise typer.BadParameter(str(error), param_hint="'--model'") from None
    if span is not None:
        arguments.check_blocks_fit(span, num_layers)
    elif num_blocks is not None and num_blocks > num_layers:
        raise typer.BadParameter(f"the model has only {num_layers} blocks", param_hint="'--num-blocks'")


def _provider_account(url: str | None, key: str | None, stake_planck: int) -> str | None:
    """The provider's chain account, registered with its stake bonded if one is given.

    Runs before anything is loaded: a provider that cannot bond its stake should not start serving."""
    account = _keypair(key).ss58_address if key else None  # a bad key is a usage error before any chain call
    if stake_planck:
        assert url is not None and key is not None
        account = _register_provider(url, key, stake_planck)
    return account


def _valid_config(build: Callable[[], _ConfigT]) -> _ConfigT:
    """A *Config built from options; a value out of its field's range is a usage error naming it."""
    try:
        return build()
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _read_text_file(read: Callable[[Path | None], _ReadT], path: Path | None, option: str) -> _ReadT:
    """`read(path)` (a canary or rehearsal file reader); its ConfigError is a usage error naming `option`."""
    from chain.errors import ConfigError

    try:
        return read(path)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint=f"'{option}'") from None


def _check_rehearsal_file(rehearsal_file: Path | None) -> list[str]:
    from peer.rehearsal import read_rehearsal_file

    return _read_text_file(read_rehearsal_file, rehearsal_file, "--rehearsal-file")


def _check_canary_file(canary_file: Path | None) -> None:
    from peer.canary_examples import read_canary_file

    _read_text_file(read_canary_file, canary_file, "--canary-file")


def _serve_peer(config: PeerConfig) -> None:
    """Runs the peer until SIGINT/SIGTERM, printing its ready line once it serves."""
    from dllm.service import serve_until_signal
    from dllm.startup_gc import CollectionPause

    with CollectionPause() as pause:  # the imports from here on (torch, hivemind, transformers): dllm/startup_gc.py
        from peer.server import PeerService

        peer = PeerService(config)

        def ready() -> None:
            pause.resume()
            print(peer.ready_line, flush=True)

        serve_until_signal(peer, on_ready=ready)


# ------------------------------------------------------------------------------------------------ query


def _check_top_p(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is outside (0, 1]")
    return value


# Sampling options shared by `query` and `chat`.
Temperature = Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 is greedy.")]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k likeliest (0: all).")]
TopP = Annotated[float, typer.Option("--top-p", callback=_check_top_p, help="Nucleus sampling mass, in (0, 1].")]
Seed = Annotated[int | None, typer.Option("--seed", help="Sampling seed, for reproducible output.")]
SharePrompts = Annotated[
    bool,
    typer.Option(
        "--share-prompts",
        help="Publish each prompt with its answer, signed by your account, for researchers (stored by peers and "
        "committed on chain; docs/data.md). Without it, prompts stay private.",
    ),
]


@app.command("query")
def query(
    prompt: Annotated[str, typer.Argument(help="The prompt to complete.")],
    initial_peers: InitialPeers = None,
    model: ModelOption = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens to generate at most.")] = 64,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable).")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they arrive.")] = True,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat", help="Send the prompt as a user message through the model's chat template, and print the answer."
        ),
    ] = False,
    chain_url: ChainUrl = None,
    min_stake: MinStake = 0,
    share_prompts: SharePrompts = False,
) -> None:
    """Query the distributed model: the prompt's completion streams to the terminal, its route to stderr."""
    peers = _require_peers(initial_peers)
    folder = _model_folder(model)
    client_config = _client_config(chain_url, min_stake, share_prompts)
    from rich.console import Console
    from rich.markup import escape

    from swarm.chat import ChatTooLongError, Conversation, context_limit
    from swarm.client import DistributedModel, GenerationParams

    params = GenerationParams(
        max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop=list(stop or []), seed=seed
    )
    status = Console(stderr=True)
    with status.status("Joining the swarm…"):
        distributed = DistributedModel.from_pretrained(str(folder), peers, config=client_config)
    try:
        request: str | list[int] = prompt
        if chat:
            conversation = Conversation(distributed.tokenizer, context_limit(distributed.config))
            try:
                request = conversation.prompt(prompt, max_tokens).prompt_ids
            except ChatTooLongError as error:
                _fail(str(error))
        if stream:
            text = distributed.stream(request, params)
            for delta in text:
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
            result = text.result
        else:
            result = distributed.generate(request, params)
            sys.stdout.write(result.text + "\n")
            status.print(
                f"[dim]{result.prompt_tokens} prompt + {result.completion_tokens} generated tokens, "
                f"finish: {result.finish_reason}[/dim]"
            )
        if result is not None:
            hops = (
                f"{hop.rsplit(':', 2)[0][-8:]}[{hop.split(':', 1)[1]}]{'' if version is None else f' v{version}'} "
                f"({standing})"
                for hop, standing, version in zip(
                    result.route, result.route_standing, result.route_versions, strict=True
                )
            )
            status.print(f"[dim]route: {escape(' → '.join(hops))}[/dim]")
            if share_prompts:
                _share_prompt(distributed, request, result.text, status)
    finally:
        distributed.close()


def _share_prompt(distributed: Any, prompt: str | list[int], answer: str, status: Any) -> None:
    """--share-prompts: publishes the prompt (as the model saw it) with its answer; a failure is only reported."""
    from chain.errors import DLLMError

    text = prompt if isinstance(prompt, str) else distributed.tokenizer.decode(prompt)
    try:
        peer_id = distributed.share_prompt(text, answer)
        status.print(f"[dim]prompt shared (public) through peer {peer_id[-8:]}[/dim]")
    except (DLLMError, RuntimeError) as error:
        status.print(f"[yellow]the prompt was not shared: {type(error).__name__}: {error}[/]")


CHAT_EXIT = "/exit"
CHAT_RESET = "/reset"


@app.command("chat")
def chat(
    initial_peers: InitialPeers = None,
    model: ModelOption = None,
    system: Annotated[
        str | None, typer.Option("--system", help="A system message opening the conversation (the model's persona).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Tokens per answer at most.")] = 64,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    chain_url: ChainUrl = None,
    min_stake: MinStake = 0,
    share_prompts: SharePrompts = False,
) -> None:
    """Chat with the distributed model: each line you type is a message, the answer streams back.

    The whole conversation stays in the prompt, through the model's chat template (the oldest exchanges are
    dropped once it outgrows the model's context). /reset forgets it; /exit or end of input (Ctrl-D) quits.
    Token counts and the route go to stderr, answers to stdout.
    """
    peers = _require_peers(initial_peers)
    folder = _model_folder(model)
    client_config = _client_config(chain_url, min_stake, share_prompts)
    from rich.console import Console

    from chain.errors import DLLMError
    from swarm.chat import ChatTooLongError, Conversation, context_limit
    from swarm.client import DistributedModel, GenerationParams

    params = GenerationParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    status = Console(stderr=True)
    with status.status("Joining the swarm…"):
        distributed = DistributedModel.from_pretrained(str(folder), peers, config=client_config)
    interactive = sys.stdin.isatty()
    if interactive:
        status.print(
            f"[dim]chatting with {distributed.model_name}; {CHAT_RESET} forgets, {CHAT_EXIT} or Ctrl-D quits[/]"
        )
    conversation = Conversation(distributed.tokenizer, context_limit(distributed.config), system=system)
    try:
        while True:
            if interactive:
                status.print("[bold]you>[/] ", end="")
            line = sys.stdin.readline()
            text = line.strip()
            if not line or text == CHAT_EXIT:
                break
            if text == CHAT_RESET:
                conversation.reset()
                status.print("[dim]conversation forgotten[/]")
                continue
            if not text:
                continue
            try:
                turn = conversation.prompt(text, max_tokens)
                answer = distributed.stream(turn.prompt_ids, params)
                for delta in answer:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except ChatTooLongError as error:
                status.print(f"[yellow]{error}[/]")
                continue
            except DLLMError as error:  # the swarm failed this answer: say so, keep the conversation going
                sys.stdout.write("\n")
                status.print(f"[red]no answer: {type(error).__name__}: {error}[/]")
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
            result = answer.result
            if result is None:  # set once the stream is exhausted, which the loop above did
                raise RuntimeError("the answer's stream ended without a result")
            conversation.record(turn, result.text.strip())
            if share_prompts:
                _share_prompt(distributed, turn.prompt_ids, result.text, status)
            dropped = f", {turn.dropped_exchanges} oldest exchanges dropped" if turn.dropped_exchanges else ""
            status.print(
                f"[dim]{result.prompt_tokens} prompt + {result.completion_tokens} generated tokens{dropped}[/]"
            )
    finally:
        distributed.close()


def _client_config(chain_url: str | None, min_stake: int, share_prompts: bool = False) -> Any:
    """The swarm.client.ClientConfig of the client commands' --chain-url, --min-stake and --share-prompts."""
    url = arguments.parse_chain_url(chain_url)
    if min_stake > 0 and url is None:
        raise typer.BadParameter(
            "checking providers' stake needs --chain-url (or --min-stake 0 for a free swarm)",
            param_hint="'--min-stake'",
        )
    from swarm.client import ClientConfig

    return _valid_config(lambda: ClientConfig(min_stake=min_stake, chain_url=url, share_prompts=share_prompts))


# --------------------------------------------------------------------------------------------- feedback


@app.command("feedback")
def feedback(
    prompt: Annotated[str, typer.Argument(help="The prompt the model saw.")],
    completion: Annotated[str, typer.Argument(help="The completion it should have given (the correction).")],
    initial_peers: InitialPeers = None,
    model: ModelOption = None,
    chain_url: ChainUrl = None,
    min_stake: MinStake = 0,
) -> None:
    """Send a training example (prompt + preferred completion): the swarm's adapters learn from it."""
    peers = _require_peers(initial_peers)
    if not completion.strip():
        raise typer.BadParameter("the preferred completion is empty", param_hint="COMPLETION")
    folder = _model_folder(model)
    client_config = _client_config(chain_url, min_stake)
    from swarm.client import DistributedModel

    distributed = DistributedModel.from_pretrained(str(folder), peers, config=client_config)
    try:
        if not hasattr(distributed, "feedback"):
            _fail("this swarm client cannot send feedback yet (DistributedModel.feedback is missing)")
        outcome = distributed.feedback(prompt, completion)
        account = distributed.core.contributor().account
        typer.echo(f"feedback accepted: {outcome} (published, signed by {account}: docs/data.md)")
    finally:
        distributed.close()


# ----------------------------------------------------------------------------------------------- verify


@app.command("verify")
def verify(
    initial_peers: InitialPeers = None,
    model: ModelOption = None,
    chain_url: ChainUrl = None,
    chain_key: ChainKey = None,
    gossip_port: GossipPort = 0,
    gossip_peer: GossipPeer = None,
    probe: Annotated[
        bool,
        typer.Option(
            "--probe",
            help="Do not serve: probe every provider's blocks once with random inputs, "
            "recomputed locally, print a table and exit (1 if any provider is wrong).",
        ),
    ] = False,
    rounds: Annotated[
        int | None, typer.Option("--rounds", min=1, max=100, help="With --probe: probes per provider (default 1).")
    ] = None,
    tokens: Annotated[
        int | None, typer.Option("--tokens", min=1, max=512, help="With --probe: positions per probe (default 8).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="With --probe: seed of the probe inputs (default: random).")
    ] = None,
    evidence_db: Annotated[
        Path | None,
        typer.Option(
            "--evidence-db",
            help="SQLite file of the samples, verdicts and slashes this verifier keeps and serves "
            "(default ~/.dllm/evidence-<account>.sqlite3).",
        ),
    ] = None,
    recheck: Annotated[
        str | None,
        typer.Option(
            "--recheck",
            help="Do not serve: fetch the published evidence with this SHA-256 (hex) from the swarm's verifiers, "
            "re-run its checks here, print the verdicts and exit (1 if the re-run fails the provider).",
        ),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Re-run in float32, float16 or bfloat16 (half the memory; judges bfloat16 work as tightly as "
            "float32, float32 and float16 work only at bfloat16's noise bound).",
        ),
    ] = "float32",
) -> None:
    """Run a verifier: re-run clients' sampled work, publish signed verdicts, keep and serve evidence (until Ctrl-C).

    With --probe, check every provider once with probe inputs instead, and exit. With --recheck HASH,
    re-run the checks of published evidence on this machine, and exit.
    """
    peers = _require_peers(initial_peers)
    folder = _model_folder(model)
    if dtype != "float32" and (recheck is not None or probe):
        raise typer.BadParameter("a probe and a re-check run in float32; drop --dtype", param_hint="'--dtype'")
    if recheck is not None:
        _recheck_evidence(peers, folder, recheck)
        return
    if probe:
        _reject_serving_options(gossip_peer=gossip_peer)
        _probe_providers(peers, folder, _probe_config(rounds, tokens, seed))
        return
    _reject_probe_options(rounds=rounds, tokens=tokens, seed=seed)
    url = arguments.parse_chain_url(chain_url)
    key = _verifier_key(arguments.parse_chain_key(chain_key))
    from dllm.verifier import VerifierConfig

    _serve_verifier(
        _valid_config(
            lambda: VerifierConfig(
                model=str(folder),
                key=key,
                initial_peers=peers,
                chain_url=url,
                gossip_port=gossip_port,
                gossip_peers=list(gossip_peer or []),
                evidence_path=str(evidence_db) if evidence_db else None,
                dtype=dtype,
            )
        )
    )


def _recheck_evidence(peers: list[str], folder: Path, digest_hex: str) -> None:
    """`dllm verify --recheck HASH`: this machine's verdict on published evidence."""
    digest = _evidence_hash(digest_hex, "'--recheck'")
    result = _fetch_and_recheck(peers, folder, digest)
    if result.provider_failed:
        _fail(f"the re-run of evidence {digest.hex()} FAILS provider {result.evidence.provider}")
    typer.echo(f"the re-run of evidence {digest.hex()} passes provider {result.evidence.provider}")


def _evidence_hash(digest_hex: str, hint: str) -> bytes:
    try:
        digest = bytes.fromhex(digest_hex.removeprefix("0x"))
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise typer.BadParameter("the evidence hash is 32 bytes of hex (64 digits)", param_hint=hint)
    return digest


def _fetch_and_recheck(peers: list[str], folder: Path, digest: bytes) -> Any:
    """Fetches the evidence named by `digest` from the swarm, re-runs it here, prints both; the RecheckResult."""
    import asyncio

    from chain.errors import DLLMError
    from dllm.recheck import fetch_and_recheck

    try:
        result = asyncio.run(fetch_and_recheck(peers, digest, folder))
    except DLLMError as error:
        _fail(f"could not re-check evidence {digest.hex()}: {error}")
    for verdict in result.evidence.verdicts:
        v = verdict.verdict
        typer.echo(
            f"evidence verdict: verifier={v.verifier} provider={v.provider} blocks={v.start}:{v.end} "
            f"{'passed' if v.passed else 'FAILED'} error_ppm={v.worst_error_ppm}"
        )
    for s in result.samples:
        c = s.comparison
        typer.echo(
            f"recheck: receipt={s.receipt_id} provider={s.provider} blocks={s.blocks.start}:{s.blocks.stop} "
            f"dtype={s.dtype} {'passed' if c.passed else 'FAILED'} error={c.worst_rel_error:.3g} "
            f"tolerance={s.tolerance:.3g}"
        )
    return result


def _reject_serving_options(*, gossip_peer: list[str] | None) -> None:
    """A one-shot probe takes no serving verifier's options (--chain-key may come from DLLM_CHAIN_KEY: a probe
    just does not use it)."""
    serving_only = {"'--gossip-peer'": gossip_peer}
    for hint, value in serving_only.items():
        if value:
            raise typer.BadParameter("only a serving verifier uses this; drop it or drop --probe", param_hint=hint)


def _reject_probe_options(*, rounds: int | None, tokens: int | None, seed: int | None) -> None:
    for hint, probe_option in (("'--rounds'", rounds), ("'--tokens'", tokens), ("'--seed'", seed)):
        if probe_option is not None:
            raise typer.BadParameter("only a one-shot probe uses this: add --probe", param_hint=hint)


def _probe_config(rounds: int | None, tokens: int | None, seed: int | None) -> ProbeConfig:
    """The ProbeConfig of --rounds, --tokens and --seed; an option not given keeps ProbeConfig's default."""
    from dllm.probe_check import ProbeConfig

    given = {"rounds": rounds, "tokens": tokens, "seed": seed}
    return ProbeConfig(**{k: v for k, v in given.items() if v is not None})


def _verifier_key(key: str | None) -> str:
    """The verifier's signing key, checked now: a bad key is a usage error, not a crash later."""
    if not key:
        raise typer.BadParameter(
            "a verifier signs its verdicts: give --chain-key (or --probe for a one-shot check)",
            param_hint="'--chain-key'",
        )
    _keypair(key)
    return key


# ---------------------------------------------------------------------------------------------- council


@app.command("council")
def council(
    initial_peers: InitialPeers = None,
    model: ModelOption = None,
    chain_url: ChainUrl = None,
    chain_key: ChainKey = None,
    authorized: Annotated[
        list[str] | None,
        typer.Option("--verifier", help="Account whose verdicts count (repeatable; default: the dev council members)."),
    ] = None,
    threshold: Annotated[
        int, typer.Option("--threshold", min=1, help="Failing verdicts from distinct verifiers that make a proposal.")
    ] = 2,
    gossip_port: GossipPort = 0,
    gossip_peer: GossipPeer = None,
    evidence_db: Annotated[
        Path | None,
        typer.Option(
            "--evidence-db",
            help="SQLite file of the evidence, tally and slashes this member keeps "
            "(default ~/.dllm/council-<account>.sqlite3).",
        ),
    ] = None,
) -> None:
    """Run one council member with its ONE key: re-check the evidence of verifiers' failing verdicts and sign
    the slash only if its own re-run fails the provider (until Ctrl-C)."""
    peers = _require_peers(initial_peers)
    folder = _model_folder(model)
    url = arguments.parse_chain_url(chain_url)
    key = arguments.parse_chain_key(chain_key)
    if not url or not key:
        raise typer.BadParameter("a council member signs slashes on chain: give --chain-url and --chain-key")
    _keypair(key)
    from dllm.council import CouncilConfig, CouncilService
    from dllm.service import serve_until_signal

    service = CouncilService(
        CouncilConfig(
            model=str(folder),
            key=key,
            initial_peers=peers,
            chain_url=url,
            verifiers=list(authorized or []),
            threshold=threshold,
            gossip_port=gossip_port,
            gossip_peers=list(gossip_peer or []),
            evidence_path=str(evidence_db) if evidence_db else None,
        )
    )
    serve_until_signal(service, on_ready=lambda: print(service.ready_line, flush=True))


def _serve_verifier(config: VerifierConfig) -> None:
    """Runs the verifier until SIGINT/SIGTERM, printing its ready line once it serves."""
    from dllm.service import serve_until_signal
    from dllm.verifier import VerifierService

    service = VerifierService(config)
    serve_until_signal(service, on_ready=lambda: print(service.ready_line, flush=True))


def _probe_providers(peers: list[str], folder: Path, config: Any) -> None:
    """`dllm verify --probe`: probe inputs through every provider's span, compared with a local recomputation."""
    import asyncio

    from rich.console import Console
    from rich.table import Table

    from dllm.probe_check import probe_swarm
    from swarm.client import ClientConfig, SwarmClient

    async def run() -> list[Any]:
        core = SwarmClient(folder, peers, ClientConfig())
        await core.start()
        try:
            return await probe_swarm(core, folder, config)
        finally:
            await core.close()

    console = Console()
    with console.status("Probing every provider's blocks…"):
        results = asyncio.run(run())
    if not results:
        _fail("no provider announces this model in the swarm")
    table = Table(title="Spot checks (probe inputs, recomputed locally)")
    for name in ("peer", "blocks", "chain account", "verdict", "worst relative error"):
        table.add_column(name)
    for r in results:
        verdict = "[green]pass[/]" if r.passed else f"[red]FAIL[/] {r.error or ''}"
        table.add_row(
            r.peer_id[-10:], f"{r.start}:{r.end}", r.chain_account or "-", verdict, f"{r.worst_rel_error:.2e}"
        )
    console.print(table)
    failed = [r for r in results if not r.passed]
    if failed:
        _fail(f"{len(failed)} of {len(results)} checks failed: " + ", ".join(sorted({r.peer_id for r in failed})))


# -------------------------------------------------------------------------------------------------- api


@app.command("api")
def api(
    initial_peers: InitialPeers = None,
    model: ModelOption = None,
    host: Host = "127.0.0.1",
    port: Annotated[int, _port_option(8000, "the HTTP API")] = 8000,
    chain_url: ChainUrl = None,
    min_stake: MinStake = 0,
    api_keys: Annotated[
        Path | None,
        typer.Option(
            "--api-keys",
            help="File of 'API_KEY CHAIN_KEY' lines: each /v1 request needs a listed bearer key (else 401), and its "
            "feedback is signed by that key's chain account (one contributor per user).",
        ),
    ] = None,
    share_prompts: SharePrompts = False,
) -> None:
    """Serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models) over the swarm."""
    peers = _require_peers(initial_peers)
    folder = _model_folder(model)
    client_config = _client_config(chain_url, min_stake, share_prompts)
    from dllm.service import serve_until_signal
    from swarm.api import ApiService

    try:
        service = ApiService(
            model_path=folder,
            initial_peers=peers,
            host=host,
            port=port,
            client_config=client_config,
            api_keys_file=api_keys,
        )
    except (OSError, ValueError) as e:
        _fail(f"--api-keys: {e}")
    serve_until_signal(service, on_ready=lambda: print(service.ready_line, flush=True))


# -------------------------------------------------------------------------------------------- dashboard


@app.command("dashboard")
def dashboard(
    initial_peers: InitialPeers = None,
    chain_url: ChainUrl = None,
    host: Host = "127.0.0.1",
    port: Annotated[int, _port_option(8080, "the dashboard")] = 8080,
    refresh: Annotated[
        float, typer.Option("--refresh", min=0.5, help="Seconds between page refreshes and swarm scans.")
    ] = 2.0,
) -> None:
    """Serve a live web page of the swarm: block coverage, throughput, stake, earnings, slashes."""
    peers = _require_peers(initial_peers)
    url = arguments.parse_chain_url(chain_url)
    from dllm.service import serve_until_signal
    from swarm.dashboard import DashboardConfig, DashboardService

    service = DashboardService(
        DashboardConfig(initial_peers=peers, chain_url=url, host=host, port=port, refresh_s=refresh)
    )
    serve_until_signal(service, on_ready=lambda: print(service.ready_line, flush=True))


# ------------------------------------------------------------------------------------ data and lineage


MODEL_FILTER_HELP = (
    "Only this model's records: its name as `dllm lineage` lists it, or tiny, smollm2, a model folder or a .gguf "
    "file (the name it is served under). Default: every model on the chain."
)


def _model_name(model: str) -> str:
    """The name the swarm and its chain records know `--model` by: an alias, an existing model folder or a GGUF
    file names the model it resolves to (as a peer serving it announces it); anything else is that name as is."""
    from dllm.model_choice import ALIASES

    if model.strip() not in ALIASES and not Path(model).expanduser().exists():
        return model
    return _swarm_name(_model_folder(model))


def _swarm_name(folder: Path) -> str:
    from swarm.model_files import load_config, model_name

    return model_name(folder, load_config(folder))


def _require_chain_url(chain_url: str | None, what: str) -> str:
    url = arguments.parse_chain_url(chain_url)
    if url is None:
        raise typer.BadParameter(f"{what} reads the chain's records: give --chain-url", param_hint="'--chain-url'")
    return url


@data_app.command("export")
def data_export(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Folder to write feedback.jsonl and summary.json into.", file_okay=False),
    ],
    initial_peers: InitialPeers = None,
    chain_url: ChainUrl = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_FILTER_HELP)] = None,
) -> None:
    """Download every published feedback example, check it against its commitment on chain and its contributor's
    signature, and write DIR/feedback.jsonl (one example a line, with provenance) and DIR/summary.json.

    Every model's data on the chain by default (summary.json counts each model apart); --model exports one.
    A peer that serves data not matching a commitment is named (its data is never written); examples no peer
    serves (evicted, or their holders offline) are listed as unavailable."""
    peers = _require_peers(initial_peers)
    url = _require_chain_url(chain_url, "an export")
    name = _model_name(model) if model is not None else None
    import asyncio

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from chain.errors import DLLMError
    from dllm.data_export import export_dataset

    console = Console(stderr=True, width=80)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        reading = progress.add_task("reading the chain's records", total=None)

        def start(hashes: int, peer_count: int) -> Callable[[int], None]:
            progress.update(reading, visible=False)
            task = progress.add_task(f"asking {peer_count} peer(s) for {hashes} example(s)", total=peer_count)
            return lambda done: progress.advance(task, done)

        try:
            report = asyncio.run(export_dataset(peers, url, out, model=name, progress=start))
        except DLLMError as error:
            _fail(f"the export failed: {error}")
    outcome = report.outcome
    if name is not None:
        others = f" (left out: {', '.join(report.other_models)})" if report.other_models else ""
        typer.echo(f"model {name} only{others}"[:80])
    typer.echo(
        f"{report.written} of {report.committed} committed examples written; {report.batches} data batches, "
        f"{report.versions} adapter versions on chain\nfiles: {out / 'feedback.jsonl'} and summary.json"
    )
    if len(report.per_model) > 1:
        for each, counts in report.per_model.items():
            typer.echo(f"  {each}: {counts['written']} of {counts['committed']} written"[:80])
    for peer_id in outcome.tampering_peers:
        count = sum(t.peer_id == peer_id for t in outcome.tampered)
        typer.echo(f"TAMPERED: peer {peer_id} served {count} record(s) not matching their commitment", err=True)
    if outcome.invalid:
        typer.echo(f"invalid: {len(outcome.invalid)} committed record(s) fail their signature check", err=True)
    if outcome.unavailable:
        typer.echo(f"unavailable: {len(outcome.unavailable)} committed example(s) no peer served:", err=True)
        for content_hash in outcome.unavailable[:20]:
            typer.echo(f"  {content_hash.hex()}", err=True)
        if len(outcome.unavailable) > 20:
            typer.echo(f"  … and {len(outcome.unavailable) - 20} more (summary.json lists all)", err=True)


@app.command("lineage")
def lineage(
    chain_url: ChainUrl = None,
    initial_peers: InitialPeers = None,
    blocks: Annotated[
        str | None, typer.Option("--blocks", "-b", help="Only this span, START:END (default: every span).")
    ] = None,
    verify: Annotated[
        int | None,
        typer.Option(
            "--verify",
            min=1,
            help="Download version V's adapters by their committed sha256 from every peer that may hold them and "
            "check each against it (exit 1 on a mismatch, or if no peer serves them).",
            metavar="V",
        ),
    ] = None,
    reproduce: Annotated[
        int | None,
        typer.Option(
            "--reproduce",
            min=1,
            help="Replay version V's committed data on its parent here (whole model, LoRA on that span) and "
            "report the distance to the committed tensors.",
            metavar="V",
        ),
    ] = None,
    peer: Annotated[
        list[str] | None,
        typer.Option("--peer", help="With --verify: also ask this peer id (repeatable)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=MODEL_FILTER_HELP[:-1] + "; with --reproduce, the files replayed on (default tiny), and only "
            "that model's versions.",
        ),
    ] = None,
    learning_rate: Annotated[
        float,
        typer.Option("--learning-rate", min=1e-7, max=1.0, help="With --reproduce: the peers' learning rate."),
    ] = 1e-3,
    train_step_batch: Annotated[
        int, typer.Option("--train-step-batch", min=1, help="With --reproduce: the peers' passes per step.")
    ] = 4,
    rehearsal_weight: Annotated[
        float,
        typer.Option(
            "--rehearsal-weight",
            min=0.0,
            max=1e6,
            help="With --reproduce: the peers' rehearsal weight, added to each replayed step as they add it (0: off).",
        ),
    ] = 30.0,
    rehearsal_file: Annotated[
        Path | None,
        typer.Option(
            "--rehearsal-file",
            dir_okay=False,
            help="With --reproduce: the peers' rehearsal text (default: the set shipped with DLLM, as theirs).",
        ),
    ] = None,
) -> None:
    """The history of each span's adapters from the chain: version <- parent, tensor sha256, data roots,
    replicas and canary loss per category before -> after (an up arrow marks a rise); forks are flagged."""
    url = _require_chain_url(chain_url, "the lineage")
    span = _parse_blocks_option(blocks) if blocks is not None else None
    if verify is not None and reproduce is not None:
        raise typer.BadParameter("give one of --verify and --reproduce", param_hint="'--reproduce'")
    if peer and verify is None:
        raise typer.BadParameter("only --verify asks given peers", param_hint="'--peer'")
    peers = _require_peers(initial_peers) if verify is not None or reproduce is not None else []
    folder = _model_folder(model) if reproduce is not None else None
    texts = _check_rehearsal_file(rehearsal_file) if reproduce is not None and rehearsal_weight > 0 else []
    # The replay's files decide the model: another model's version cannot be replayed on them.
    name = _swarm_name(folder) if folder is not None else _model_name(model) if model is not None else None
    from chain.errors import DLLMError
    from dllm.data_export import models_of, of_model, read_lineage
    from dllm.lineage import render_lineage, select

    try:
        batches, versions = read_lineage(url)
    except DLLMError as error:
        _fail(f"could not read the chain's records: {error}")
    on_chain = models_of(batches, versions)
    batches, versions = of_model(batches, versions, name)
    if name is not None and not versions:
        others = ", ".join(on_chain) or "none"
        message = f"no adapter-version records of model {name} on chain (models with records: {others})"
        if verify is None and reproduce is None:
            typer.echo(message)
            return
        _fail(message)
    if span is not None:
        versions = [v for v in versions if v.span == span]
    if verify is None and reproduce is None:
        roots: dict[bytes, list[Any]] = {}
        for batch in batches:
            roots.setdefault(batch.root, []).append(batch)
        typer.echo(render_lineage(versions, roots))
        return
    target = verify if verify is not None else reproduce
    assert target is not None
    chosen = select(versions, target, span)
    if not chosen:
        _fail(f"no adapter-version record of v{target}" + (f" for blocks {blocks}" if blocks else ""))
    if verify is not None:
        _verify_versions(peers, chosen, list(peer or []))
        return
    if len(chosen) > 1:
        _fail(f"v{target} is committed for {len(chosen)} spans or fork sides: choose one with --blocks")
    typer.echo(f"model {name}: replaying on {folder}"[:80])
    assert folder is not None
    rehearsal = _ReplayRehearsal(rehearsal_weight, rehearsal_file, texts)
    _reproduce_version(peers, folder, chosen[0], batches, learning_rate, train_step_batch, rehearsal)


@dataclass(frozen=True)
class _ReplayRehearsal:
    """The rehearsal term a replay adds to each step: the peers' weight and texts (peer/rehearsal.py)."""

    weight: float
    file: Path | None
    texts: list[str]

    @property
    def source(self) -> str:
        return str(self.file) if self.file is not None else "the shipped default set"


def _verify_versions(peers: list[str], chosen: list[Any], extra: list[str]) -> None:
    import asyncio

    from dllm.lineage import render_checks, verify_version
    from swarm.dht import start_dht

    async def run() -> list[Any]:
        dht, _ = await asyncio.to_thread(start_dht, peers, client_mode=True)
        try:
            p2p = await dht.replicate_p2p()
            try:
                return [await verify_version(dht, p2p, v, extra) for v in chosen]
            finally:
                await p2p.shutdown()
        finally:
            await asyncio.to_thread(dht.shutdown)

    from rich.console import Console

    with Console(stderr=True).status("Downloading the adapters from the peers that may hold them…"):
        checks = asyncio.run(run())
    typer.echo(render_checks(checks))
    bad = [c for c in checks if not c.ok]
    if bad:
        mismatched = sorted({s.peer_id for c in bad for s in c.mismatched})
        _fail(
            "adapters differ from the committed sha256 on peer(s) " + ", ".join(mismatched)
            if mismatched
            else "no peer served the committed adapters: they cannot be verified"
        )


def _reproduce_version(
    peers: list[str],
    folder: Path,
    version: Any,
    batches: list[Any],
    learning_rate: float,
    step_batch: int,
    rehearsal: _ReplayRehearsal,
) -> None:
    import asyncio

    from rich.console import Console

    from dllm.data_export import fetch_committed, listings, p2p_fetch, peer_order, swarm_peers
    from dllm.lineage import (
        ReplayReport,
        distance,
        fetch_bundle_by_digest,
        initial_bundle,
        lora_config_of,
        replay,
        span_peer_ids,
    )
    from peer.rehearsal import SpanRehearsal
    from peer.training import TrainingConfig
    from swarm.dht import start_dht

    roots = set(version.data_roots)
    wanted = listings(b for b in batches if b.root in roots)

    async def fetch() -> tuple[Any, Any, Any]:
        dht, _ = await asyncio.to_thread(start_dht, peers, client_mode=True)
        try:
            p2p = await dht.replicate_p2p()
            try:
                sources = list(
                    dict.fromkeys([*version.replicas, *await span_peer_ids(dht, version.model, version.span)])
                )
                committed = await fetch_bundle_by_digest(p2p, sources, version.sha256)
                parent = None
                if version.parent_sha256 is not None and version.parent > 0:
                    parent = await fetch_bundle_by_digest(p2p, sources, version.parent_sha256)
                records = await swarm_peers(dht, [version.model])
                order = peer_order(records, (p.batch.sender for places in wanted.values() for p in places))
                outcome = await fetch_committed(wanted, order, p2p_fetch(p2p))
                return committed, parent, outcome
            finally:
                await p2p.shutdown()
        finally:
            await asyncio.to_thread(dht.shutdown)

    console = Console(stderr=True)
    with console.status("Fetching the committed adapters and data…"):
        committed, parent, outcome = asyncio.run(fetch())
    if committed is None:
        _fail(f"no peer serves v{version.version}'s committed adapters ({version.sha256.hex()[:16]}…)")
    lora = lora_config_of(committed)
    if parent is None:
        if version.parent != 0:
            _fail(f"no peer serves the parent v{version.parent}'s adapters: nothing to replay on")
        parent = initial_bundle(lora, folder, version.span)
        if version.parent_sha256 is not None and parent.digest != version.parent_sha256:
            _fail("the local v0 adapters do not hash to the committed parent sha256 (another LoRA seed or model?)")
    examples = [outcome.examples[h][0] for h in wanted if h in outcome.examples]
    trained = [e for e in examples if e.kind == "feedback"]
    missing = len(wanted) - len(examples)
    if missing:
        typer.echo(f"warning: {missing} committed example(s) could not be fetched; replaying without them", err=True)
    if not trained:
        _fail(f"v{version.version} has no fetchable committed feedback to replay")
    training = TrainingConfig(learning_rate=learning_rate)
    term = SpanRehearsal(rehearsal.weight) if rehearsal.weight > 0 else None
    with console.status(f"Replaying {len(trained)} example(s) on v{version.parent}…"):
        replayed, steps = replay(
            folder, version.span, parent, lora, trained, training, step_batch, term, rehearsal.texts
        )
    rel, cos, cn, rn = distance(replayed, committed.tensors, parent.tensors)
    report = ReplayReport(
        version, len(trained), len({e.contributor for e in trained}), steps, rel, cos, cn, rn,
        rehearsal.weight, rehearsal.source,
    )  # fmt: skip
    typer.echo(report.render())


# ------------------------------------------------------------------------------------------------- demo


@app.command("demo")
def demo(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="The model the swarm serves: smollm2 (SmolLM2-135M-Instruct, installed by scripts/setup), tiny "
            "(the embedded test model: fast, its answers are nonsense), a .gguf file or a model folder.",
        ),
    ] = "smollm2",
    peers: Annotated[int, typer.Option("--peers", min=1, max=8, help="How many compute peers to start.")] = 3,
    queries: Annotated[int, typer.Option("--queries", min=1, max=20, help="How many demo queries to run.")] = 3,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, max=256, help="Tokens per answer at most.")] = 48,
    chain_port: Annotated[int, typer.Option("--chain-port", min=0, max=65535, help="Dev chain port (0: free).")] = 0,
    verifier: Annotated[
        bool, typer.Option("--verifier/--no-verifier", help="Start a verifier that spot-checks every receipt's work.")
    ] = True,
) -> None:
    """Run everything locally: dev chain, bootstrap node, paid peers, a verifier and the council, questions
    answered through the chat template, settlement; then shut it all down."""
    from dllm.demo import DemoConfig, DemoError, run_demo

    try:
        report = run_demo(
            DemoConfig(
                model=model,
                peers=peers,
                queries=queries,
                max_tokens=max_tokens,
                chain_port=chain_port,
                verifier=verifier,
            )
        )
    except DemoError as error:
        _fail(f"the demo failed: {error}")
    if report.leftover_processes or report.leftover_sockets:
        _fail("the demo left processes or sockets behind (listed above)")


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the `dllm` executable: bad arguments give one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="dllm", standalone_mode=False)
    except typer.TyperException as error:
        # Usage errors carry the context of the command they concern; name it and where help is.
        ctx = getattr(error, "ctx", None)
        where = ctx.command_path if ctx is not None else "dllm"
        hint = f" (see '{where} --help')" if ctx is not None else ""
        sys.stderr.write(f"{where}: error: {error.format_message()}{hint}\n")
        sys.exit(getattr(error, "exit_code", 1))
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("dllm: interrupted\n")
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()

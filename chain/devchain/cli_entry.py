"""`dllm chain dev`: run the dev chain in the foreground until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chain.account_derivation import BURN_ACCOUNT, address
from chain.council import Council
from chain.devchain.dev_accounts import DEV_ACCOUNT_NAMES, DEV_SS58_FORMAT, dev_keypair
from chain.devchain.genesis import DEV_ENDOWMENT
from chain.devchain.launcher import DEFAULT_STATE_DIR, DevChain, DevChainConfig
from chain.units import PLANCK_PER_TOKEN, TOKEN_SYMBOL


def _describe(chain: DevChain, console: Console) -> None:
    council = Council.dev()
    console.print(f"[bold green]DLLM dev chain ready[/] at [bold]{chain.url}[/] (Rococo Asset Hub runtime)")
    state = chain.config.state_dir
    console.print(f"state: {state.resolve() if state else 'in memory (lost on exit)'}; log: {chain.log_path}")
    table = Table(title="Dev accounts (sr25519, SS58 prefix 2)")
    table.add_column("URI")
    table.add_column("address", overflow="fold")
    table.add_column("genesis balance", justify="right")
    for name in DEV_ACCOUNT_NAMES:
        table.add_row(
            f"//{name}", dev_keypair(name).ss58_address, f"{DEV_ENDOWMENT // PLANCK_PER_TOKEN:,} {TOKEN_SYMBOL}"
        )
    console.print(table)
    console.print(
        f"verifier council: //Alice, //Bob, //Charlie, {council.threshold}-of-{len(council.members)}; "
        f"multisig account {address(council.account(), DEV_SS58_FORMAT)}"
    )
    console.print(f"burn sink: {address(BURN_ACCOUNT, DEV_SS58_FORMAT)}")
    console.print("Press Ctrl-C to stop.")


async def serve_dev_chain(port: int = 9944, state_dir: Path | None = DEFAULT_STATE_DIR) -> None:
    """Start the dev chain, describe it, and keep it running until SIGINT/SIGTERM."""
    console = Console()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    chain = DevChain(DevChainConfig(port=port, state_dir=state_dir))
    try:
        with console.status("starting the dev chain (first run derives the genesis, ~5 s)..."):
            await chain.start()
        _describe(chain, console)
        waiter = asyncio.ensure_future(stop.wait())
        exited = asyncio.ensure_future(chain.wait_exit())
        await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            console.print(f"[red]the dev chain exited unexpectedly; see {chain.log_path}[/]")
        for task in (waiter, exited):
            task.cancel()
    finally:
        console.print("stopping the dev chain...")
        await chain.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    console.print("stopped" + ("; state kept in " + str(state_dir) if state_dir else ""))


def run_dev_chain(port: int = 9944, state_dir: Path | None = DEFAULT_STATE_DIR) -> None:
    """Blocking entry point for the CLI: `dllm chain dev [--port 9944] [--state-dir DIR|--no-persist]`."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    asyncio.run(serve_dev_chain(port, state_dir))

"""`dllm chain dev`: what it prints about a running dev chain (dllm/cli.py runs the chain as a service)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from chain.account_derivation import BURN_ACCOUNT, address
from chain.council import Council
from chain.devchain.dev_accounts import DEV_ACCOUNT_NAMES, DEV_SS58_FORMAT, dev_keypair
from chain.devchain.genesis import DEV_ENDOWMENT
from chain.devchain.launcher import DevChain
from chain.units import PLANCK_PER_TOKEN, TOKEN_SYMBOL


def describe(chain: DevChain, console: Console) -> None:
    """What `dllm chain dev` prints once the chain serves: endpoint, state, dev accounts, council."""
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

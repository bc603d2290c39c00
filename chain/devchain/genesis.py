"""Derive the dev chain's raw chain spec from the shipped Rococo Asset Hub genesis.

The Rococo Asset Hub spec ships inside the npm package @substrate/connect-known-chains (GPL-3.0),
so it is extracted at install / first-run time into the ignored build directory, never committed.
The dev spec is that genesis, unchanged runtime and all, plus storage writes that make the
protocol usable at block 1: the dev accounts are funded and the protocol accounts exist.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chain.account_derivation import BURN_ACCOUNT
from chain.council import Council
from chain.devchain.dev_accounts import DEV_ACCOUNT_NAMES, dev_keypair
from chain.errors import DevChainUnavailableError
from chain.storage_keys import blake2_128_concat, storage_prefix
from chain.units import PLANCK_PER_TOKEN

logger = logging.getLogger(__name__)

DEVCHAIN_DIR = Path(__file__).resolve().parent
BUILD_DIR = DEVCHAIN_DIR / "build"
NODE_MODULES = DEVCHAIN_DIR / "node_modules"
UPSTREAM_SPEC_MODULE = "@substrate/connect-known-chains/rococo_v2_2_asset_hub"

# Bump when the derivation below changes, so existing builds are regenerated.
GENESIS_BUILDER_VERSION = 1

DEV_ENDOWMENT = 1_000_000 * PLANCK_PER_TOKEN
# The runtime's existential deposit (Balances.ExistentialDeposit of spec 900).
EXISTENTIAL_DEPOSIT = 3_333_333


@dataclass(frozen=True)
class GenesisAccount:
    """An account written into the genesis state."""

    label: str
    account: bytes
    free: int


def system_account_key(account: bytes) -> bytes:
    return storage_prefix("System", "Account") + blake2_128_concat(account)


def encode_account_info(free: int) -> bytes:
    """AccountInfo of spec 900: nonce, consumers, providers, sufficients (u32), then
    free, reserved, misc_frozen, fee_frozen (u128)."""
    counters = (0).to_bytes(4, "little") * 2 + (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
    return counters + free.to_bytes(16, "little") + bytes(48)


def genesis_accounts(council: Council) -> list[GenesisAccount]:
    """Who gets funds at genesis: the dev accounts, and the burn sink (so slashes of any size land)."""
    accounts = [GenesisAccount(f"//{n}", dev_keypair(n).public_key, DEV_ENDOWMENT) for n in DEV_ACCOUNT_NAMES]
    accounts.append(GenesisAccount("burn sink", BURN_ACCOUNT, EXISTENTIAL_DEPOSIT))
    accounts.append(GenesisAccount("council multisig", council.account(), EXISTENTIAL_DEPOSIT))
    return accounts


def extract_upstream_spec(node: str = "node") -> dict[str, Any]:
    """Read the Rococo Asset Hub raw spec out of the installed npm package."""
    if shutil.which(node) is None:
        raise DevChainUnavailableError("Node.js is not installed; install Node 20 and run scripts/setup")
    if not (NODE_MODULES / "@substrate" / "connect-known-chains").is_dir():
        raise DevChainUnavailableError(
            f"npm packages missing in {DEVCHAIN_DIR}; run scripts/setup (npm ci in chain/devchain)"
        )
    script = f"process.stdout.write(require({json.dumps(UPSTREAM_SPEC_MODULE)}).chainSpec)"
    proc = subprocess.run([node, "-e", script], cwd=DEVCHAIN_DIR, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DevChainUnavailableError(f"could not read the Rococo Asset Hub spec: {proc.stderr.strip()[-500:]}")
    spec: dict[str, Any] = json.loads(proc.stdout)
    return spec


def derive_dev_spec(upstream: dict[str, Any], council: Council) -> dict[str, Any]:
    """The dev spec: upstream genesis plus funded dev and protocol accounts."""
    spec = dict(upstream)
    top = dict(spec["genesis"]["raw"]["top"])
    issuance_key = "0x" + storage_prefix("Balances", "TotalIssuance").hex()
    issuance = int.from_bytes(bytes.fromhex(top.get(issuance_key, "0x" + "00" * 16)[2:]), "little")
    for entry in genesis_accounts(council):
        key = "0x" + system_account_key(entry.account).hex()
        if key in top:
            raise ValueError(f"genesis already holds account {entry.label}; refusing to overwrite it")
        top[key] = "0x" + encode_account_info(entry.free).hex()
        issuance += entry.free
    top[issuance_key] = "0x" + issuance.to_bytes(16, "little").hex()
    spec["genesis"] = {"raw": {"top": top, "childrenDefault": spec["genesis"]["raw"].get("childrenDefault", {})}}
    spec["name"] = "DLLM Dev (Rococo Asset Hub runtime)"
    spec["id"] = "dllm-dev"
    spec["chainType"] = "Development"
    spec["bootNodes"] = []
    spec["properties"] = {**spec.get("properties", {}), "ss58Format": 2}
    return spec


def dev_spec_path(build_dir: Path = BUILD_DIR) -> Path:
    return build_dir / f"dllm-dev-spec.v{GENESIS_BUILDER_VERSION}.json"


def ensure_dev_spec(build_dir: Path = BUILD_DIR, council: Council | None = None) -> Path:
    """Build the dev chain spec once (idempotent) and return its path."""
    council = council or Council.dev()
    path = dev_spec_path(build_dir)
    if path.exists():
        return path
    logger.info("deriving the dev chain spec from the Rococo Asset Hub genesis into %s", path)
    spec = derive_dev_spec(extract_upstream_spec(), council)
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec))
    tmp.replace(path)  # atomic: a concurrent start never reads half a file
    return path

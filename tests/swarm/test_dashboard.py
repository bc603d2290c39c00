"""`dllm dashboard` as a real process, loaded in headless Chromium against a running local swarm."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.cli_server import running_dllm

pytestmark = pytest.mark.timeout(300)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
READY = re.compile(r"DLLM dashboard at (http://\S+)")


@contextmanager
def running_dashboard(initial_peer: str, workdir: Path, *extra: str):
    """`dllm dashboard` on a free port; yields its URL; stops it and checks nothing it started survives."""
    args = ["dashboard", "--initial-peers", initial_peer, "--port", "0", "--refresh", "1", *extra]
    with running_dllm(args, READY, workdir, timeout=60) as match:
        yield match.group(1)


def chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    """Headless Chromium with everything that could reach the network off; virtual time lets the page's
    refresh timers fire several times before the DOM is dumped or the screenshot taken."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/setup installs it)")
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "--virtual-time-budget=6000",
        *mode,
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=90)


def load_dom(url: str, profile: Path) -> str:
    result = chromium(url, profile, "--dump-dom")
    assert result.returncode == 0 and "<body" in result.stdout, result.stderr[-2000:]
    return result.stdout


def screenshot(url: str, profile: Path, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)
    result = chromium(url, profile, f"--screenshot={path}")
    assert result.returncode == 0 and path.is_file() and path.stat().st_size > 10_000, result.stderr[-2000:]
    return path


def test_dashboard_shows_every_peer_and_block_range(swarm, tmp_path):
    peers = {p.info["peer_id"]: (p.info["start"], p.info["end"]) for p in swarm.peers()}
    assert len(peers) >= 2
    with running_dashboard(swarm.initial_peers[0], tmp_path) as url:
        state = httpx.get(f"{url}api/swarm", timeout=30).json()
        (model,) = [m for m in state["models"] if m["name"] == swarm.model]
        assert {p["peer_id"]: (p["start"], p["end"]) for p in model["peers"]} == peers
        assert model["coverage"] == [1] * model["num_blocks"] and model["complete"] is True

        dom = load_dom(url, tmp_path / "chromium")
        for peer_id, (start, end) in peers.items():
            # The coverage picture has a bar per peer, the table a row per peer.
            assert f'<g data-peer-id="{peer_id}" data-blocks="{start}:{end}">' in dom
            assert f'<tr data-peer-id="{peer_id}">' in dom
        for block in range(model["num_blocks"]):
            assert f'<g data-block="{block}" data-count="1">' in dom
        assert "every block served" in dom
        refreshes = int(re.search(r'data-refreshes="(\d+)"', dom).group(1))
        assert refreshes >= 3, "the page did not refresh by itself"
        shot = screenshot(url, tmp_path / "chromium-shot", "dashboard.png")
        print(f"dashboard screenshot: {shot}")


def test_dashboard_reports_a_gap_when_blocks_are_unserved(local_swarm, tmp_path):
    local_swarm.start_peer("0:3")
    with running_dashboard(local_swarm.initial_peers[0], tmp_path) as url:
        dom = load_dom(url, tmp_path / "chromium")
        assert '<g data-block="2" data-count="1">' in dom and '<g data-block="3" data-count="0">' in dom
        assert "5 block(s) unserved: no route" in dom


def test_dashboard_shows_stake_earnings_settlements_and_slashes(local_swarm, dev_chain, tmp_path):
    from substrateinterface import Keypair

    from chain.devchain.dev_accounts import dev_keypair
    from chain.ledger import ComputeLedger
    from chain.merkle import merkle_root
    from chain.records import Payment
    from chain.units import PLANCK_PER_TOKEN

    unit = PLANCK_PER_TOKEN
    ledger = ComputeLedger(dev_chain.url)
    provider_uri = f"//dllm-dashboard-{uuid.uuid4().hex}"
    provider = Keypair.create_from_uri(provider_uri, ss58_format=ledger.ss58_format)
    client = Keypair.create_from_uri(f"//dllm-dashboard-client-{uuid.uuid4().hex}", ss58_format=ledger.ss58_format)
    for account in (provider, client):
        call = ledger.substrate.compose_call(
            "Balances", "transfer_keep_alive", {"dest": account.ss58_address, "value": 100 * unit}
        )
        ledger.submitter.submit(dev_keypair("Ferdie", ledger.ss58_format), call)

    # The provider joins through the CLI, which bonds its stake on chain before serving.
    staked = local_swarm.start_peer("0:8", "--chain-url", dev_chain.url, "--chain-key", provider_uri, "--stake", "5")
    assert "registered" in staked.log_path.read_text()
    receipt = hashlib.blake2b(uuid.uuid4().bytes, digest_size=32).digest()
    ledger.settle(client, [Payment.single(receipt, provider.ss58_address, 3 * unit)])
    council = [dev_keypair(n, ledger.ss58_format) for n in ("Alice", "Bob")]
    evidence = hashlib.blake2b(b"wrong activations", digest_size=32).digest()
    ledger.slash(council, provider.ss58_address, 2 * unit, evidence)
    # Lineage records as a learning peer commits them (chain/lineage.py): a data batch, then v1 and v2 of its span.
    lineage_model = f"dashboard-lineage-{uuid.uuid4().hex[:8]}"
    batch = [hashlib.sha256(uuid.uuid4().bytes).digest() for _ in range(3)]
    ledger.commit_data_batch(provider, lineage_model, (0, 8), batch)
    v1, v2 = (hashlib.sha256(uuid.uuid4().bytes).digest() for _ in range(2))
    canary = [{"total": 3.0, "taught": 2.0}, {"total": 2.9, "taught": 1.5}, {"total": 2.85, "taught": 1.9}]
    ledger.commit_adapter_version(
        provider, lineage_model, (0, 8), 1, 0, v1, None, [merkle_root(batch)], ["peer-a"], canary[0], canary[1]
    )
    ledger.commit_adapter_version(provider, lineage_model, (0, 8), 2, 1, v2, v1, [], ["peer-a"], canary[1], canary[2])
    ledger.close()

    with running_dashboard(local_swarm.initial_peers[0], tmp_path, "--chain-url", dev_chain.url) as url:
        state = httpx.get(f"{url}api/swarm", timeout=60).json()
        (peer,) = state["models"][0]["peers"]
        info = state["chain"]["providers"][peer["chain_account"]]
        assert info["account"] == provider.ss58_address
        assert (info["stake"], info["earned"], info["slashes"], info["slashed_amount"]) == (
            3 * unit,
            3 * unit,
            1,
            2 * unit,
        )
        assert info["refusal"].startswith("slashed 1x")  # why clients with a --min-stake route around it
        assert any(s["receipt"] == receipt.hex() for s in state["chain"]["settlements"])
        assert any(s["evidence"] == evidence.hex() for s in state["chain"]["slashes"])

        dom = load_dom(url, tmp_path / "chromium")
        row = re.search(rf'<tr data-peer-id="{peer["peer_id"]}">(.*?)</tr>', dom).group(1)
        assert ">0:8<" in row and ">3<" in row and "slashed ×1" in row  # stake 3 and earned 3 ROC
        assert receipt.hex()[:6] in dom and evidence.hex()[:6] in dom
        # The lineage graph: v2 -> v1 -> v0, v1 with its data root; the canary plot: "taught" rose at v2 (drift).
        (span,) = [s for s in state["chain"]["lineage"] if s["model"] == lineage_model]
        assert [(v["version"], v["parent"]) for v in span["versions"]] == [(1, 0), (2, 1)]
        assert span["versions"][0]["data_roots"] == [{"root": merkle_root(batch).hex(), "examples": 3}]
        graph = re.search(rf'<svg class="lineage"[^>]*data-model="{lineage_model}"[^>]*>(.*?)</svg>', dom, re.S)
        assert graph is not None, dom[dom.find('id="lineage"') :][:3000]
        graph = graph.group(1)
        assert f'data-version="1" data-parent="0" data-sha256="{v1.hex()}"' in graph
        assert f'data-version="2" data-parent="1" data-sha256="{v2.hex()}"' in graph
        assert 'data-edge="2 1"' in graph and 'data-edge="1 0"' in graph
        plot = re.search(rf'<svg class="canary"[^>]*data-model="{lineage_model}"[^>]*>(.*?)</svg>', dom, re.S).group(1)
        assert 'data-category="taught" data-rises="true"' in plot and "taught ▲ rose" in plot
        screenshot(url, tmp_path / "chromium-shot", "dashboard-chain.png")


def test_settled_compute_reads_the_same_in_python_node_and_the_dashboard(
    local_swarm, dev_chain, tiny_model_path, tmp_path
):
    """Billed queries through two paid peers put tokens x parameters and request counts on chain with
    their settlement; the Python ledger, @polkadot/api and the dashboard's snapshot show the same totals."""
    import json

    from chain.account_derivation import account_id
    from chain.devchain.genesis import DEVCHAIN_DIR
    from chain.ledger import ComputeLedger
    from swarm.billing import BillingConfig
    from swarm.client import ClientConfig, DistributedModel, GenerationParams
    from tests.economy.swarm_economy import UNIT, funded_key, start_billing_peer, wait_until

    if shutil.which("node") is None or not (DEVCHAIN_DIR / "node_modules" / "@polkadot" / "api").is_dir():
        pytest.skip("node or @polkadot/api missing (run scripts/setup)")
    queries = 3
    ledger = ComputeLedger(dev_chain.url)
    try:
        keys = {blocks: funded_key(ledger) for blocks in ("0:4", "4:8")}
        client_uri, _ = funded_key(ledger, 1000 * UNIT)
        procs = [
            start_billing_peer(
                local_swarm, b, uri, dev_chain.url, tmp_path / f"p{b[0]}.sqlite3", rate=10**10, wait=False
            )
            for b, (uri, _) in keys.items()
        ]
        for proc in procs:
            local_swarm.wait_ready(proc, timeout=120)
        providers = {account_id(kp.ss58_address): kp.ss58_address for _, kp in keys.values()}

        billing = BillingConfig(dev_chain.url, client_uri, sample_rate=0.0)
        model = DistributedModel.from_pretrained(
            str(tiny_model_path), local_swarm.initial_peers, config=ClientConfig(billing=billing)
        )
        expected = {a: [0, 0] for a in providers.values()}  # tokens x params, requests, from the co-signed receipts
        try:
            for prompt in ("def add(a, b):", "import os", "class Stack:")[:queries]:
                result = model.generate(prompt, GenerationParams(max_new_tokens=6, ignore_eos=True))
                assert result.billing is not None and result.bill is not None
                for signed in result.billing.receipts:
                    r = signed.receipt
                    totals = expected[providers[account_id(r.provider)]]
                    totals[0] += r.usage.total_tokens * r.params_served
                    totals[1] += 1 if r.sequence == 0 else 0
            model._loop.run(model.core.billing.flush())
        finally:
            model.close()
        assert all(requests == queries and tokens > 0 for tokens, requests in expected.values()), expected

        def on_chain() -> dict[str, list[int]]:
            got = {a: ledger.compute_ledger(a) for a in providers.values()}
            return {a: [t.tokens_x_params, t.requests] for a, t in got.items()}

        wait_until(lambda: on_chain() == expected, 90, "the settled compute on chain")
    finally:
        ledger.close()

    reader = subprocess.run(
        ["node", str(DEVCHAIN_DIR / "read_ledger.mjs"), dev_chain.url],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert reader.returncode == 0, reader.stderr[-2000:]
    seen = json.loads(reader.stdout.strip().splitlines()[-1])["compute"]
    assert {a: [int(seen[a]["tokens_x_params"]), seen[a]["requests"]] for a in providers.values()} == expected

    with running_dashboard(local_swarm.initial_peers[0], tmp_path, "--chain-url", dev_chain.url) as url:
        state = httpx.get(f"{url}api/swarm", timeout=60).json()
        shown = {}
        for peer in state["models"][0]["peers"]:
            info = state["chain"]["providers"][peer["chain_account"]]
            shown[info["account"]] = [info["tokens_x_params"], info["requests"]]
        assert shown == expected
        dom = load_dom(url, tmp_path / "chromium")
        for tokens, _ in expected.values():
            assert f'title="{tokens}"' in dom  # the tokens x params cell of each provider's row

"""The `dllm` command line: help everywhere, one clear line and a non-zero exit for bad arguments,
config files (TOML and YAML, command line wins), and a real `dllm query` against the local swarm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dllm.cli_run import run_cli

pytestmark = pytest.mark.timeout(120)

COMMANDS = [
    [],
    ["chain"],
    ["chain", "dev"],
    ["peer"],
    ["peer", "join"],
    ["swarm"],
    ["swarm", "bootstrap"],
    ["query"],
    ["chat"],
    ["feedback"],
    ["verify"],
    ["api"],
    ["dashboard"],
    ["demo"],
    ["data"],
    ["data", "export"],
    ["lineage"],
]
PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWNa4GGduZp2bgq6AqFgwfCkn2UTTsYj4VKr6uWnxh4MZY"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dllm")
def test_every_command_has_help(capsys, command):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0
    assert "Usage: dllm" in out and "--help" in out


def test_help_lists_every_command(capsys):
    _, out, _ = run_cli(capsys, "--help")
    for name in ("chain", "peer", "swarm", "query", "chat", "feedback", "verify", "api", "dashboard", "demo"):
        assert name in out


def test_help_is_fast_because_heavy_packages_load_lazily():
    code = (
        "import sys\nfrom dllm.cli import main\n"
        "try:\n    main(['peer', 'join', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'hivemind', 'substrateinterface', 'transformers') if m in sys.modules]\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY=" in result.stderr and result.stderr.strip().endswith("HEAVY="), result.stderr


BAD_ARGUMENTS = [
    (["peer", "join", "-p", PEER, "--blocks", "5:2"], "'--blocks'", "END must be greater than START"),
    (["peer", "join", "-p", PEER, "--blocks", "two"], "'--blocks'", "not START:END"),
    (["peer", "join", "-p", PEER, "--blocks", "0:99"], "'--blocks'", "past the model's 8 blocks"),
    (["peer", "join", "-p", PEER, "--model", "/nonexistent/model"], "'--model'", "does not exist"),
    (["peer", "join", "-p", "/ip4/127.0.0.1/tcp/4001"], "'--initial-peers'", "no /p2p/<peer id>"),
    (["peer", "join", "-p", "/ip4/999.0.0.1/tcp/1/p2p/x"], "'--initial-peers'", "not a multiaddr"),
    (["peer", "join", "-p", PEER, "--port", "70000"], "'--port'", "65535"),
    (["peer", "join", "-p", PEER, "--direct-port", "70000"], "'--direct-port'", "65535"),
    (["peer", "join", "-p", PEER, "--stake", "10"], "'--stake'", "needs --chain-url and --chain-key"),
    (
        ["peer", "join", "-p", PEER, "--stake", "-1", "--chain-url", "ws://x:1", "--chain-key", "//A"],
        "'--stake'",
        "non-negative",
    ),
    (["peer", "join", "-p", PEER, "--chain-key", "not a key"], "'--chain-key'", "dev URI like //Alice"),
    (["peer", "join", "-p", PEER, "--chain-url", "localhost:9944"], "'--chain-url'", "ws://127.0.0.1:9944"),
    (["peer", "join"], "'--initial-peers'", "give at least one swarm address"),
    (["query", "hello", "-p", PEER, "--top-p", "0"], "'--top-p'", "outside (0, 1]"),
    (["query", "hello", "-p", PEER, "--max-tokens", "0"], "'--max-tokens'", "greater than or equal to 1"),
    (["query", "-p", PEER], "prompt", "Missing argument"),
    (["api", "-p", PEER, "--port", "-5"], "'--port'", ""),
    (["dashboard", "-p", PEER, "--refresh", "0.1"], "'--refresh'", ""),
    (["chain", "dev", "--port", "0"], "'--port'", ""),
    (["demo", "--peers", "0"], "'--peers'", ""),
    (["verify", "-p", PEER], "'--chain-key'", "a verifier signs its verdicts"),
    (["verify", "-p", PEER, "--chain-key", "//Alice", "--rounds", "2"], "'--rounds'", "add --probe"),
    (["verify", "-p", PEER, "--probe", "--gossip-peer", "/ip4/127.0.0.1/tcp/1"], "'--gossip-peer'", "drop --probe"),
    # No process holds council keys beside its own: a verifier has none, a council member exactly one.
    (["verify", "-p", PEER, "--chain-key", "//Alice", "--council-key", "//Bob"], "--council-key", "No such option"),
    (["council", "-p", PEER, "--chain-key", "//Bob"], "--chain-url and --chain-key", ""),
    (["verify", "-p", PEER, "--recheck", "abcd"], "'--recheck'", "32 bytes of hex"),
    (["verify", "-p", PEER, "--probe", "--tokens", "0"], "'--tokens'", "greater than or equal to 1"),
    (["verify", "-p", PEER, "--chain-key", "//Alice", "--dtype", "int8"], "dtype", "float32, bfloat16, float16"),
    (["verify", "-p", PEER, "--probe", "--dtype", "bfloat16"], "'--dtype'", "run in float32"),
    (["verifier", "-p", PEER], "No such command", ""),  # the verifier daemon is `dllm verify` now
    (["frobnicate"], "No such command", ""),
    (["--log-level", "LOUD", "demo", "--help"], "'--log-level'", "not one of"),
]


@pytest.mark.parametrize(
    ("argv", "names", "says"), BAD_ARGUMENTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_arguments_give_one_clear_line(capsys, monkeypatch, argv, names, says):
    monkeypatch.delenv("DLLM_INITIAL_PEERS", raising=False)
    monkeypatch.delenv("DLLM_CONFIG", raising=False)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dllm") and "error:" in lines[0]
    assert names in lines[0] and says in lines[0]


@pytest.mark.parametrize(
    ("config", "says"),
    [
        (
            '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2}',
            "model_type 'gpt2' (architectures: GPT2LMHeadModel) is not supported by DLLM",
        ),
        ('{"model_type": "llama"}', "num_hidden_layers must be a positive integer"),
        ('{"model_type": "llama", "num_hidden_layers": 4', "config.json cannot be read"),
    ],
    ids=["unsupported architecture", "no layer count", "broken json"],
)
def test_peer_join_checks_the_model_config_before_loading_anything(capsys, tmp_path, config, says):
    (tmp_path / "config.json").write_text(config)
    code, _, err = run_cli(capsys, "peer", "join", "-p", PEER, "--model", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'--model'" in err and says in err


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_values_apply_and_the_command_line_wins(capsys, tmp_path):
    toml = write(tmp_path / "dllm.toml", f'initial_peers = ["{PEER}"]\n[peer.join]\nblocks = "6:3"\n')
    _, _, err = run_cli(capsys, "--config", str(toml), "peer", "join")
    assert "'6:3' is empty" in err  # the file's blocks, and its shared initial_peers satisfied --initial-peers
    _, _, err = run_cli(capsys, "--config", str(toml), "peer", "join", "--blocks", "9:1")
    assert "'9:1' is empty" in err
    yaml_file = write(tmp_path / "dllm.yaml", "query:\n  max-tokens: 0\n")
    _, _, err = run_cli(capsys, "--config", str(yaml_file), "query", "hi", "-p", PEER)
    assert "'--max-tokens'" in err


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("bad.toml", "[peer.join]\nstake = \n", "not valid TOML"),
        ("bad.yaml", "query: [unclosed\n", "not valid YAML"),
        ("list.yaml", "- 1\n- 2\n", "top level must be a table"),
        ("typo.toml", "[peer.join]\nstak = 1\n", "unknown option 'stak' in [peer.join]"),
        ("cmd.toml", "[peers]\nx = 1\n", "unknown command section [peers]"),
        ("sub.toml", "[peer.leave]\nx = 1\n", "unknown command section [peer.leave]"),
        ("shared.toml", "colour = 'red'\n", "unknown option 'colour'"),
        ("conf.ini", "x = 1\n", "unknown format '.ini'"),
    ],
)
def test_bad_config_files_are_named_precisely(capsys, tmp_path, name, text, says):
    path = write(tmp_path / name, text)
    code, _, err = run_cli(capsys, "--config", str(path), "demo", "--peers", "1")
    assert code == 2 and says in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--config", str(tmp_path / "absent.toml"), "demo")
    assert code == 2 and "no such file" in err


def test_query_streams_the_swarm_completion(swarm, distributed_model, tmp_path):
    """A real `dllm query` process against the local swarm, configured through a config file."""
    from swarm.client import GenerationParams

    expected = distributed_model.generate("The module", GenerationParams(max_new_tokens=12)).text
    config = write(tmp_path / "dllm.toml", f'initial_peers = ["{swarm.initial_peers[0]}"]\n[query]\nmax_tokens = 12\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dllm.cli",
            "--config",
            str(config),
            "query",
            "The module",
            "--model",
            str(swarm.model_path),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"

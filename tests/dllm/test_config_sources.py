"""Every `dllm` command-line option takes its default and its range from the configuration field it sets.

The `*Config` dataclasses are the one source: a field declares its default and range once
(chain/config_bounds.py `bounded`), and each option must agree with it. An option that sets no field is listed
in CLI_ONLY with the reason; an option that sets a field through a conversion names that conversion in FIELDS.
A new option with neither entry fails here, as does an entry for an option that no longer exists.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer

from chain.config_bounds import Bounds, bounds_of, field_default
from chain.devchain.launcher import DevChainConfig
from dllm import arguments
from dllm.bootstrap import BootstrapConfig
from dllm.cli import app
from dllm.council import CouncilConfig
from dllm.demo import DemoConfig
from dllm.probe_check import ProbeConfig
from dllm.verifier import VerifierConfig
from peer.config import PeerConfig, parse_blocks, parse_category_limits
from swarm.chat import Conversation
from swarm.client import ClientConfig
from swarm.dashboard import DashboardConfig
from swarm.sampling import GenerationParams

TCP_PORTS = Bounds(min=0, max=65535)


def _same(value: Any) -> Any:
    return value


def _list(value: list[str] | None) -> list[str]:
    return list(value or [])


@dataclass(frozen=True)
class Field:
    """The field an option sets, and how the option's value becomes the field's value."""

    cls: type
    name: str
    convert: Callable[[Any], Any] = _same


FIELDS: dict[tuple[str, str], Field] = {
    ("chain dev", "port"): Field(DevChainConfig, "port"),
    ("chain dev", "state_dir"): Field(DevChainConfig, "state_dir"),
    ("swarm bootstrap", "host"): Field(BootstrapConfig, "host"),
    ("swarm bootstrap", "port"): Field(BootstrapConfig, "port"),
    ("swarm bootstrap", "initial_peers"): Field(BootstrapConfig, "initial_peers", arguments.parse_initial_peers),
    ("swarm bootstrap", "identity"): Field(BootstrapConfig, "identity_path"),
    ("peer join", "initial_peers"): Field(PeerConfig, "initial_peers", arguments.parse_initial_peers),
    ("peer join", "blocks"): Field(PeerConfig, "blocks", parse_blocks),
    ("peer join", "num_blocks"): Field(PeerConfig, "num_blocks"),
    ("peer join", "direct_port"): Field(PeerConfig, "direct_port"),
    ("peer join", "rate"): Field(PeerConfig, "rate"),
    ("peer join", "chain_url"): Field(PeerConfig, "chain_url"),
    ("peer join", "chain_key"): Field(PeerConfig, "chain_key"),
    ("peer join", "receipts"): Field(PeerConfig, "receipts_path"),
    ("peer join", "settle_interval"): Field(PeerConfig, "settle_interval_s"),
    ("peer join", "credit_limit"): Field(PeerConfig, "credit_limit"),
    ("peer join", "quote_period"): Field(PeerConfig, "quote_period_s"),
    ("peer join", "identity"): Field(PeerConfig, "identity_path"),
    ("peer join", "dtype"): Field(PeerConfig, "dtype"),
    ("peer join", "device"): Field(PeerConfig, "device"),
    ("peer join", "cache_mb"): Field(PeerConfig, "cache_bytes", lambda mib: mib * 2**20),
    ("peer join", "session_timeout"): Field(PeerConfig, "session_timeout_s"),
    ("peer join", "adapter_rank"): Field(PeerConfig, "adapter_rank"),
    ("peer join", "averaging_period"): Field(PeerConfig, "averaging_period_s"),
    ("peer join", "train_step_batch"): Field(PeerConfig, "train_step_batch"),
    ("peer join", "learning_rate"): Field(PeerConfig, "learning_rate"),
    ("peer join", "train_passes_per_minute"): Field(PeerConfig, "train_passes_per_minute"),
    ("peer join", "canary_file"): Field(PeerConfig, "canary_file"),
    ("peer join", "canary_max_rise"): Field(PeerConfig, "canary_max_rise"),
    ("peer join", "canary_category_max_rise"): Field(PeerConfig, "canary_category_max_rise"),
    ("peer join", "canary_category_limit"): Field(PeerConfig, "canary_category_limits", parse_category_limits),
    ("peer join", "rehearsal_file"): Field(PeerConfig, "rehearsal_file"),
    ("peer join", "rehearsal_weight"): Field(PeerConfig, "rehearsal_weight"),
    ("peer join", "data_dir"): Field(PeerConfig, "data_dir"),
    ("peer join", "data_budget"): Field(PeerConfig, "data_budget_bytes", lambda mib: mib * 2**20),
    ("peer join", "data_batch_size"): Field(PeerConfig, "data_batch_size"),
    ("query", "max_tokens"): Field(GenerationParams, "max_new_tokens"),
    ("query", "temperature"): Field(GenerationParams, "temperature"),
    ("query", "top_k"): Field(GenerationParams, "top_k"),
    ("query", "top_p"): Field(GenerationParams, "top_p"),
    ("query", "seed"): Field(GenerationParams, "seed"),
    ("query", "stop"): Field(GenerationParams, "stop", _list),
    ("query", "chain_url"): Field(ClientConfig, "chain_url"),
    ("query", "min_stake"): Field(ClientConfig, "min_stake"),
    ("chat", "system"): Field(Conversation, "system"),
    ("chat", "max_tokens"): Field(GenerationParams, "max_new_tokens"),
    ("chat", "temperature"): Field(GenerationParams, "temperature"),
    ("chat", "top_k"): Field(GenerationParams, "top_k"),
    ("chat", "top_p"): Field(GenerationParams, "top_p"),
    ("chat", "seed"): Field(GenerationParams, "seed"),
    ("chat", "chain_url"): Field(ClientConfig, "chain_url"),
    ("chat", "min_stake"): Field(ClientConfig, "min_stake"),
    ("feedback", "chain_url"): Field(ClientConfig, "chain_url"),
    ("feedback", "min_stake"): Field(ClientConfig, "min_stake"),
    ("api", "chain_url"): Field(ClientConfig, "chain_url"),
    ("api", "min_stake"): Field(ClientConfig, "min_stake"),
    ("query", "share_prompts"): Field(ClientConfig, "share_prompts"),
    ("chat", "share_prompts"): Field(ClientConfig, "share_prompts"),
    ("api", "share_prompts"): Field(ClientConfig, "share_prompts"),
    ("verify", "initial_peers"): Field(VerifierConfig, "initial_peers", arguments.parse_initial_peers),
    ("verify", "chain_url"): Field(VerifierConfig, "chain_url"),
    ("verify", "chain_key"): Field(VerifierConfig, "key"),
    ("verify", "gossip_port"): Field(VerifierConfig, "gossip_port"),
    ("verify", "gossip_peer"): Field(VerifierConfig, "gossip_peers", _list),
    ("verify", "dtype"): Field(VerifierConfig, "dtype"),
    ("verify", "rounds"): Field(ProbeConfig, "rounds"),
    ("verify", "tokens"): Field(ProbeConfig, "tokens"),
    ("verify", "seed"): Field(ProbeConfig, "seed"),
    ("council", "initial_peers"): Field(CouncilConfig, "initial_peers", arguments.parse_initial_peers),
    ("council", "chain_url"): Field(CouncilConfig, "chain_url"),
    ("council", "chain_key"): Field(CouncilConfig, "key"),
    ("council", "authorized"): Field(CouncilConfig, "verifiers", _list),
    ("council", "threshold"): Field(CouncilConfig, "threshold"),
    ("council", "gossip_port"): Field(CouncilConfig, "gossip_port"),
    ("council", "gossip_peer"): Field(CouncilConfig, "gossip_peers", _list),
    ("council", "evidence_db"): Field(CouncilConfig, "evidence_path", lambda v: None if v is None else str(v)),
    ("verify", "evidence_db"): Field(VerifierConfig, "evidence_path", lambda v: None if v is None else str(v)),
    ("dashboard", "initial_peers"): Field(DashboardConfig, "initial_peers", arguments.parse_initial_peers),
    ("dashboard", "chain_url"): Field(DashboardConfig, "chain_url"),
    ("dashboard", "host"): Field(DashboardConfig, "host"),
    ("dashboard", "port"): Field(DashboardConfig, "port"),
    ("dashboard", "refresh"): Field(DashboardConfig, "refresh_s"),
    ("lineage", "learning_rate"): Field(PeerConfig, "learning_rate"),
    ("lineage", "train_step_batch"): Field(PeerConfig, "train_step_batch"),
    ("lineage", "rehearsal_weight"): Field(PeerConfig, "rehearsal_weight"),
    ("lineage", "rehearsal_file"): Field(PeerConfig, "rehearsal_file"),
    ("demo", "model"): Field(DemoConfig, "model"),
    ("demo", "peers"): Field(DemoConfig, "peers"),
    ("demo", "queries"): Field(DemoConfig, "queries"),
    ("demo", "max_tokens"): Field(DemoConfig, "max_tokens"),
    ("demo", "chain_port"): Field(DemoConfig, "chain_port"),
    ("demo", "verifier"): Field(DemoConfig, "verifier"),
}

# Options whose default None means "the field's own default applies" (the command passes only given values).
DEFERS_TO_FIELD = {("verify", "rounds"), ("verify", "tokens")}

# Options that set no configuration field, each with the reason.
CLI_ONLY: dict[tuple[str, str], str] = {
    ("", "config"): "names the config file that supplies the other options",
    ("", "log_level"): "process-wide logging, set before any command runs",
    ("chain dev", "no_persist"): "sets DevChainConfig.state_dir to None",
    ("peer join", "model"): "a model folder or hub id resolved by the CLI (None: the embedded model)",
    ("peer join", "host"): "with --port, becomes PeerConfig.host_maddrs (checked in test_peer_listen_address)",
    ("peer join", "port"): "with --host, becomes PeerConfig.host_maddrs (checked in test_peer_listen_address)",
    ("peer join", "direct"): "--no-direct sets PeerConfig.direct_port to None",
    ("peer join", "stake"): "bonded on chain by the CLI before the peer starts; not part of the peer",
    ("peer unbond", "chain_url"): "the chain the one unbond request is sent to (no long-lived configuration)",
    ("peer unbond", "chain_key"): "the provider's key that signs the one unbond request",
    ("peer dispute", "evidence_hash"): "the argument of the one dispute",
    ("peer dispute", "reason"): "the one dispute's text, recorded on chain",
    ("peer dispute", "initial_peers"): "where the one dispute fetches the evidence (required, no default)",
    ("peer dispute", "model"): "a model folder or hub id resolved by the CLI (None: the embedded model)",
    ("peer dispute", "chain_url"): "the chain the one dispute is sent to (no long-lived configuration)",
    ("peer dispute", "chain_key"): "the provider's key that signs the one dispute",
    ("chain release-markers", "chain_url"): "the chain the one release is sent to (no long-lived configuration)",
    ("chain release-markers", "chain_key"): "the paying client's key that signs the one release",
    ("query", "prompt"): "the argument of the one request",
    ("query", "initial_peers"): "passed to DistributedModel.from_pretrained (required, no default)",
    ("query", "model"): "a model folder or hub id resolved by the CLI (None: the embedded model)",
    ("query", "stream"): "how the terminal shows the completion",
    ("query", "chat"): "formats the one prompt as a user message through the model's chat template",
    ("chat", "initial_peers"): "passed to DistributedModel.from_pretrained (required, no default)",
    ("chat", "model"): "a model folder or hub id resolved by the CLI (None: the embedded model)",
    ("feedback", "prompt"): "the argument of the one request",
    ("feedback", "completion"): "the argument of the one request",
    ("feedback", "initial_peers"): "passed to DistributedModel.from_pretrained (required, no default)",
    ("feedback", "model"): "a model folder or hub id resolved by the CLI (None: the embedded model)",
    ("council", "model"): "a model folder or hub id resolved by the CLI (None: the embedded model)",
    ("verify", "model"): "a model folder or hub id resolved by the CLI (None: the embedded model)",
    ("verify", "probe"): "chooses the one-shot probe (ProbeConfig) instead of a serving verifier",
    ("verify", "recheck"): "chooses the one-shot re-check of published evidence instead of a serving verifier",
    ("api", "initial_peers"): "passed to the API service (required, no default)",
    ("api", "model"): "a model folder or hub id resolved by the CLI (None: the embedded model)",
    ("api", "host"): "the API service's listen address (checked in test_api_listen_address)",
    ("api", "port"): "the API service's listen port (checked in test_api_listen_address)",
    ("api", "api_keys"): "a file the API service reads (tests/peer/test_learning_attacks.py)",
    ("data export", "out"): "the folder the one export writes (required)",
    ("data export", "initial_peers"): "where the one export fetches the published data (required, no default)",
    ("data export", "chain_url"): "the chain whose commitments the one export reads (required)",
    ("lineage", "chain_url"): "the chain whose adapter-version records are shown (required)",
    ("lineage", "initial_peers"): "where --verify and --reproduce fetch adapters and data",
    ("lineage", "blocks"): "filters the records shown to one span",
    ("lineage", "verify"): "chooses the one version whose adapters are downloaded and checked",
    ("lineage", "reproduce"): "chooses the one version whose committed data is replayed",
    ("lineage", "peer"): "an extra peer id --verify asks",
    ("lineage", "model"): "chooses one model's records (a name, or a model the CLI resolves; None: every model)",
    ("data export", "model"): "chooses one model's records (a name, or a model the CLI resolves; None: every model)",
}


def _options() -> dict[tuple[str, str], Any]:
    """Every parameter of every command, keyed by (command path, parameter name)."""
    found: dict[tuple[str, str], Any] = {}

    def walk(command: Any, path: str) -> None:
        for param in command.params:
            found[(path, param.name)] = param
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return found


OPTIONS = _options()


def _option_bounds(param: Any) -> Bounds | None:
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    return None if low is None and high is None else Bounds(min=low, max=high)


def test_every_option_is_mapped_or_listed_with_a_reason():
    unlisted = sorted(k for k in OPTIONS if k not in FIELDS and k not in CLI_ONLY)
    assert not unlisted, f"options that set no known field and are not listed as CLI-only: {unlisted}"
    stale = sorted(k for k in (*FIELDS, *CLI_ONLY) if k not in OPTIONS)
    assert not stale, f"entries for options that no longer exist: {stale}"
    assert not set(FIELDS) & set(CLI_ONLY)
    assert all(reason.strip() for reason in CLI_ONLY.values())


@pytest.mark.parametrize("key", sorted(FIELDS), ids=lambda k: f"{k[0]} --{k[1]}")
def test_option_default_is_the_field_default(key):
    option, target = OPTIONS[key], FIELDS[key]
    try:
        expected = field_default(target.cls, target.name)
    except KeyError:  # a required field: the command must get it from the user or fill it itself
        assert option.default is None or option.required, f"{key} has a default for required {target.name}"
        return
    if key in DEFERS_TO_FIELD:
        assert option.default is None, f"{key}: None is how it defers to {target.cls.__name__}.{target.name}"
        return
    assert target.convert(option.default) == expected, (
        f"{' '.join(key)}: option default {option.default!r} vs {target.cls.__name__}.{target.name} = {expected!r}"
    )


# typer cannot declare an open bound; these options check theirs with a callback, exercised below.
OPEN_BOUND_CALLBACKS = {("query", "top_p"), ("chat", "top_p")}


@pytest.mark.parametrize("key", sorted(FIELDS), ids=lambda k: f"{k[0]} --{k[1]}")
def test_option_range_is_the_field_range(key):
    option, target = OPTIONS[key], FIELDS[key]
    expected = bounds_of(target.cls, target.name)
    if key in OPEN_BOUND_CALLBACKS:
        assert expected is not None and expected.min is not None and expected.max is not None
        assert _option_bounds(option) is None and option.callback is not None
        for value, ok in ((expected.min, not expected.min_open), (expected.max, not expected.max_open)):
            if ok:
                option.callback(None, option, value)
            else:
                with pytest.raises(typer.BadParameter):
                    option.callback(None, option, value)
        with pytest.raises(typer.BadParameter):
            option.callback(None, option, expected.max + 1)
        return
    actual = _option_bounds(option)
    if actual is not None and target.convert is not _same:
        actual = Bounds(
            min=None if actual.min is None else target.convert(actual.min),
            max=None if actual.max is None else target.convert(actual.max),
        )
    assert actual == expected, (
        f"{' '.join(key)}: option range {actual} vs {target.cls.__name__}.{target.name} {expected}"
    )


def test_peer_listen_address():
    host, port = OPTIONS[("peer join", "host")], OPTIONS[("peer join", "port")]
    assert [f"/ip4/{host.default}/tcp/{port.default}"] == field_default(PeerConfig, "host_maddrs")
    assert _option_bounds(port) == TCP_PORTS


def test_api_listen_address():
    from swarm.api import ApiService

    parameters = inspect.signature(ApiService).parameters
    assert OPTIONS[("api", "host")].default == parameters["host"].default
    assert OPTIONS[("api", "port")].default == parameters["port"].default
    assert _option_bounds(OPTIONS[("api", "port")]) == TCP_PORTS


def test_config_checks_its_declared_ranges():
    """A field's range is enforced by the dataclass itself, not only by the command line."""
    with pytest.raises(ValueError, match="canary_max_rise"):
        PeerConfig(model="m", canary_max_rise=1.5)
    with pytest.raises(ValueError, match="session_timeout_s"):
        PeerConfig(model="m", session_timeout_s=0.5)
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=0.0)
    with pytest.raises(ValueError, match="refresh_s"):
        DashboardConfig(initial_peers=[], refresh_s=0.1)
    with pytest.raises(ValueError, match="peers"):
        DemoConfig(peers=9)
    with pytest.raises(ValueError, match="min_stake"):
        ClientConfig(min_stake=-1)
    with pytest.raises(ValueError, match="chain"):  # a stake can only be checked on a chain
        ClientConfig(min_stake=1)
    PeerConfig(model=str(Path("m")), canary_max_rise=1.0, session_timeout_s=1.0)

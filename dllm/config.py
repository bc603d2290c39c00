"""The `dllm --config FILE` file: TOML or YAML whose keys map onto command options.

Layout (TOML shown; YAML uses the same nesting)::

    # Top-level keys apply to every command that has an option of that name.
    initial_peers = ["/ip4/127.0.0.1/tcp/31337/p2p/Qm..."]
    chain_url = "ws://127.0.0.1:9944"

    [peer.join]          # one table per command, nested like the command path
    blocks = "0:4"
    stake = 1000

    [query]
    max_tokens = 32

Keys are option names with `-` or `_` (both accepted). Values become the command context's `default_map`, so an
option given on the command line always wins over the file, and the file wins over built-in defaults.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import typer
import yaml

# Options that belong to the root command itself and are handled before the file is applied.
ROOT_KEYS = frozenset({"log_level"})


class ConfigFileError(typer.TyperException):
    """A config file that cannot be read or names options that do not exist."""

    exit_code = 2

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"config file {path}: {problem}")
        self.path = path


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse `path` as TOML (.toml) or YAML (.yaml/.yml) into a mapping with normalised keys."""
    if not path.is_file():
        raise ConfigFileError(path, "no such file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
            data = {} if data is None else data
        else:
            raise ConfigFileError(path, f"unknown format {suffix!r}: use .toml, .yaml or .yml")
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(path, f"not valid TOML: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigFileError(path, f"not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(path, "the top level must be a table/mapping of option names")
    return _normalise_keys(data)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where it is."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def _normalise_keys(data: dict[str, Any]) -> dict[str, Any]:
    normalised: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        normalised[name] = _normalise_keys(value) if isinstance(value, dict) else value
    return normalised


# Commands are typer's (vendored click) objects: read them by shape, not by class, so this module does
# not depend on where typer keeps its click copy.
Command = Any


def _is_group(command: Command) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def _param_names(command: Command) -> set[str]:
    return {param.name for param in command.params if param.name}


def _all_param_names(command: Command) -> set[str]:
    names = _param_names(command)
    if _is_group(command):
        for sub in command.commands.values():
            names |= _all_param_names(sub)
    return names


def build_default_map(root: Command, data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Turn the parsed file into a click `default_map` for the command tree under `root`.

    Raises ConfigFileError naming the offending key when a key matches no command and no option.
    """
    shared = {k: v for k, v in data.items() if k not in root.commands and k not in ROOT_KEYS}
    known = _all_param_names(root)
    for key in shared:
        if isinstance(shared[key], dict):
            raise ConfigFileError(
                path, f"unknown command section [{key}]; commands: {', '.join(sorted(root.commands))}"
            )
        if key not in known:
            raise ConfigFileError(path, f"unknown option {key!r}: no command has an option of that name")
    sections = {k: v for k, v in data.items() if k in root.commands}
    return _default_map_for_group(root, sections, shared, path, prefix="")


def _default_map_for_group(
    group: Command, sections: dict[str, Any], shared: dict[str, Any], path: Path, prefix: str
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, command in group.commands.items():
        section = sections.get(name, {})
        where = f"{prefix}{name}"
        if not isinstance(section, dict):
            raise ConfigFileError(path, f"[{where}] must be a table of options, got {section!r}")
        if _is_group(command):
            unknown = set(section) - set(command.commands)
            if unknown:
                raise ConfigFileError(
                    path,
                    f"unknown command section [{where}.{sorted(unknown)[0]}]; "
                    f"subcommands of {where}: {', '.join(sorted(command.commands))}",
                )
            result[name] = _default_map_for_group(command, section, shared, path, prefix=f"{where}.")
            continue
        params = _param_names(command)
        unknown = set(section) - params
        if unknown:
            raise ConfigFileError(
                path,
                f"unknown option {sorted(unknown)[0]!r} in [{where}]; options: {', '.join(sorted(params))}",
            )
        values = {k: v for k, v in shared.items() if k in params}
        values.update(section)
        result[name] = values
    return result

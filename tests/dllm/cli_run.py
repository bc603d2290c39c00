"""`dllm` run in the test's own process, as a user types it: exit code and what it printed."""

from __future__ import annotations

import pytest

from dllm.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `dllm ARGV`."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err

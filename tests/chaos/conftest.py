"""Chaos-suite fixtures: the per-scenario report collector, printed (and saved) as one table at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import ScenarioReport, report_table


@pytest.fixture(scope="session")
def chaos_reports():
    """Scenarios append their ScenarioReport; the table goes to the log and build/test-artifacts/chaos-report.md."""
    reports: list[ScenarioReport] = []
    yield reports
    if reports:
        table = report_table(reports)
        out = Path(__file__).resolve().parents[2] / "build" / "test-artifacts" / "chaos-report.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        print("\n" + table)

"""Chaos-suite fixtures: the per-scenario report collector, printed (and saved) as one table at the end."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from tests.chaos.harness import ScenarioReport, report_table

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"


@pytest.fixture(scope="session")
def chaos_reports():
    """Scenarios append their ScenarioReport; the table goes to the log and build/test-artifacts/chaos-report.md.

    With parallel workers (scripts/test) each worker holds some of the chaos modules: every worker adds
    its rows under a lock and rewrites the table from all rows of this run, so it ends up complete."""
    reports: list[ScenarioReport] = []
    yield reports
    if not reports:
        return
    print("\n" + report_table(reports))
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "single")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    rows_dir = ARTIFACTS / "chaos-rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    with open(rows_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in rows_dir.glob("*.rows"):
            if not stale.name.startswith(f"{run}-"):
                stale.unlink()
        (rows_dir / f"{run}-{worker}.rows").write_text("\n".join(r.row() for r in reports) + "\n")
        rows = [line for f in sorted(rows_dir.glob(f"{run}-*.rows")) for line in f.read_text().splitlines() if line]
        header = report_table([]).splitlines()
        (ARTIFACTS / "chaos-report.md").write_text("\n".join(header + rows) + "\n")

"""The ``csos`` command as a package: one module per command group, all reachable as before.

Child processes (worker, sink) are started as ``python -m streams.cli``, so that form must keep working.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from streams.cli import audit, bench, data, evaluate, main, pipeline, pki, reports, review

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {"acls", "archive", "audit", "bench", "bench-dashboards", "bench-monitor", "bench-sink", "bench-verify", "broker", "chaos",
            "crl", "demo", "evaluate", "hostile", "peers", "pki", "registrants", "replay-arcos", "reports", "review",
            "simulate", "sink", "sql", "summary", "topics", "verify-offline", "warehouse", "worker"}


def test_every_command_group_module_registers_its_commands_once() -> None:
    modules = (pipeline, pki, data, reports, audit, review, evaluate, bench)
    names = [c.name for m in modules for c in m.COMMANDS]
    assert len(names) == len(set(names)) and set(names) == set(main.commands) == COMMANDS


def test_python_dash_m_runs_the_command() -> None:
    run = subprocess.run([sys.executable, "-m", "streams.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert all(f"  {name} " in run.stdout or f"  {name}\n" in run.stdout for name in COMMANDS)
    usage = subprocess.run([sys.executable, "-m", "streams.cli", "pki", "issue"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 2 and "Missing option '--dea'" in usage.stderr  # click's usage errors exit 2

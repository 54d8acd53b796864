"""deploy/prometheus as Prometheus itself reads it: ``promtool`` (Debian's prometheus package, ``make prometheus``)
checks the alert rules and the scrape configuration, so a rule that does not parse or a config Prometheus would
refuse to start with fails CI, not an operator's first deploy.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (`make prometheus` installs "
                                                          "Debian's prometheus package, which ships it)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR)


def test_alert_rules_parse_with_every_expression_valid():
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout, done.stdout


def test_prometheus_config_is_valid_and_loads_the_alert_rules():
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout, done.stdout  # rule_files resolves to alerts.yml beside it


def test_a_broken_rule_is_refused(tmp_path):
    """The check is not vacuous: promtool rejects a rule whose expression does not parse."""
    bad = tmp_path / "bad.yml"
    bad.write_text((PROMETHEUS_DIR / "alerts.yml").read_text().replace(
        "min by (issuer) (csos_crl_seconds_until_next_update) < 6 * 3600",
        "min by (issuer) (csos_crl_seconds_until_next_update < 6 * 3600", 1))
    done = promtool("check", "rules", str(bad))
    assert done.returncode != 0, done.stdout

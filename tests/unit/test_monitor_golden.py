"""The monitor's verdicts and findings, frozen: a speed-up must not change a single decision (issue 14, item 3).

The monitor is optimised for CPU (lazy explanations, cached month aggregates,
fewer allocations). Those changes must be invisible: the same stream gives
the same verdicts, the same findings with the same numbers and words, and the
same learned state. This test scores a fixed labelled scenario (ramps,
spikes, bursts, strength shifts, new registrants) with peer profiles and
customer limits, plus the contract test's probes (bursts, new families, a
Sunday 03:00 order), as the agent does (learn what is released, a hold opens
its case), and compares everything with ``tests/data/monitor-golden.json.gz``,
which was written by the code BEFORE the optimisation.

A deliberate change of detector logic (a new ``DETECTORS_VERSION``) regenerates
the file: ``.venv/bin/python -m tests.unit.test_monitor_golden``; the
diff of verdicts it reports is the change to review.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from streams.monitoring import Monitor, MonitorConfig
from streams.tools.evaluation import train_peers
from streams.tools.scenarios import generate
from tests.unit.test_detector_contract import probes, score_all

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "monitor-golden.json.gz"
#: Every field of a finding (``som.Reason``): all of them must be identical.
REASON_FIELDS = ("detector", "dimension", "drug_family", "value", "baseline", "threshold", "window", "fired",
                 "enforced", "explanation")


def _stream() -> list[dict[str, Any]]:
    orders = list(generate(seed=3, n_registrants=16, days=330).orders)
    ids = (uuid.UUID(int=k) for k in itertools.count(1))
    with mock.patch("uuid.uuid4", lambda: next(ids)):  # the probes' order ids, the same on every run
        return orders + probes(orders)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def observe(limits_path: Path) -> dict[str, Any]:
    """Verdicts, findings and final states of the golden stream, as plain JSON."""
    orders = _stream()
    rows = {(ln["drug_family"], o["purchaser_dea"]) for o in orders[-200:] for ln in o["lines"]}
    limits_path.write_text("dea_number,drug_family,monthly_units\n" + "".join(
        f"{dea},{fam},100\n" for fam, dea in sorted(rows)[:6]))
    monitor = Monitor(MonitorConfig(customer_limits=str(limits_path)),
                      peers=train_peers(11, n_registrants=24, days=240))
    live: dict[str, Any] = {}
    verdicts = score_all(monitor, orders, live)
    return {
        "input": _digest([(o["order_id"], o["received_at"], o["lines"]) for o in orders]),
        "verdicts": [{"order_id": v["order_id"], "verdict": v["verdict"],
                      "total_dosage_units": v["total_dosage_units"],
                      "reasons": [[r[k] for k in REASON_FIELDS] for r in v["reasons"]]} for v in verdicts],
        "states": {dea: _digest(base.to_state()) for dea, base in sorted(live.items())},
    }


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # Through JSON, as the golden file was written (floats round-trip exactly).
    return json.loads(json.dumps(observe(tmp_path_factory.mktemp("limits") / "limits.csv")))


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    with gzip.open(GOLDEN, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def test_the_golden_stream_is_the_one_the_file_was_written_from(observed: dict[str, Any],
                                                                 golden: dict[str, Any]) -> None:
    # Otherwise the scenario generator changed, not the monitor: regenerate from the unoptimised monitor.
    assert observed["input"] == golden["input"]


def test_every_verdict_and_finding_is_identical(observed: dict[str, Any], golden: dict[str, Any]) -> None:
    assert len(observed["verdicts"]) == len(golden["verdicts"])
    for got, want in zip(observed["verdicts"], golden["verdicts"]):
        assert got["order_id"] == want["order_id"]
        assert got["verdict"] == want["verdict"], got["order_id"]
        assert got["total_dosage_units"] == want["total_dosage_units"], got["order_id"]
        for r_got, r_want in zip(got["reasons"], want["reasons"]):
            assert dict(zip(REASON_FIELDS, r_got)) == dict(zip(REASON_FIELDS, r_want)), got["order_id"]
        assert len(got["reasons"]) == len(want["reasons"]), got["order_id"]
    holds = sum(v["verdict"] == "HOLD" for v in golden["verdicts"])
    assert 0 < holds < len(golden["verdicts"])  # the stream exercises both outcomes


def test_the_learned_state_is_identical(observed: dict[str, Any], golden: dict[str, Any]) -> None:
    assert observed["states"] == golden["states"]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = observe(Path(tmp) / "limits.csv")
    with gzip.open(GOLDEN, "wt", encoding="utf-8") as fh:
        json.dump(data, fh, separators=(",", ":"), default=str)
    print(f"{GOLDEN}: {len(data['verdicts'])} verdicts, {sum(len(v['reasons']) for v in data['verdicts'])} findings")

"""Combined anomaly score over the learned findings (streams/monitoring/anomaly.py)."""
from __future__ import annotations

import math
import re
from datetime import timedelta

import pytest

from streams.monitoring import Monitor, MonitorConfig
from streams.monitoring.anomaly import AnomalyCombiner, fraction
from streams.monitoring.detectors import reason

from test_monitoring import held, order, oxy_history

MAX = 1.7976931348623157e308


def r(detector: str, value: float, baseline: float, threshold: float, family: str = "OXYCODONE") -> dict:
    return reason(detector, "size", family, value, baseline, threshold, "w", value > threshold, "")


def test_fraction_is_the_log_distance_towards_the_threshold() -> None:
    assert fraction(r("volume_30d", 1000, 1000, 3000), 0.01) == 0.0
    assert fraction(r("volume_30d", 3000, 1000, 3000), 0.01) == pytest.approx(1.0)
    assert fraction(r("volume_30d", math.sqrt(3) * 1000, 1000, 3000), 0.01) == pytest.approx(0.5)
    assert fraction(r("volume_30d", 500, 1000, 3000), 0.01) == 0.0  # below the baseline
    assert fraction(r("volume_30d", 90_000, 1000, 3000), 0.01) == 1.0  # capped: that detector fires alone
    assert fraction(r("size", 9000, 0.0, 8000), 0.01) is None  # cold start: no baseline
    assert fraction(r("trend", 9000, 0.0, MAX), 0.01) is None  # not applicable
    # timing: an order time shared by 1 % of orders is at the threshold, by 10 % half way
    assert fraction(r("timing", 0.99, 0.01, 0.99), 0.01) == pytest.approx(1.0)
    assert fraction(r("timing", 0.9, 0.1, 0.99), 0.01) == pytest.approx(0.5)


def test_several_near_misses_fire_together_but_one_does_not() -> None:
    comb = AnomalyCombiner(MonitorConfig(anomaly_threshold=1.5))
    near = 0.9  # 90 % of the way to each threshold, on a log scale: none fires alone
    at = lambda b, t: b * (t / b) ** near  # noqa: E731
    three = [r("volume_30d", at(1000, 3000), 1000, 3000), r("frequency_24h", at(1.2, 3.6), 1.2, 3.6),
             r("trend", at(800, 4000), 800, 4000), r("size", 500, 600, 1800)]
    assert not any(x["fired"] for x in three)
    (f,) = comb.score(three)
    assert f["detector"] == "anomaly" and f["drug_family"] == "OXYCODONE"
    assert f["value"] == pytest.approx(math.sqrt(3 * near ** 2)) and f["threshold"] == 1.5 and f["fired"]
    assert "1.56" in f["explanation"] and "90% of the way" in f["explanation"]
    (g,) = comb.score(three[:1] + three[3:])  # one near miss and an ordinary size
    assert not g["fired"] and g["value"] == pytest.approx(near)
    # families are scored separately; a measure without baseline does not count
    other = [r("volume_30d", at(100, 300), 100, 300, "ALPRAZOLAM"), r("size", 9000, 0.0, 8000, "ALPRAZOLAM")]
    by_family = {x["drug_family"]: x for x in comb.score(three + other)}
    assert by_family["OXYCODONE"]["fired"] and not by_family["ALPRAZOLAM"]["fired"]
    assert by_family["ALPRAZOLAM"]["window"].startswith("not applicable")


def test_anomaly_finding_is_recorded_on_every_verdict_and_decides_only_when_enforced() -> None:
    # 1.15: frequency is judged on the buyer's Poisson cadence, so two night orders move it less than before
    # ramp left out: three night orders at 2.6x also double this buyer's month (a focused ramp at 2x)
    deciding = tuple(d for d in MonitorConfig().hold_detectors if d != "ramp")
    monitor = Monitor(MonitorConfig(anomaly_threshold=1.15, hold_detectors=deciding))
    state, last = oxy_history(monitor, days=120)
    # three orders in a night at 2.6x the usual size: volume, frequency, size and timing all rise
    at = (last + timedelta(days=3)).replace(hour=3)
    for k in range(2):
        o = order("BP1234563", at + timedelta(hours=k), {"OXYCODONE": 1300})
        v = monitor.score(state, o)
        assert v["verdict"] == "RELEASE", held(v)
        state = monitor.learn(state, o)
    o = order("BP1234563", at + timedelta(hours=2), {"OXYCODONE": 1300})
    v = monitor.score(state, o)
    a = next(x for x in v["reasons"] if x["detector"] == "anomaly")
    assert a["fired"] == (a["value"] > a["threshold"]) and not a["enforced"]
    assert a["fired"], a
    assert not next(x for x in Monitor().score(state, o)["reasons"] if x["detector"] == "anomaly")["fired"]  # 1.5
    assert not [x for x in v["reasons"] if x["fired"] and x["enforced"]], held(v)  # no single detector fired
    nums = re.findall(r"score for OXYCODONE: ([\d.]+)", a["explanation"])
    assert nums and float(nums[0]) == pytest.approx(a["value"], abs=0.005)
    enforced = Monitor(MonitorConfig(anomaly_threshold=1.15, hold_detectors=("size", "anomaly")))
    assert enforced.score(state, o)["verdict"] == "HOLD"

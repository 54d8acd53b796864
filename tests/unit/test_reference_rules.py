"""Static reference rules ("Rafalski" flags, per-customer limits), hold_detectors, and schema evolution."""
from __future__ import annotations

import copy
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from connectors.clickhouse.rows import rows_for
from streams.core.avro_codec import AvroCodec
from streams.monitoring import Monitor, MonitorConfig
from streams.monitoring import baselines as bl
from streams.monitoring.detectors import LEARNED_DETECTORS

from test_monitoring import avro_roundtrip, order

MAX = 1.7976931348623157e308
DEA = "BR1234563"
# The month under test is March 2026; history months are counted back from it.
NOW = datetime(2026, 3, 20, 15, 0, tzinfo=timezone.utc)


def month_start(back: int) -> datetime:
    """The 10th of the month ``back`` months before March 2026, 15:00 UTC."""
    idx = 2026 * 12 + 2 - back
    return datetime(idx // 12, idx % 12 + 1, 10, 15, 0, tzinfo=timezone.utc)


def history(monitor: Monitor, monthly: dict[int, int], family: str = "OXYCODONE", dea: str = DEA,
            state: dict | None = None, per_month: int = 1) -> dict:
    """Learn ``monthly[back]`` units of ``family`` in the month ``back`` months ago, split in ``per_month`` orders.

    Learned directly (as if released), so the history is exactly what the test says.
    """
    state = state or monitor.new_state(dea)
    for back in sorted(monthly, reverse=True):
        units = monthly[back]
        for k in range(per_month):
            part = units // per_month + (units % per_month if k == 0 else 0)
            if part:
                state = monitor.learn(state, order(dea, month_start(back) + timedelta(days=2 * k), {family: part}))
    return state


def finding(v: dict[str, Any], detector: str, family: str = "OXYCODONE") -> dict[str, Any]:
    return next(r for r in v["reasons"] if r["detector"] == detector and r["drug_family"] == family)


def score(monitor: Monitor, state: dict, units: int, family: str = "OXYCODONE", at: datetime = NOW) -> dict:
    return monitor.score(state, order(DEA, at, {family: units}), decided_at=at)


def consistent(r: dict[str, Any]) -> None:
    assert r["fired"] == (r["value"] > r["threshold"])


# --------------------------------------------------------------------------
# each rule fires exactly when its definition says
# --------------------------------------------------------------------------

def without_ramp_2x() -> Monitor:
    """The default learned policy less ``ramp_2x``, which applies the 2x test itself and decides (issue 11)."""
    return Monitor(MonitorConfig(hold_detectors=tuple(d for d in LEARNED_DETECTORS if d != "ramp_2x")))


def test_2x_and_3x_trailing_12_month_average() -> None:
    monitor = without_ramp_2x()
    state = history(monitor, {4: 1000, 3: 1000, 2: 1000, 1: 1000})
    for units, fires_2x, fires_3x in [(2000, False, False), (2001, True, False), (3000, True, False),
                                      (3001, True, True)]:
        v = score(monitor, state, units)
        r2, r3 = finding(v, "static_2x_12m"), finding(v, "static_3x_12m")
        assert (r2["fired"], r3["fired"]) == (fires_2x, fires_3x), units
        assert r2["baseline"] == r3["baseline"] == 1000 and r2["threshold"] == 2000 and r3["threshold"] == 3000
        assert r2["value"] == units
        consistent(r2), consistent(r3)
        assert not r2["enforced"] and not r3["enforced"]
        assert v["verdict"] == "RELEASE"  # not deciding by default
    r = finding(score(monitor, state, 2001), "static_2x_12m")
    assert r["explanation"] == ("OXYCODONE this month (2026-03, this order included): 2,001 dosage units; "
                                "trailing 12-month monthly average 1,000 (4 months); rule: over 2x = 2,000; exceeded.")
    assert "2025-11..2026-02" in r["window"]
    # units already learned this calendar month count: 1,500 released + 600 now > 2,000
    state2 = history(monitor, {0: 1500}, state=state)
    assert finding(score(monitor, state2, 600), "static_2x_12m")["value"] == 2100
    assert finding(score(monitor, state2, 600), "static_2x_12m")["fired"]
    assert not finding(score(monitor, state2, 500), "static_2x_12m")["fired"]
    # a month without orders inside the covered span counts as 0: (1000 + 0 + 1000 + 1000) / 4 = 750
    gap = history(monitor, {4: 1000, 2: 1000, 1: 1000})
    r = finding(score(monitor, gap, 1501), "static_2x_12m")
    assert r["baseline"] == 750 and r["threshold"] == 1500 and r["fired"]
    # the current month is not part of the trailing window; only the last 12 full months are
    long = history(monitor, {14: 50_000, **{b: 1000 for b in range(1, 13)}})
    r = finding(score(monitor, long, 2001), "static_2x_12m")
    assert r["baseline"] == 1000 and r["fired"] and "(12 months)" in r["explanation"]


def test_average_and_max_rules_need_three_months_with_orders() -> None:
    monitor = Monitor()
    two = history(monitor, {2: 1000, 1: 1000})
    for det in ("static_2x_12m", "static_3x_12m", "static_6m_max"):
        r = finding(score(monitor, two, 7000), det)
        assert not r["fired"] and r["threshold"] == MAX and r["window"].startswith("not applicable")
        assert "2 of the trailing" in r["window"] and "(< 3)" in r["window"]
    three = history(monitor, {3: 1000, 2: 1000, 1: 1000})
    for det in ("static_2x_12m", "static_3x_12m", "static_6m_max"):
        assert finding(score(monitor, three, 7000), det)["fired"]
    # configurable
    strict = Monitor(MonitorConfig(static_min_months=4))
    assert finding(score(strict, history(strict, {3: 1000, 2: 1000, 1: 1000}), 7000), "static_2x_12m")[
        "threshold"] == MAX
    # a new registrant: nothing applies except the fixed ceiling
    v = score(monitor, monitor.new_state(DEA), 7000)
    assert all(finding(v, d)["threshold"] == MAX for d in ("static_2x_12m", "static_3x_12m", "static_6m_max",
                                                          "static_customer_limit"))


def test_trailing_6_month_maximum() -> None:
    monitor = Monitor()
    state = history(monitor, {3: 1000, 2: 3000, 1: 1500})
    r = finding(score(monitor, state, 3000), "static_6m_max")
    assert r["baseline"] == r["threshold"] == 3000 and not r["fired"]
    r = finding(score(monitor, state, 3001), "static_6m_max")
    assert r["fired"] and "trailing 6-month monthly maximum 3,000 (3 months)" in r["explanation"]
    # a big month 8 months ago is outside the 6-month window (but 3 months with orders are needed inside it)
    state = history(monitor, {8: 9000, 3: 1000, 2: 1000, 1: 1000})
    r = finding(score(monitor, state, 1001), "static_6m_max")
    assert r["baseline"] == 1000 and r["fired"]
    state = history(monitor, {8: 9000, 7: 9000, 2: 1000, 1: 1000})
    r = finding(score(monitor, state, 20_000), "static_6m_max")
    assert r["threshold"] == MAX and not r["fired"]


def test_8000_dosage_units_a_month() -> None:
    monitor = Monitor()
    fresh = monitor.new_state(DEA)
    assert not finding(score(monitor, fresh, 8000), "static_8000_du")["fired"]
    r = finding(score(monitor, fresh, 8001), "static_8000_du")
    assert r["fired"] and r["threshold"] == 8000 and r["value"] == 8001
    state = history(monitor, {0: 5000}, per_month=2)
    r = finding(score(monitor, state, 3001), "static_8000_du")
    assert r["fired"] and r["value"] == 8001
    assert not finding(score(monitor, state, 3000), "static_8000_du")["fired"]
    # per family: 5,000 of another family does not add up
    other = history(monitor, {0: 5000}, family="HYDROCODONE")
    assert not finding(score(monitor, other, 3001), "static_8000_du")["fired"]
    # last month's units do not count in this month
    last = history(monitor, {1: 7900})
    assert finding(score(monitor, last, 200), "static_8000_du")["value"] == 200


def test_customer_limit_from_csv(tmp_path, monkeypatch) -> None:
    path = tmp_path / "limits.csv"
    path.write_text("dea_number,drug_family,monthly_units\nbr1234563,oxycodone,2000\nBR1234563,HYDROCODONE,500\n")
    monitor = Monitor(MonitorConfig(customer_limits=str(path)))
    state = history(monitor, {0: 1500})
    r = finding(score(monitor, state, 500), "static_customer_limit")
    assert r["value"] == 2000 and r["threshold"] == 2000 and not r["fired"]
    r = finding(score(monitor, state, 501), "static_customer_limit")
    assert r["fired"] and r["baseline"] == 2000 and "monthly limit for OXYCODONE is 2,000; exceeded" in r["explanation"]
    # a family or customer the file does not list: not applicable
    r = finding(score(monitor, state, 100_000, family="ALPRAZOLAM"), "static_customer_limit", "ALPRAZOLAM")
    assert not r["fired"] and r["threshold"] == MAX
    other = monitor.score(None, order("BX0000001", NOW, {"OXYCODONE": 100_000}))
    assert finding(other, "static_customer_limit")["threshold"] == MAX
    # no file: never fires
    for cfg in (MonitorConfig(), MonitorConfig(customer_limits=str(tmp_path / "absent.csv"))):
        r = finding(score(Monitor(cfg), state, 100_000), "static_customer_limit")
        assert not r["fired"] and r["threshold"] == MAX and "not applicable" in r["window"]
    # from the environment; the limits in force are part of the model version
    monkeypatch.setenv("SOM_CUSTOMER_LIMITS", str(path))
    from_env = Monitor.from_env()
    assert from_env.config.customer_limits == str(path) and from_env.model_version == monitor.model_version
    assert ".limits-" in monitor.model_version and ".limits-" not in Monitor().model_version
    path.write_text("dea_number,drug_family,monthly_units\nBR1234563,OXYCODONE,2500\n")
    assert Monitor(MonitorConfig(customer_limits=str(path))).model_version != monitor.model_version
    path.write_text("dea_number,drug_family,units\nBR1234563,OXYCODONE,2500\n")
    with pytest.raises(ValueError, match="monthly_units"):
        Monitor(MonitorConfig(customer_limits=str(path)))


# --------------------------------------------------------------------------
# hold_detectors: what decides
# --------------------------------------------------------------------------

def established(monitor: Monitor) -> dict:
    """Ten released orders of ~500 OXYCODONE over five months, and 2,000 units already this month."""
    return history(monitor, {5: 1000, 4: 1000, 3: 1000, 2: 1000, 1: 1000, 0: 2000}, per_month=2)


def test_static_rule_enforced_holds_and_not_enforced_is_recorded_but_releases() -> None:
    default = without_ramp_2x()
    state = established(default)
    o = order(DEA, NOW, {"OXYCODONE": 500})
    v = default.score(state, o, decided_at=NOW)
    assert v["verdict"] == "RELEASE"
    r = finding(v, "static_2x_12m")
    assert r["fired"] and not r["enforced"] and r["value"] == 2500
    assert all(not (x["fired"] and x["enforced"]) for x in v["reasons"])
    assert Monitor.summary(v).startswith("Released: no deciding detector fired. Recorded, not deciding: OXYCODONE")
    rows = rows_for("som.Verdict", v)
    assert rows["verdicts"][0][9] == []  # fired_detectors: only the deciding ones
    enforced_col = {row[4]: row[-1] for row in rows["verdict_reasons"]}
    assert enforced_col["static_2x_12m"] is False and enforced_col["size"] is True

    enforcing = Monitor(MonitorConfig.from_env({"SOM_HOLD_DETECTORS": "size, static_2x_12m"}))
    assert enforcing.config.hold_detectors == ("size", "static_2x_12m")
    v = enforcing.score(state, o, decided_at=NOW)
    assert v["verdict"] == "HOLD"
    assert finding(v, "static_2x_12m")["enforced"] and not finding(v, "volume_30d")["enforced"]
    assert Monitor.summary(v).startswith("Held for due diligence: OXYCODONE this month")
    assert rows_for("som.Verdict", v)["verdicts"][0][9] == ["static_2x_12m"]
    assert enforcing.model_version != default.model_version

    # a learned detector that fires but does not decide is recorded and released
    static_only = Monitor(MonitorConfig(hold_detectors=("static_3x_12m",)))
    v = static_only.score(None, order(DEA, NOW, {"OXYCODONE": 9000}), decided_at=NOW)
    assert v["verdict"] == "RELEASE"
    assert finding(v, "size")["fired"] and not finding(v, "size")["enforced"]
    assert finding(v, "static_8000_du")["fired"]
    # shadow mode: nothing decides
    assert Monitor(MonitorConfig(hold_detectors=())).score(None, order(DEA, NOW, {"OXYCODONE": 9000}))[
        "verdict"] == "RELEASE"


def test_hold_detectors_config() -> None:
    assert MonitorConfig().hold_detectors == tuple(sorted(LEARNED_DETECTORS))
    assert MonitorConfig.from_env({}) == MonitorConfig()
    a = MonitorConfig(hold_detectors=("size", "static_6m_max"))
    b = MonitorConfig.from_env({"SOM_HOLD_DETECTORS": "STATIC_6M_MAX,size,size"})
    assert a == b and Monitor(a).model_version == Monitor(b).model_version
    assert Monitor(a).model_version != Monitor().model_version
    with pytest.raises(ValueError, match="static_2x"):
        Monitor(MonitorConfig(hold_detectors=("static_2x",)))


def test_evidence_keeps_every_fired_finding_enforced_or_not() -> None:
    monitor = Monitor()
    state = history(monitor, {3: 1000, 2: 1000, 1: 1000})
    state = history(monitor, {3: 1000, 2: 1000, 1: 1000}, family="HYDROCODONE", state=state)
    v = monitor.score(state, order(DEA, NOW, {"OXYCODONE": 2500, "HYDROCODONE": 2600}), decided_at=NOW)
    fired = [(r["detector"], r["drug_family"]) for r in v["reasons"] if r["fired"]]
    for det in ("static_2x_12m", "static_6m_max"):
        assert (det, "OXYCODONE") in fired and (det, "HYDROCODONE") in fired
    assert all(r["explanation"] for r in v["reasons"] if r["fired"])
    # closest call of each detector that did not fire, once
    quiet = [r["detector"] for r in v["reasons"] if not r["fired"]]
    assert len(quiet) == len(set(quiet)) and "static_3x_12m" in quiet


# --------------------------------------------------------------------------
# state: bounded, small, and old records still read
# --------------------------------------------------------------------------

def five_family_state(monitor: Monitor, months: int = 14) -> dict:
    state = monitor.new_state(DEA)
    fams = ("OXYCODONE", "HYDROCODONE", "ALPRAZOLAM", "TRAMADOL", "METHYLPHENIDATE")
    for back in range(months, -1, -1):
        for k in range(4):
            for i, fam in enumerate(fams):
                at = month_start(back) + timedelta(days=5 * k, hours=i)
                state = monitor.learn(state, order(DEA, at, {fam: 400 + 10 * i}))
    return state


def test_monthly_state_is_bounded_and_small() -> None:
    monitor = Monitor()
    state = five_family_state(monitor)
    for fam in state["families"].values():
        assert len(fam["months"]["month"]) == len(fam["months"]["units"]) == bl.MONTHS_KEPT
        assert fam["months"]["month"][-1] == 2026 * 12 + 2
    decoded, size = avro_roundtrip(state)
    assert decoded == state
    without = copy.deepcopy(state)
    for fam in without["families"].values():
        fam["months"] = {"month": [], "units": []}
    _, size_empty = avro_roundtrip(without)
    print(f"\nAvro-encoded state, 5 families, 13 monthly cells each: {size} bytes "
          f"({size_empty} without monthly history, +{size - size_empty})")
    # a cell: month and units (varints), the month's mg of base drug (a double) and its high-strength units
    assert size - size_empty < 5 * 13 * 16


def _old_state(state: dict, version: int = 1) -> dict:
    """``state`` as the layout of ``version`` had it (v1: no months; v1 and v2: no timing)."""
    old = copy.deepcopy(state)
    old["version"] = version
    del old["timing"]
    if version == 1:
        for fam in old["families"].values():
            del fam["months"]
    return old


def test_old_state_records_decode_and_migrate() -> None:
    codec = AvroCodec()
    old_schema = next(s for s in codec.catalog.by_fingerprint.values()
                      if s.source.name == "som.state.RegistrantState.v1.avsc")
    assert old_schema.fingerprint != codec.catalog.get("som.state.RegistrantState").fingerprint
    monitor = Monitor()
    old = _old_state(history(monitor, {3: 1000, 2: 1000, 1: 1000}))
    name, rec = codec.decode(codec.encode_with(old_schema, old))
    assert name == "som.state.RegistrantState" and rec["version"] == 1
    assert rec["families"]["OXYCODONE"]["months"] == {"month": [], "units": []}
    # the decoded (and the raw dict) v1 state scores and learns; monthly history starts now
    for st in (rec, old):
        v = score(monitor, st, 500)
        assert finding(v, "static_2x_12m")["threshold"] == MAX
        new = monitor.learn(st, order(DEA, NOW, {"OXYCODONE": 500}))
        assert new["version"] == bl.STATE_VERSION == 4
        months = new["families"]["OXYCODONE"]["months"]
        assert {k: months[k] for k in ("month", "units")} == {"month": [2026 * 12 + 2], "units": [500]}
        assert len(months["mg"]) == len(months["high"]) == 1  # the month's strength (v9), from this order on
        assert sum(new["timing"]["hours"]) == 1 and new["timing"]["weekdays"][NOW.weekday()] == 1
        assert codec.decode(codec.encode("som.state.RegistrantState", new))[1] == new


def test_v2_state_records_decode_and_migrate_with_empty_timing() -> None:
    codec = AvroCodec()
    v2 = next(s for s in codec.catalog.by_fingerprint.values() if s.source.name == "som.state.RegistrantState.v2.avsc")
    assert v2.fingerprint != codec.catalog.get("som.state.RegistrantState").fingerprint
    monitor = Monitor()
    state = history(monitor, {3: 1000, 2: 1000, 1: 1000})
    old = _old_state(state, version=2)
    name, rec = codec.decode(codec.encode_with(v2, old))
    assert name == "som.state.RegistrantState" and rec["version"] == 2
    assert rec["timing"] == {"hours": [], "weekdays": []}
    # nothing else is lost; the usual strength (v4) starts empty in a v2 record
    def kept(fb: dict) -> dict:  # what a v2 record holds: no strength (v4), 30-day strength (v7), months' mix (v9)
        out = {k: v for k, v in fb.items() if k not in ("mg_per_unit", "mg_per_unit_30d")}
        return dict(out, days={k: v for k, v in fb["days"].items() if k not in ("mg", "high")},
                    months={k: v for k, v in fb["months"].items() if k not in ("mg", "high")})
    assert {f: kept(fb) for f, fb in rec["families"].items()} == {f: kept(fb) for f, fb in state["families"].items()}
    assert all(fb["mg_per_unit"] == {"mean": 0.0, "n": 0} for fb in rec["families"].values())
    for st in (rec, old):
        # same verdict numbers as the current state, except that timing has no history yet
        v, v_now = score(monitor, st, 2500), score(monitor, state, 2500)
        assert finding(v, "static_2x_12m") == finding(v_now, "static_2x_12m")
        assert finding(v, "timing", "*")["window"].startswith("not applicable")
        new = monitor.learn(st, order(DEA, NOW, {"OXYCODONE": 500}))
        assert new["version"] == 4 and sum(new["timing"]["hours"]) == 1


def test_old_verdict_and_hold_records_decode_with_enforced_true() -> None:
    codec = AvroCodec()
    monitor = Monitor()
    v = monitor.score(None, order(DEA, NOW, {"OXYCODONE": 9000}), decided_at=NOW)
    assert v["verdict"] == "HOLD"
    old_reasons = [{k: x for k, x in r.items() if k != "enforced"} for r in v["reasons"]]
    for fullname, src, record in [
        ("som.Verdict", "som.Verdict.v2.avsc", dict(v, reasons=old_reasons)),
        ("som.Hold", "som.Hold.v1.avsc", {"order_id": v["order_id"], "order_number": v["order_number"],
                                          "purchaser_dea": DEA, "held_at": NOW, "summary": "s",
                                          "reasons": [r for r in old_reasons if r["fired"]]}),
    ]:
        old = next(s for s in codec.catalog.by_fingerprint.values() if s.source.name == src)
        assert old.fullname == fullname and old.fingerprint != codec.catalog.get(fullname).fingerprint
        name, rec = codec.decode(codec.encode_with(old, record))
        assert name == fullname and rec["reasons"] and all(r["enforced"] is True for r in rec["reasons"])
    # and the current form round-trips with the flag
    _, rec = codec.decode(codec.encode("som.Verdict", v))
    assert [r["enforced"] for r in rec["reasons"]] == [r["enforced"] for r in v["reasons"]]
    # the oldest verdict (v1, before total_dosage_units) still reads too
    v1 = next(s for s in codec.catalog.by_fingerprint.values() if s.source.name == "som.Verdict.v1.avsc")
    rec1 = {k: x for k, x in dict(v, reasons=old_reasons).items() if k != "total_dosage_units"}
    assert codec.decode(codec.encode_with(v1, rec1))[1]["reasons"][0]["enforced"] is True


def test_score_cost_of_the_reference_detectors() -> None:
    cfg = MonitorConfig()
    full = Monitor(cfg)
    learned = Monitor(cfg, [d for d in full.detectors if d.name in LEARNED_DETECTORS])
    state = five_family_state(full)
    probe = order(DEA, NOW + timedelta(days=3), {"OXYCODONE": 420, "HYDROCODONE": 430, "TRAMADOL": 440})

    def per_score(m: Monitor) -> float:
        n, t0 = 300, time.perf_counter()
        for _ in range(n):
            m.score(state, probe, decided_at=NOW)
        return (time.perf_counter() - t0) / n

    per_score(full), per_score(learned)  # warm up
    a, b = min(per_score(learned) for _ in range(3)), min(per_score(full) for _ in range(3))
    print(f"\nscore(), 3-family order, 5-family state: learned detectors {a * 1e6:.0f} us, "
          f"with the 5 reference detectors {b * 1e6:.0f} us (+{100 * (b / a - 1):.0f}%)")
    assert full.score(state, probe, decided_at=NOW)["verdict"] == learned.score(state, probe, decided_at=NOW)["verdict"]

"""Suspicious order monitoring: detectors on synthetic histories, state round trip, learning discipline."""
from __future__ import annotations

import io
import json
import math
import random
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fastavro
import pytest
from river import stats

from streams.monitoring import Monitor, MonitorConfig, StateVersionError
from streams.monitoring import baselines as bl

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas" / "avro"
T0 = datetime(2026, 1, 5, 14, 0, tzinfo=timezone.utc)

# family -> (schedule, mg base per unit, MME factor)
PRODUCTS = {
    "OXYCODONE": ("2", 10.0, 1.5),
    "HYDROCODONE": ("2", 10.0, 1.0),
    "FENTANYL": ("2", 0.1, 2400.0),  # ~transdermal-ish; MME per unit is what matters here
    "ALPRAZOLAM": ("4", 1.0, 0.0),
    "TRAMADOL": ("4", 50.0, 0.2),
    "METHYLPHENIDATE": ("2N", 10.0, 0.0),
}


# --------------------------------------------------------------------------
# synthetic orders and histories
# --------------------------------------------------------------------------

def line(no: int, family: str, units: int) -> dict[str, Any]:
    schedule, mg, factor = PRODUCTS[family]
    return {
        "line_no": no, "ndc": f"00000-{no:04d}-01", "product_name": family.title(), "strength": f"{mg:g} MG",
        "package_quantity": 1, "packages": int(units), "dosage_units": int(units), "schedule": schedule,
        "drug_family": family, "base_weight_g": units * mg / 1000.0, "mme": units * mg * factor,
    }


def order(dea: str, at: datetime, items: dict[str, int], order_id: str | None = None) -> dict[str, Any]:
    return {
        "order_id": order_id or str(uuid.uuid4()), "order_number": "26X" + uuid.uuid4().hex[:6].upper(),
        "purchaser_dea": dea, "purchaser_name": "Test Pharmacy", "supplier_dea": "PS1234563",
        "signed_at": at - timedelta(minutes=30), "received_at": at, "verified_at": at,
        "signer_serial": "01", "signer_fingerprint": "00" * 32, "business_activity": "RETAIL PHARMACY",
        "purchaser_state": None,
        "lines": [line(i + 1, fam, u) for i, (fam, u) in enumerate(items.items())],
    }


@dataclass
class Habit:
    """How one registrant orders one family: typical units, days between orders, noise."""

    family: str
    units: float
    every_days: float
    sigma: float = 0.2  # lognormal noise of the order size
    restock_p: float = 0.05  # chance of an occasional 1.8x restock


def normal_orders(dea: str, habits: list[Habit], days: float, rng: random.Random,
                  start: datetime = T0) -> list[dict[str, Any]]:
    """Realistic-looking normal history: jittered cadence, business hours, lognormal sizes, restocks."""
    events: list[tuple[datetime, str, int]] = []
    for h in habits:
        t = start + timedelta(days=rng.uniform(0, h.every_days))
        while t < start + timedelta(days=days):
            units = h.units * math.exp(rng.gauss(0, h.sigma))
            if rng.random() < h.restock_p:
                units *= 1.8
            at = t.replace(hour=rng.randint(12, 22), minute=rng.randint(0, 59))  # 8am-6pm US Eastern
            if at.weekday() >= 5:  # weekend: order Monday
                at += timedelta(days=7 - at.weekday())
            events.append((at, h.family, max(1, round(units))))
            t += timedelta(days=max(0.6, h.every_days * math.exp(rng.gauss(0, 0.25))))
    events.sort()
    return [order(dea, at, {fam: u}) for at, fam, u in events]


def run(monitor: Monitor, orders: list[dict[str, Any]], state: dict | None = None
        ) -> tuple[dict | None, list[dict[str, Any]]]:
    """Score every order and learn the released ones, as the agent does."""
    verdicts = []
    for o in orders:
        v = monitor.score(state, o, decided_at=o["received_at"])
        if v["verdict"] == "RELEASE":
            state = monitor.learn(state, o)
        verdicts.append(v)
    return state, verdicts


def oxy_history(monitor: Monitor, dea: str = "BP1234563", days: float = 60, seed: int = 1):
    """A pharmacy ordering ~500 units of OXYCODONE every ~3 days for ``days`` days."""
    rng = random.Random(seed)
    orders = normal_orders(dea, [Habit("OXYCODONE", 500, 3, sigma=0.12, restock_p=0.0)], days, rng)
    state, verdicts = run(monitor, orders)
    assert all(v["verdict"] == "RELEASE" for v in verdicts), [held(v) for v in verdicts if held(v)]
    return state, orders[-1]["received_at"]


def held(v: dict[str, Any]) -> list[str]:
    """The deciding (enforced) findings that fired."""
    return [f"{r['detector']}:{r['drug_family']}: {r['explanation']}" for r in v["reasons"]
            if r["fired"] and r["enforced"]]


def fired_detectors(v: dict[str, Any]) -> set[str]:
    """Detectors that fired and decide (static reference rules are recorded but not enforced by default)."""
    return {r["detector"] for r in v["reasons"] if r["fired"] and r["enforced"]}


def avro_schema() -> Any:
    """The state schema with the named types it refers to (``csos.state.OrderOutcome``) expanded."""
    from streams.core.avro_codec import default_codec
    return default_codec().catalog.get("som.state.RegistrantState").parsed


def avro_roundtrip(state: dict[str, Any]) -> tuple[dict[str, Any], int]:
    schema = avro_schema()
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, state)
    size = buf.tell()
    buf.seek(0)
    return fastavro.schemaless_reader(buf, schema, None), size


# --------------------------------------------------------------------------
# river internals: the export/import must fail loudly if river changes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5])
def test_ewmean_state_roundtrip_matches_river(alpha: float) -> None:
    rng = random.Random(7)
    a = stats.EWMean(fading_factor=alpha)
    xs = [rng.uniform(0, 1000) for _ in range(50)]
    for x in xs[:25]:
        a.update(x)
    mean, initialized = bl.ewmean_export(a)
    assert initialized and mean == a.get()
    b = bl.ewmean_import(mean, initialized, alpha)
    for x in xs[25:]:
        a.update(x)
        b.update(x)
        assert a.get() == b.get()
    fresh = stats.EWMean(fading_factor=alpha)
    assert bl.ewmean_export(fresh) == (0.0, False)
    resumed = bl.ewmean_import(0.0, False, alpha)
    resumed.update(42.0)
    assert resumed.get() == 42.0  # river starts an EW mean at its first value


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5])
def test_ewvar_state_roundtrip_matches_river(alpha: float) -> None:
    rng = random.Random(8)
    a = stats.EWVar(fading_factor=alpha)
    xs = [rng.gauss(6, 0.3) for _ in range(50)]
    for x in xs[:25]:
        a.update(x)
    m, sq, initialized = bl.ewvar_export(a)
    assert initialized and a.get() == sq - m * m
    b = bl.ewvar_import(m, sq, initialized, alpha)
    for x in xs[25:]:
        a.update(x)
        b.update(x)
        assert a.get() == b.get()


def test_a_reused_river_core_is_the_core_a_new_one_would_be() -> None:
    """Learning overwrites a statistic's Rust core from its state bytes instead of building one per update
    (a warm-up changes the fading factor every time): same state, same updates after it, as river's own."""
    rng = random.Random(9)
    xs = [rng.uniform(1, 500) for _ in range(30)]
    # A statistic learned through the baselines (warm-up included) and river's EWMean at the same factors.
    ew = bl.EWMeanBaseline(0.1)
    var = bl.EWVarBaseline(0.1)
    for n, x in enumerate(xs):
        alpha = bl.warmup_alpha(0.1, n)
        expect = bl.ewmean_import(ew.mean, n > 0, alpha)
        expect.update(x)
        expect_var = bl.ewvar_import(var.mean, var.sq_mean, n > 0, alpha)
        expect_var.update(x)
        ew.update(x)
        var.update(x)
        assert (ew.mean, True) == bl.ewmean_export(expect)
        assert (var.mean, var.sq_mean, True) == bl.ewvar_export(expect_var)
    # Overwriting a used core with other numbers gives the bytes of a new core set from them.
    used = bl._ewmean_core(123.0, True, 0.3)
    used.update(7.0)
    assert bl._ewmean_core(5.0, True, 0.1, used).__getstate__() == bl._ewmean_core(5.0, True, 0.1).__getstate__()
    used_var = bl._ewvar_core(2.0, 9.0, True, 0.3)
    used_var.update(7.0)
    assert (bl._ewvar_core(5.0, 30.0, True, 0.1, used_var).__getstate__()
            == bl._ewvar_core(5.0, 30.0, True, 0.1).__getstate__())


def test_river_layout_change_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    class Renamed:
        fading_factor = 0.1

    with pytest.raises(bl.RiverStateError):
        bl.ewmean_export(Renamed())  # type: ignore[arg-type]
    s = stats.EWMean(fading_factor=0.1)
    s.update(1.0)

    class Core:
        def __getstate__(self) -> bytes:
            return b"\x00" * 41  # a field was added

        def __setstate__(self, _: bytes) -> None: ...

    monkeypatch.setattr(s, "_ewmean", Core())
    with pytest.raises(bl.RiverStateError):
        bl.ewmean_export(s)
    wrong_alpha = stats.EWMean(fading_factor=0.2)
    wrong_alpha.update(1.0)
    wrong_alpha.fading_factor = 0.1  # stored bytes no longer agree with the expected fading factor
    with pytest.raises(bl.RiverStateError):
        bl.ewmean_export(wrong_alpha)


# --------------------------------------------------------------------------
# normal orders are released
# --------------------------------------------------------------------------

def test_false_hold_rate_on_normal_orders_is_below_one_percent() -> None:
    monitor = Monitor()
    rng = random.Random(2026)
    total = holds = 0
    details = []
    for k in range(10):
        habits = [Habit("OXYCODONE", rng.uniform(200, 1500), rng.choice([1, 2, 3, 4, 7]),
                        sigma=rng.uniform(0.15, 0.25))]
        if k % 2 == 0:
            habits.append(Habit("HYDROCODONE", rng.uniform(300, 1200), rng.choice([2, 3, 7]),
                                sigma=rng.uniform(0.15, 0.25)))
        if k % 3 == 0:
            habits.append(Habit("ALPRAZOLAM", rng.uniform(100, 600), rng.choice([3, 7, 14]),
                                sigma=rng.uniform(0.15, 0.25)))
        orders = normal_orders(f"BP{k:07d}", habits, 420, rng)
        _, verdicts = run(monitor, orders)
        scored = verdicts[-50:]  # 50 orders per registrant after its history
        total += len(scored)
        for v in scored:
            if v["verdict"] == "HOLD":
                holds += 1
                details.append(held(v))
    assert total == 500
    assert holds / total < 0.01, details


def test_cold_start_releases_first_orders_but_not_above_ceiling() -> None:
    monitor = Monitor()
    dea = "BP7654321"
    state = None
    for i, units in enumerate([300, 2500, 150, 1200]):  # wildly varying, but no history yet
        o = order(dea, T0 + timedelta(days=3 * i), {"OXYCODONE": units})
        v = monitor.score(state, o)
        if units > 1300:  # one order above a new retail pharmacy's per-order ceiling (issue 11), not the cold start's
            assert fired_detectors(v) == {"new_customer_order"} and v["verdict"] == "HOLD", held(v)
            continue
        assert v["verdict"] == "RELEASE", held(v)
        state = monitor.learn(state, o)
    big = order(dea, T0 + timedelta(days=15), {"OXYCODONE": 9000})
    v = monitor.score(state, big)
    assert v["verdict"] == "HOLD"
    r = next(r for r in v["reasons"] if r["detector"] == "size")
    assert r["fired"] and r["threshold"] == 8000 and "cold start" in r["window"]
    first = monitor.score(None, order(dea, T0, {"OXYCODONE": 8000}))
    assert "size" not in fired_detectors(first)  # at the one-order ceiling, not above it
    # ... but above a new retail pharmacy's monthly ceiling (new_customer_activity_units, issue 11)
    assert fired_detectors(first) & {"new_customer"} and first["verdict"] == "HOLD"


# --------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------

def test_ten_x_spike_is_held_with_consistent_size_reason() -> None:
    monitor = Monitor()
    state, last = oxy_history(monitor)
    spike = order("BP1234563", last + timedelta(days=3), {"OXYCODONE": 5000})
    v = monitor.score(state, spike)
    assert v["verdict"] == "HOLD"
    # the registrant is still in its new-customer period: one order of 5,000 is above its per-order ceiling too
    assert fired_detectors(v) - {"new_customer_order"} == {"size"}
    r = next(r for r in v["reasons"] if r["detector"] == "size")
    assert r["dimension"] == "size" and r["drug_family"] == "OXYCODONE"
    assert r["value"] == 5000 and r["value"] > r["threshold"] > r["baseline"]
    fam = bl.FamilyBaseline.from_dict(state["families"]["OXYCODONE"], monitor.settings)
    assert r["baseline"] == pytest.approx(fam.units.get())
    assert 400 < r["baseline"] < 600
    assert r["threshold"] >= 3 * r["baseline"]
    text = r["explanation"]
    assert f"Ordered {r['value']:,.0f} dosage units of OXYCODONE" in text
    assert f"usual order is {r['baseline']:,.0f}" in text
    assert f"the threshold is {r['threshold']:,.0f}" in text
    assert r["window"] in text
    ratio = re.search(r"this order is ([\d.]+)x the usual", text)
    assert ratio and float(ratio.group(1)) == pytest.approx(r["value"] / r["baseline"], abs=0.05)
    # every detector reported on the family, fired or not
    assert {r["detector"] for r in v["reasons"]} == {
        "size", "volume_30d", "frequency_24h", "frequency_7d", "new_family", "family_mix", "trend", "ramp",
        "ramp_2x", "strength_shift", "peer_volume", "timing", "anomaly",
        "new_customer", "new_customer_order",  # a 60-day-old registrant is in its new-customer period
        "static_2x_12m", "static_3x_12m", "static_6m_max", "static_8000_du", "static_customer_limit"}
    assert {r["detector"] for r in v["reasons"] if r["enforced"]} == {
        "size", "volume_30d", "frequency_24h", "frequency_7d", "new_family", "family_mix", "trend", "ramp",
        "ramp_2x", "new_customer", "new_customer_order", "strength_shift"}
    assert Monitor.summary(v).startswith("Held for due diligence: Ordered 5,000")


def test_restock_of_twice_the_usual_is_released() -> None:
    monitor = Monitor()
    state, last = oxy_history(monitor)
    v = monitor.score(state, order("BP1234563", last + timedelta(days=3), {"OXYCODONE": 1000}))
    assert v["verdict"] == "RELEASE", held(v)


def one_line_orders_per_day(dea: str, days: int, rng: random.Random) -> tuple[dict | None, datetime, Monitor]:
    """An ARCOS-style buyer: every other weekday, four one-line HYDROCODONE orders of ~150 units (schedule III
    rows carry no order form, so each line is its own order), all released and learned."""
    monitor = Monitor()
    orders = []
    for d in range(0, days, 2):
        day = T0 + timedelta(days=d)
        if day.weekday() >= 5:
            continue
        orders += [order(dea, day + timedelta(hours=h), {"HYDROCODONE": round(150 * math.exp(rng.gauss(0, 0.1)))})
                   for h in range(4)]
    state, verdicts = run(monitor, orders)
    assert all(v["verdict"] == "RELEASE" for v in verdicts), [held(v) for v in verdicts if held(v)]
    return state, orders[-1]["received_at"], monitor


def test_an_order_grouping_a_usual_days_lines_is_not_a_size_finding_but_a_spike_is() -> None:
    # After hydrocodone became schedule II, one form carries the day's four lines: 4x the usual order, the usual day.
    state, last, monitor = one_line_orders_per_day("BH1234563", 150, random.Random(11))
    next_day = last.replace(hour=14) + timedelta(days=2 if last.weekday() < 3 else 4)
    grouped = monitor.score(state, order("BH1234563", next_day, {"HYDROCODONE": 600}))
    assert grouped["verdict"] == "RELEASE", held(grouped)
    size = next(r for r in grouped["reasons"] if r["detector"] == "size")
    assert not size["fired"] and size["value"] > size["threshold"]  # above the per-order threshold, not the day's
    assert "usual ordering day" in size["window"]
    # One order of 2,500 units (over 4x its usual day of ~600) is still held on size, with the day in the reason.
    spike = monitor.score(state, order("BH1234563", next_day, {"HYDROCODONE": 2500}))
    assert spike["verdict"] == "HOLD" and "size" in fired_detectors(spike)
    text = next(r for r in spike["reasons"] if r["detector"] == "size")["explanation"]
    assert re.search(r"2,500 units of HYDROCODONE that day, 4\.\dx its usual ordering day of 6\d\d", text), text
    # The day counts the orders already learned on it: a second order of 1,400 after the first 600 makes a
    # day of 2,000 units, over 3x the usual ordering day.
    state = monitor.learn(state, order("BH1234563", next_day, {"HYDROCODONE": 600}))
    second = monitor.score(state, order("BH1234563", next_day + timedelta(hours=2), {"HYDROCODONE": 1400}))
    assert "size" in fired_detectors(second)


def test_a_monthly_buyer_grouping_its_days_lines_is_judged_by_its_usual_month() -> None:
    # Every five weeks, three one-line orders of ~700 units: no other ordering day in the last 30 days, so its
    # usual day is its average month with orders (~2,100).
    monitor, rng, dea = Monitor(), random.Random(5), "BM1234563"
    days = [T0 + timedelta(days=35 * k) for k in range(9)]
    orders = [order(dea, d + timedelta(hours=h), {"OXYCODONE": round(700 * math.exp(rng.gauss(0, 0.05)))})
              for d in days for h in range(3)]
    state, verdicts = run(monitor, orders)
    assert all(v["verdict"] == "RELEASE" for v in verdicts), [held(v) for v in verdicts if held(v)]
    at = days[-1] + timedelta(days=35)
    grouped = monitor.score(state, order(dea, at, {"OXYCODONE": 2400}))  # 3.4x its usual order
    assert grouped["verdict"] == "RELEASE", held(grouped)
    assert "average month with orders" in next(r for r in grouped["reasons"] if r["detector"] == "size")["window"]
    spike = monitor.score(state, order(dea, at, {"OXYCODONE": 9000}))
    assert "size" in fired_detectors(spike)


# --------------------------------------------------------------------------
# frequency
# --------------------------------------------------------------------------

def test_burst_of_small_orders_within_24h_is_held_on_frequency() -> None:
    monitor = Monitor()
    state, last = oxy_history(monitor)
    start = last + timedelta(days=2)
    verdicts = []
    for i in range(8):  # 8 orders of ~half the usual size within 21 hours
        o = order("BP1234563", start + timedelta(hours=3 * i), {"OXYCODONE": 250})
        v = monitor.score(state, o)
        if v["verdict"] == "RELEASE":
            state = monitor.learn(state, o)
        verdicts.append(v)
    decisions = [v["verdict"] for v in verdicts]
    k = decisions.index("HOLD")  # the count's Poisson tail at this buyer's cadence (~2 orders a week) < 1e-4
    assert 3 <= k <= 6
    assert decisions[k:] == ["HOLD"] * (8 - k)  # every order after the threshold, held ones not counted as normal
    for v in verdicts[k:]:
        assert "frequency_24h" in fired_detectors(v)
        assert "size" not in fired_detectors(v)
        r = next(r for r in v["reasons"] if r["detector"] == "frequency_24h")
        assert r["dimension"] == "frequency" and r["value"] > r["threshold"] >= 3
        assert f"This is order {r['value']:.0f} of OXYCODONE in the last 24 hours" in r["explanation"]
        assert f"the threshold is {r['threshold']:,.1f}" in r["explanation"]


def test_burst_by_a_daily_orderer_is_held_before_its_baseline_catches_up() -> None:
    # 18,000 units a month from its first month: above the fixed new-customer ceiling without peers, so this
    # frequency test runs without the new-customer period (tests/unit/test_open_cases.py covers it)
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    rng = random.Random(6)
    dea = "BP2222223"
    orders = normal_orders(dea, [Habit("HYDROCODONE", 600, 1.0, restock_p=0.0)], 120, rng)
    state, verdicts = run(monitor, orders)
    assert all(v["verdict"] == "RELEASE" for v in verdicts)
    last = orders[-1]["received_at"]
    probe = order(dea, last + timedelta(days=1), {"HYDROCODONE": 300})
    threshold_before = next(r["threshold"] for r in monitor.score(state, probe)["reasons"]
                            if r["detector"] == "frequency_24h")
    verdicts = []
    for i in range(10):
        o = order(dea, last + timedelta(days=1, hours=2 * i), {"HYDROCODONE": 300})
        v = monitor.score(state, o)
        if v["verdict"] == "RELEASE":
            state = monitor.learn(state, o)
        verdicts.append(v)
    first = next(v for v in verdicts if v["verdict"] == "HOLD")
    r = next(r for r in first["reasons"] if r["detector"] == "frequency_24h")
    assert r["fired"]
    # the released head of the burst raised the usual 24-hour count by well under one order
    assert r["threshold"] < threshold_before + 1.0
    assert r["value"] <= math.floor(threshold_before) + 2
    assert all(v["verdict"] == "HOLD" for v in verdicts[verdicts.index(first):])


def test_daily_orderer_is_not_held_for_its_cadence() -> None:
    # ~9,000 units a month is above a new retail pharmacy's ceiling (tested in test_detectors_issue11): this test
    # is about cadence, so the new-customer period is off
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    rng = random.Random(5)
    orders = normal_orders("BP2222222", [Habit("HYDROCODONE", 300, 1.0)], 120, rng)
    _, verdicts = run(monitor, orders)
    assert all(v["verdict"] == "RELEASE" for v in verdicts), [held(v) for v in verdicts if held(v)]


def test_weekly_burst_is_held_on_seven_day_frequency() -> None:
    # frequency alone decides: ten daily orders of a weekly buyer also triple its month (ramp holds them too)
    monitor = Monitor(MonitorConfig(hold_detectors=("frequency_24h", "frequency_7d")))
    rng = random.Random(9)
    dea = "BP3333333"
    orders = normal_orders(dea, [Habit("OXYCODONE", 800, 7, restock_p=0.0)], 180, rng)
    state, verdicts = run(monitor, orders)
    assert all(v["verdict"] == "RELEASE" for v in verdicts)
    last = orders[-1]["received_at"]
    verdicts = []
    for i in range(10):  # one order a day for ten days, each a normal size (Poisson tail at ~1 a week < 1e-4)
        o = order(dea, last + timedelta(days=7 + i), {"OXYCODONE": 800})
        v = monitor.score(state, o)
        if v["verdict"] == "RELEASE":
            state = monitor.learn(state, o)
        verdicts.append(v)
    assert any("frequency_7d" in fired_detectors(v) for v in verdicts)
    assert verdicts[0]["verdict"] == "RELEASE"


# --------------------------------------------------------------------------
# pattern
# --------------------------------------------------------------------------

def test_first_ever_fentanyl_by_established_pharmacy_is_held_on_pattern() -> None:
    monitor = Monitor()
    state, last = oxy_history(monitor)
    assert state["total_orders"] >= 10
    v = monitor.score(state, order("BP1234563", last + timedelta(days=3), {"OXYCODONE": 500, "FENTANYL": 30}))
    assert v["verdict"] == "HOLD"
    assert fired_detectors(v) == {"new_family"}
    r = next(r for r in v["reasons"] if r["detector"] == "new_family" and r["fired"])
    assert r["drug_family"] == "FENTANYL" and r["dimension"] == "pattern"
    assert r["value"] == pytest.approx(30 * 0.1 * 2400) and r["threshold"] == 0.0
    assert "First-ever order of FENTANYL" in r["explanation"] and "7,200 MME" in r["explanation"]
    # the same first order by a brand-new customer is not held on pattern (no history to deviate from)
    assert monitor.score(None, order("BP9999991", last, {"FENTANYL": 30}))["verdict"] == "RELEASE"
    # a small first order of a schedule IV non-opioid by the established pharmacy is not held
    v = monitor.score(state, order("BP1234563", last + timedelta(days=3), {"ALPRAZOLAM": 200}))
    assert v["verdict"] == "RELEASE", held(v)


def test_family_mix_shift_is_held_on_pattern() -> None:
    monitor = Monitor()
    rng = random.Random(11)
    dea = "BP4444444"
    habits = [Habit("OXYCODONE", 500, 3, sigma=0.15, restock_p=0), Habit("HYDROCODONE", 500, 3, sigma=0.15,
                                                                          restock_p=0)]
    orders = normal_orders(dea, habits, 150, rng)
    state, verdicts = run(monitor, orders)
    assert all(v["verdict"] == "RELEASE" for v in verdicts)
    # HYDROCODONE stops, OXYCODONE orders grow to 1.9x: each order below the size and volume thresholds
    last = orders[-1]["received_at"]
    verdicts = []
    for i in range(12):
        o = order(dea, last + timedelta(days=3 * (i + 1)), {"OXYCODONE": 950})
        v = monitor.score(state, o, decided_at=o["received_at"])
        if v["verdict"] == "RELEASE":
            state = monitor.learn(state, o)
        verdicts.append(v)
    mix_fired = [v for v in verdicts if "family_mix" in fired_detectors(v)]
    assert mix_fired, [[r["explanation"] for r in v["reasons"] if r["detector"] == "family_mix"] for v in verdicts]
    # the same shift is a focused ramp of OXYCODONE against its long memory (ramp) as well
    assert all(fired_detectors(v) <= {"family_mix", "volume_30d", "ramp"} for v in verdicts)
    r = next(r for r in mix_fired[0]["reasons"] if r["detector"] == "family_mix")
    assert r["value"] > r["threshold"] > r["baseline"]
    assert f"{100 * r['value']:.0f}%" in r["explanation"] and f"usually {100 * r['baseline']:.0f}%" in r["explanation"]


# --------------------------------------------------------------------------
# learning discipline and state
# --------------------------------------------------------------------------

def test_held_spikes_do_not_poison_the_baseline() -> None:
    monitor = Monitor()
    state, last = oxy_history(monitor)
    before = json.dumps(state, sort_keys=True)
    for i in range(6):
        spike = order("BP1234563", last + timedelta(days=3 * (i + 1)), {"OXYCODONE": 5000})
        v = monitor.score(state, spike)
        assert v["verdict"] == "HOLD", f"spike {i + 1} released"
        if v["verdict"] == "RELEASE":  # the agent's rule; never taken here
            state = monitor.learn(state, spike)
        assert json.dumps(state, sort_keys=True) == before
    # what learning the spikes would have done: the baseline moves toward them
    poisoned = state
    for i in range(5):
        poisoned = monitor.learn(poisoned, order("BP1234563", last + timedelta(days=3 * (i + 1)),
                                                 {"OXYCODONE": 5000}))
    assert poisoned["families"]["OXYCODONE"]["units"]["mean"] > 2 * state["families"]["OXYCODONE"]["units"]["mean"]


def test_learn_does_not_modify_its_input_and_is_idempotent() -> None:
    monitor = Monitor()
    state, last = oxy_history(monitor)
    snapshot = json.dumps(state, sort_keys=True)
    o = order("BP1234563", last + timedelta(days=3), {"OXYCODONE": 520})
    once = monitor.learn(state, o)
    assert json.dumps(state, sort_keys=True) == snapshot
    assert once != state
    assert monitor.learn(once, o) == once  # redelivered order learned once
    replay = monitor.score(once, o)
    assert replay["verdict"] == "RELEASE"
    assert any(r["detector"] == "replay" for r in replay["reasons"])
    first = monitor.score(state, o, decided_at=T0)
    again = monitor.score(once, o, decided_at=T0)
    f24 = lambda v: next(r["value"] for r in v["reasons"] if r["detector"] == "frequency_24h")  # noqa: E731
    assert f24(first) == f24(again)  # the replayed order is not counted twice


def test_state_roundtrips_through_avro_and_scores_identically() -> None:
    monitor = Monitor()
    rng = random.Random(3)
    habits = [Habit("OXYCODONE", 500, 3), Habit("HYDROCODONE", 700, 2), Habit("ALPRAZOLAM", 300, 7),
              Habit("TRAMADOL", 400, 5), Habit("METHYLPHENIDATE", 200, 10)]
    orders = normal_orders("BP5555555", habits, 120, rng)
    state, _ = run(monitor, orders)
    assert state is not None and len(state["families"]) == 5
    decoded, size = avro_roundtrip(state)
    assert decoded == state
    last = orders[-1]["received_at"]
    probes = [
        order("BP5555555", last + timedelta(hours=5), {"OXYCODONE": 510}),
        order("BP5555555", last + timedelta(days=2), {"HYDROCODONE": 9000, "TRAMADOL": 350}),
        order("BP5555555", last + timedelta(days=1), {"FENTANYL": 10}),
        order("BP5555555", last + timedelta(days=1), {"ALPRAZOLAM": 290, "METHYLPHENIDATE": 210}),
    ]
    for p in probes:
        assert monitor.score(state, p, decided_at=T0) == monitor.score(decoded, p, decided_at=T0)
        assert monitor.learn(state, p) == monitor.learn(decoded, p)
    # the verdict itself is a valid som.Verdict
    named: dict[str, Any] = {}
    for name in ("order_line", "reason", "verdict"):
        with open(SCHEMA_DIR / f"{name}.avsc", encoding="utf-8") as fh:
            vs = fastavro.parse_schema(json.load(fh), named_schemas=named)
    v = monitor.score(state, probes[1], decided_at=T0)
    assert v["verdict"] == "HOLD"
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, vs, v)
    print(f"\nAvro-encoded state, 5 families, {len(orders)} orders learned: {size} bytes")
    assert size < 2048


def test_state_is_bounded_for_a_high_volume_registrant() -> None:
    monitor = Monitor()
    rng = random.Random(4)
    habits = [Habit(f, 400, 0.35) for f in ("OXYCODONE", "HYDROCODONE", "ALPRAZOLAM", "TRAMADOL", "METHYLPHENIDATE")]
    orders = normal_orders("BP6666666", habits, 90, rng)
    state, _ = run(monitor, orders)
    _, size = avro_roundtrip(state)
    for fam in state["families"].values():
        assert len(fam["days"]["day"]) <= 30 and len(fam["recent_ms"]) <= monitor.config.recent_max
    print(f"\nAvro-encoded state, 5 families ordered ~3x a day each: {size} bytes")
    assert size < 4096


def test_state_version_and_mis_keyed_state_are_refused() -> None:
    monitor = Monitor()
    state, last = oxy_history(monitor)
    with pytest.raises(StateVersionError):
        monitor.score(dict(state, version=99), order("BP1234563", last, {"OXYCODONE": 1}))
    with pytest.raises(ValueError):
        monitor.score(state, order("BP0000001", last, {"OXYCODONE": 1}))
    fresh = monitor.new_state("BP1234563")
    assert fresh["version"] == bl.STATE_VERSION and avro_roundtrip(fresh)[0] == fresh


def test_forgotten_family_counts_as_new_again() -> None:
    monitor = Monitor()
    state, last = oxy_history(monitor)
    state = monitor.learn(state, order("BP1234563", last + timedelta(days=1), {"HYDROCODONE": 100}))
    assert "HYDROCODONE" in state["families"] and "HYDROCODONE" in state["mix"]
    rng = random.Random(1)
    later = normal_orders("BP1234563", [Habit("OXYCODONE", 500, 3, sigma=0.1, restock_p=0)], 420, rng,
                          start=last + timedelta(days=2))
    state, _ = run(monitor, later, state)
    assert "HYDROCODONE" not in state["families"] and "HYDROCODONE" not in state["mix"]


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------

def test_config_from_env_and_model_version() -> None:
    cfg = MonitorConfig.from_env({"SOM_SIZE_Z": "5", "SOM_SIZE_MIN_HISTORY": "12",
                                  "SOM_HIGH_RISK_FAMILIES": "fentanyl, carfentanil", "OTHER": "x"})
    assert cfg.size_z == 5.0 and cfg.size_min_history == 12
    assert cfg.high_risk_families == ("FENTANYL", "CARFENTANIL")
    assert MonitorConfig.from_env({}) == MonitorConfig()
    assert Monitor(cfg).model_version != Monitor().model_version
    with pytest.raises(ValueError, match="SOM_SIZE_Z"):
        MonitorConfig.from_env({"SOM_SIZE_Z": "high"})


def test_naive_datetimes_are_refused() -> None:
    o = order("BP1234563", T0, {"OXYCODONE": 10})
    o["received_at"] = o["received_at"].replace(tzinfo=None)
    with pytest.raises(ValueError, match="naive"):
        Monitor().score(None, o)


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------

def test_order_at_an_unusual_time_is_recorded_with_its_numbers() -> None:
    monitor = Monitor()
    dea = "BP1234563"
    state, last = oxy_history(monitor, dea=dea, days=120)  # weekdays, 12:00-22:59 UTC
    n = sum(state["timing"]["hours"])
    assert n >= 30 and sum(state["timing"]["weekdays"][5:]) == 0
    sunday_night = last + timedelta(days=(6 - last.weekday()) % 7 or 7)
    sunday_night = sunday_night.replace(hour=3, minute=10)
    v = monitor.score(state, order(dea, sunday_night, {"OXYCODONE": 500}))
    r = next(r for r in v["reasons"] if r["detector"] == "timing")
    assert r["fired"] and not r["enforced"] and v["verdict"] == "RELEASE"  # recorded, not deciding by default
    assert r["drug_family"] == "*" and r["value"] == 1.0 and r["baseline"] == 0.0 and r["threshold"] == 0.99
    assert f"~{n} released orders" in r["explanation"] and "Sunday 03:10 UTC" in r["explanation"]
    assert "between 01:00 and 06:00 UTC" in r["explanation"]
    # an order at its usual time does not fire, and enforcing the detector holds only the odd one
    usual = last.replace(hour=15) + timedelta(days=7)
    assert not next(r for r in monitor.score(state, order(dea, usual, {"OXYCODONE": 500}))["reasons"]
                    if r["detector"] == "timing")["fired"]
    strict = Monitor(MonitorConfig(hold_detectors=("timing",)))
    assert strict.score(state, order(dea, sunday_night, {"OXYCODONE": 500}))["verdict"] == "HOLD"
    assert strict.score(state, order(dea, usual, {"OXYCODONE": 500}))["verdict"] == "RELEASE"
    # too little history: not applicable
    young, _ = run(monitor, normal_orders(dea, [Habit("OXYCODONE", 500, 3)], 30, random.Random(2)))
    r = next(r for r in monitor.score(young, order(dea, sunday_night, {"OXYCODONE": 500}))["reasons"]
             if r["detector"] == "timing")
    assert not r["fired"] and r["window"].startswith("not applicable")


def test_timing_counts_stay_bounded() -> None:
    tp = bl.TimingProfile()
    for i in range(2000):
        tp.learn(int((T0 + timedelta(hours=7 * i)).timestamp() * 1000))
    assert tp.n < bl.TIMING_CAP and len(tp.hours) == 24 and len(tp.weekdays) == 7
    assert sum(tp.weekdays) <= bl.TIMING_CAP and min(tp.hours) >= 0


def test_recording_only_the_deciding_detectors_gives_the_same_verdicts() -> None:
    """SOM_RECORD_ALL=0 trades evidence for CPU; it must never change a decision."""
    from streams.tools.scenarios import generate

    orders = sorted(generate(seed=3, n_registrants=25).orders, key=lambda o: o["received_at"])
    full = Monitor(MonitorConfig())
    lean = Monitor(MonitorConfig(record_all=False))
    assert len(lean.detectors) < len(full.detectors) and lean.combiner is None
    live: dict[str, tuple[Any, Any]] = {}
    holds = 0
    for o in orders:
        dea = o["purchaser_dea"]
        a, b = live.setdefault(dea, (full.baselines(None, dea), lean.baselines(None, dea)))
        va, vb = full.score(a, o), lean.score(b, o)
        assert va["verdict"] == vb["verdict"], (o["order_id"], held(va), held(vb))
        assert held(va) == held(vb)
        assert {r["detector"] for r in vb["reasons"]} <= lean.hold_detectors | {"replay"}
        holds += va["verdict"] == "HOLD"
        if va["verdict"] == "RELEASE":
            full.learn_into(a, o)
            lean.learn_into(b, o)
    assert holds > 10  # the scenarios' episodes were there to be held
    # with the anomaly score deciding, everything it combines still runs
    assert len(Monitor(MonitorConfig(record_all=False, hold_detectors=("anomaly", "size"))).detectors) == len(
        full.detectors)

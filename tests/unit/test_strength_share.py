"""Issue 11: a shift to the strongest product of a family, judged against the long memory (calendar months).

Orders carry real NDCs of the bundled product master, so the high-strength share (products at >= 80 % of the
strongest strength of the family and dosage form) is what the pipeline computes.
"""
from __future__ import annotations

import math
import random
from datetime import datetime, timedelta
from typing import Any

from streams.domain.products import ProductMaster
from streams.monitoring import Monitor, MonitorConfig
from streams.monitoring.strength import DEFAULT_PRODUCTS, high_strength_ndcs
from test_detectors_issue11 import START
from test_monitoring import fired_detectors, order, run

PM = ProductMaster.load(DEFAULT_PRODUCTS)
HC5, HC75, HC10 = "00406-0365-05", "00591-0349-05", "00406-0367-01"  # hydrocodone/APAP 5, 7.5, 10 mg tablets
OXY10, OXY20, OXY30, OXY40 = "10702-0056-01", "59011-0420-10", "10702-0009-01", "59011-0440-10"
USUAL_HC = {HC5: 0.4, HC75: 0.3, HC10: 0.3}


def product_order(dea: str, at: datetime, units: dict[str, int]) -> dict[str, Any]:
    """An order whose lines are these NDCs and dosage units, enriched as verification does."""
    o = order(dea, at, {})
    for k, (ndc, u) in enumerate(units.items(), 1):
        p = PM.get(ndc)
        assert p is not None, ndc
        o["lines"].append({"line_no": k, "ndc": p.ndc, "product_name": p.product_name, "strength": p.strength,
                           "package_quantity": p.units_per_package, "packages": max(1, u // p.units_per_package),
                           "dosage_units": u, "schedule": p.schedule, "drug_family": p.drug_family,
                           "base_weight_g": p.base_weight_g(u), "mme": p.mme(u)})
    return o


def stream(dea: str, days: float, every: float, units: float, mix: Any, rng: random.Random,
           start: datetime = START) -> list[dict[str, Any]]:
    """Orders every ~``every`` days of ~``units`` units split by ``mix(t, rng)`` (NDC -> share) at time t."""
    out, t = [], start
    while t < start + timedelta(days=days):
        total = units * math.exp(rng.gauss(0, 0.12))
        split = {ndc: max(1, round(total * s)) for ndc, s in mix(t, rng).items() if s > 0}
        out.append(product_order(dea, t.replace(hour=rng.randint(13, 21)), split))
        t += timedelta(days=max(0.8, every * math.exp(rng.gauss(0, 0.2))))
    return out


def test_high_strength_products_are_the_strongest_of_family_and_form() -> None:
    high = high_strength_ndcs(PM, 0.8)
    assert HC10 in high and HC75 not in high and HC5 not in high  # 7.5 mg is 75 % of 10 mg
    assert OXY40 in high and OXY10 not in high
    assert all(p.ndc in high for p in PM if p.drug_family == "METHADONE" and p.dosage_form == "INJ")


def test_shift_to_the_strongest_hydrocodone_is_held_though_mg_per_unit_rises_only_1_3x() -> None:
    """90 % of the units move to 10 mg over three weeks and stay: mg per unit 1.3x, the 10 mg share 3x."""
    rng = random.Random(11)
    dea = "BH1111119"
    shift_at = START + timedelta(days=240)

    def mix(t: datetime, r: random.Random) -> dict[str, float]:
        f = min(1.0, max(0.0, (t - shift_at) / timedelta(days=21)))  # 0 -> 1 over three weeks
        return {ndc: (1 - f) * s + f * (0.9 if ndc == HC10 else 0.05) for ndc, s in USUAL_HC.items()}

    orders = stream(dea, 330, 3, 600, mix, rng)
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    _, verdicts = run(monitor, orders)
    held = [(o["received_at"], v) for o, v in zip(orders, verdicts) if v["verdict"] == "HOLD"]
    assert held, "the shift shipped"
    at, v = held[0]
    assert shift_at < at <= shift_at + timedelta(days=35), at  # none before the shift, then within five weeks
    assert fired_detectors(v) == {"strength_shift"}
    r = next(r for r in v["reasons"] if r["detector"] == "strength_shift" and r["fired"])
    assert "high-strength products" in r["explanation"] and "share" in r["window"]
    assert 0.25 < r["baseline"] < 0.35 and r["value"] > r["threshold"] >= 0.6  # usual 10 mg share ~30 %
    # mg per unit alone could not see it: the shifted month's strength is under 1.5x the usual.
    assert 5.83 / 4.39 < 1.5
    mg_only = Monitor(MonitorConfig(new_customer_months=0, strength_share_min=1.01))
    _, verdicts = run(mg_only, orders)
    assert not [v for v in verdicts if "strength_shift" in fired_detectors(v)]


def test_frequent_buyer_drifting_to_40_mg_is_held_against_its_calendar_months() -> None:
    """A daily buyer of 10 / 20 / 30 mg moves 80 % of its units to 40 mg over four weeks (2.1x its mg per unit).

    Before the long memory it was never held: each released order taught a stronger usual (up to 1.2x per
    order), so the 30-day mix never reached 1.5x the usual it was judged against.
    """
    rng = random.Random(0)
    dea = "BD2222227"
    shift_at = START + timedelta(days=200)

    def mix(t: datetime, r: random.Random) -> dict[str, float]:
        f = min(1.0, max(0.0, (t - shift_at) / timedelta(days=28)))
        return {OXY10: (1 - f) * 0.5 + f * 0.1, OXY20: (1 - f) * 0.3 + f * 0.06, OXY30: (1 - f) * 0.2 + f * 0.04,
                OXY40: f * 0.8}

    orders = stream(dea, 320, 1, 120, mix, rng)
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    _, verdicts = run(monitor, orders)
    held = [(o["received_at"], v) for o, v in zip(orders, verdicts) if v["verdict"] == "HOLD"]
    assert held and shift_at < held[0][0] <= shift_at + timedelta(days=31), held[:1]
    r = next(r for r in held[0][1]["reasons"] if r["detector"] == "strength_shift" and r["fired"])
    assert "earlier calendar months" in r["window"]
    if "share" not in r["window"]:  # the usual is the months before the shift (~15.2 mg per unit), not dragged along
        assert r["baseline"] < 16.0


def test_multi_strength_buyer_restocking_one_hydrocodone_product_per_order_is_not_held() -> None:
    """Each order is one of 5 / 7.5 / 10 mg, drawn by its usual share: its 30-day share of 10 mg swings, its
    months' do not move for good."""
    rng = random.Random(13)
    dea = "BM3333330"

    def one_product(t: datetime, r: random.Random) -> dict[str, float]:
        ndc = r.choices(list(USUAL_HC), weights=list(USUAL_HC.values()))[0]
        return {ndc: 1.0}

    orders = stream(dea, 420, 2.5, 500, one_product, rng)
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    _, verdicts = run(monitor, orders)
    fired = [next(r for r in v["reasons"] if r["detector"] == "strength_shift")
             for v in verdicts if "strength_shift" in fired_detectors(v)]
    assert not fired, fired[:2]
    assert len(orders) > 150


def test_a_mix_an_analyst_cleared_is_not_held_again_on_every_order() -> None:
    """After an analyst RELEASED a held order of the family, that month's mix is the usual (as ramp_2x's cleared
    level): a pharmacy whose patients moved to 10 mg for good is held once, not until its months catch up."""
    rng = random.Random(11)
    dea = "BH1111119"
    shift_at = START + timedelta(days=240)

    def mix(t: datetime, r: random.Random) -> dict[str, float]:
        f = min(1.0, max(0.0, (t - shift_at) / timedelta(days=21)))
        return {ndc: (1 - f) * s + f * (0.9 if ndc == HC10 else 0.05) for ndc, s in USUAL_HC.items()}

    orders = stream(dea, 330, 3, 600, mix, rng)
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    state, later = None, []
    for o in orders:
        v = monitor.score(state, o, decided_at=o["received_at"])
        if v["verdict"] == "HOLD" and not later:  # the analyst looks and releases: learned, its month cleared
            state = dict(monitor.learn(state, o))
            month = o["received_at"].year * 12 + o["received_at"].month - 1
            state["due_diligence"] = dict(state["due_diligence"], cleared={"HYDROCODONE": month})
            later.append(o)
            continue
        if later:
            later.append(o)
            assert "strength_shift" not in fired_detectors(v), o["received_at"]
        state = monitor.learn(state, o)
    assert len(later) > 10


def test_the_worker_monitor_takes_high_strength_products_from_the_verifier_s_master(monkeypatch) -> None:
    """The worker passes the product master it verifies with; CSOS_PRODUCTS is not read a second time."""
    import dataclasses
    master = list(ProductMaster.load(DEFAULT_PRODUCTS))
    oxy = [p for p in master if p.drug_family == "OXYCODONE" and p.dosage_form == "TAB"]
    weakest = min(oxy, key=lambda p: p.base_mg_per_unit)
    # a master where the weakest oxycodone tablet is the family's strongest: only it is high-strength
    local = [dataclasses.replace(weakest, base_mg_per_unit=1000.0) if p.ndc == weakest.ndc else p for p in master]
    monkeypatch.setenv("CSOS_PRODUCTS", "/nonexistent/products.csv")
    high = Monitor.from_env(local).high_ndcs
    assert weakest.ndc in high and not any(p.ndc in high for p in oxy if p.ndc != weakest.ndc)
    assert Monitor.from_env().high_ndcs == frozenset()  # without it, the (missing) CSOS_PRODUCTS file


COD30, COD60 = "00093-0150-05", "00093-0350-01"  # acetaminophen/codeine 300/30 mg (500s) and 300/60 mg (100s)
DEA_CODEINE = "BC4444446"


def six_weekly_codeine_restocks(days: int) -> tuple[list[dict[str, Any]], datetime]:
    """A pharmacy's codeine restocks every 40-50 days for ``days`` days: 100 x 60 mg, then 500 x 30 mg a minute
    later, each line its own order (ARCOS schedule III rows); and when the next restock would come."""
    rng = random.Random(5)
    orders, t = [], START
    while t < START + timedelta(days=days):
        orders.append(product_order(DEA_CODEINE, t.replace(hour=14), {COD60: 100}))
        orders.append(product_order(DEA_CODEINE, t.replace(hour=14, minute=1), {COD30: 500}))
        t += timedelta(days=rng.randint(40, 50))
    return orders, t


def test_one_days_purchase_of_a_buyer_ordering_every_six_weeks_is_not_a_shift() -> None:
    """A pharmacy restocks codeine every ~6 weeks: 100 x 60 mg and 500 x 30 mg, each line its own order (schedule
    III rows carry no form number in ARCOS). When the 60 mg line is read first it is alone in its 30 days: 1.7x the
    usual mg per unit. One day's purchase is a restock, not a mix: not held (it was, on every restock)."""
    orders, t = six_weekly_codeine_restocks(720)
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    _, verdicts = run(monitor, orders)
    fired = [(o["received_at"], fired_detectors(v)) for o, v in zip(orders, verdicts) if fired_detectors(v)]
    assert not fired, fired[:3]
    r = next(r for r in verdicts[-2]["reasons"] if r["detector"] == "strength_shift")
    assert r["value"] > r["threshold"] and "one day's purchase" in r["window"]  # the measure would have fired


def test_a_shift_bought_on_two_days_of_a_month_is_still_held() -> None:
    """The same buyer moves to 60 mg and orders it twice a month: a shift across days, held."""
    orders, t = six_weekly_codeine_restocks(360)
    dea = DEA_CODEINE
    shift_at = t
    for k in range(4):
        orders.append(product_order(dea, (t + timedelta(days=14 * k)).replace(hour=14), {COD60: 400}))
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    _, verdicts = run(monitor, orders)
    held = [o["received_at"] for o, v in zip(orders, verdicts) if "strength_shift" in fired_detectors(v)]
    assert held and held[0] == shift_at + timedelta(days=14), held


def usual_high_hydrocodone_buyer(dea: str, days: float, shift_at: datetime | None, seed: int
                                 ) -> list[dict[str, Any]]:
    """A chain pharmacy whose hydrocodone is ~64 % 10 mg: 10 mg about once a week, a 7.5 mg restock of 500
    every 3-5 weeks as its own order (so some 30-day windows hold no 7.5 mg at all). From ``shift_at`` on, over
    four weeks, the 10 mg doubles and the 7.5 mg restocks shrink to 30 %: ~92 % of the units in 10 mg, 1.35x
    the units (held-out seed 29's Hstrength_shift-041)."""
    rng = random.Random(seed)
    orders, t, restock = [], START, START + timedelta(days=rng.randint(3, 20))
    while t < START + timedelta(days=days):
        f = 0.0 if shift_at is None else min(1.0, max(0.0, (t - shift_at) / timedelta(days=28)))
        units = round(230 * (1 + f) * math.exp(rng.gauss(0, 0.15)))
        orders.append(product_order(dea, t.replace(hour=14), {HC10: units}))
        if t >= restock:
            orders.append(product_order(dea, t.replace(hour=14, minute=5), {HC75: round(500 * (1 - 0.7 * f))}))
            restock = t + timedelta(days=rng.randint(21, 35))
        t += timedelta(days=max(2.0, 7 * math.exp(rng.gauss(0, 0.15))))
    return orders


def test_a_buyer_whose_usual_share_is_already_high_shifting_the_rest_to_10_mg_is_held() -> None:
    """Usual ~64 % in 10 mg: twice that is beyond 100 %, so the share threshold never fired (the shift shipped for
    a year). Now the threshold is the usual plus half of the rest (~82 %); with ~5 orders in 30 days the binomial
    cannot rule out chance, but the 10 mg units doubled against the usual month's: held within six weeks."""
    dea = "BP2406052"
    shift_at = START + timedelta(days=300)
    orders = usual_high_hydrocodone_buyer(dea, 420, shift_at, seed=29)
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    _, verdicts = run(monitor, orders)
    held = [(o["received_at"], v) for o, v in zip(orders, verdicts) if "strength_shift" in fired_detectors(v)]
    assert held, "the shift shipped"
    at, v = held[0]
    assert shift_at < at <= shift_at + timedelta(days=42), at
    r = next(r for r in v["reasons"] if r["detector"] == "strength_shift" and r["fired"])
    assert 0.55 < r["baseline"] < 0.7 and 0.75 < r["threshold"] < 0.9 and r["value"] > r["threshold"]
    assert "usual month's" in r["explanation"]


def test_the_same_buyer_without_a_shift_is_not_held_when_a_restock_falls_outside_the_window() -> None:
    """Its 7.5 mg restocks come 3-5 weeks apart: 30-day windows with only 10 mg (share 100 % > 82 %) recur, but the
    10 mg units stay near the usual month's: not a shift."""
    for seed in (29, 30, 31):
        orders = usual_high_hydrocodone_buyer(f"BP240605{seed % 10}", 600, None, seed=seed)
        monitor = Monitor(MonitorConfig(new_customer_months=0))
        _, verdicts = run(monitor, orders)
        shares = [r for v in verdicts for r in v["reasons"]
                  if r["detector"] == "strength_shift" and "share" in r["window"] and r["value"] > r["threshold"]]
        assert shares, "no window without a 7.5 mg restock: the test does not test the guard"
        fired = [(o["received_at"], fired_detectors(v)) for o, v in zip(orders, verdicts) if fired_detectors(v)]
        assert not [f for f in fired if "strength_shift" in f[1]], fired[:3]

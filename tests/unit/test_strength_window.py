"""Issue 11: strength over a 30-day window, and the per-order ceiling of a new customer."""
from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from streams.monitoring import Monitor, MonitorConfig
from test_detectors_issue11 import START, with_strength
from test_monitoring import Habit, avro_roundtrip, fired_detectors, normal_orders, order, run

DEA = "BS3333336"


def five_mg_history(dea: str, seed: int) -> list[dict[str, Any]]:
    """90 days of ~500 OXYCODONE 5 mg tablets every 3 days."""
    rng = random.Random(seed)
    return [with_strength(o, 5.0) for o in
            normal_orders(dea, [Habit("OXYCODONE", 500, 3, sigma=0.12, restock_p=0)], 90, rng, START)]


def test_sustained_shift_to_30_mg_is_held_at_the_same_unit_count() -> None:
    history = five_mg_history(DEA, 2)
    monitor = Monitor()
    state, verdicts = run(monitor, history)
    assert all(v["verdict"] == "RELEASE" for v in verdicts)
    last = history[-1]["received_at"]
    shifted = [with_strength(order(DEA, last + timedelta(days=3 * k), {"OXYCODONE": 500}), 30.0)
               for k in range(1, 11)]
    state, verdicts = run(monitor, shifted, state)
    held = [k for k, v in enumerate(verdicts) if v["verdict"] == "HOLD"]
    assert held and held[0] <= 3, held  # held within a few orders of the shift, not a month later
    v = verdicts[held[0]]
    assert "strength_shift" in fired_detectors(v)
    r = next(r for r in v["reasons"] if r["detector"] == "strength_shift" and r["fired"])
    assert r["dimension"] == "pattern" and r["enforced"]
    assert r["baseline"] == pytest.approx(5.0, rel=0.05)  # the released first 30 mg order taught little (clipped)
    assert r["threshold"] == pytest.approx(1.5 * r["baseline"]) and r["value"] > r["threshold"]
    assert "in the last 30 days" in r["explanation"] and f"usual 30-day mix is {r['baseline']:,.2f} mg per unit" in r["explanation"]
    # No unit count moved: only the strength says it.
    assert not fired_detectors(v) & {"size", "volume_30d", "ramp", "ramp_2x"}


def test_one_strong_order_in_a_month_of_usual_ones_is_not_held() -> None:
    history = five_mg_history(DEA, 3)
    monitor = Monitor()
    state, _ = run(monitor, history)
    probe = with_strength(order(DEA, history[-1]["received_at"] + timedelta(days=3), {"OXYCODONE": 500}), 30.0)
    v = monitor.score(state, probe)
    r = next(r for r in v["reasons"] if r["detector"] == "strength_shift")
    assert not r["fired"] and r["value"] < r["threshold"] and r["value"] > 5.0
    assert v["verdict"] == "RELEASE"


def test_multi_strength_buyer_restocking_one_product_at_a_time_is_never_held() -> None:
    """5, 10, 30 mg products, one per order (30 mg: 6x one order's mg per unit of a 5 mg restock)."""
    rng = random.Random(5)
    dea = "BS4444447"
    base = normal_orders(dea, [Habit("OXYCODONE", 400, 2, sigma=0.15, restock_p=0)], 240, rng, START)
    strengths = [rng.choice((5.0, 10.0, 30.0)) for _ in base]
    orders = [with_strength(o, mg) for o, mg in zip(base, strengths)]
    monitor = Monitor(MonitorConfig(new_customer_months=0))
    _, verdicts = run(monitor, orders)
    fired = [v for v in verdicts if "strength_shift" in fired_detectors(v)]
    assert not fired, [next(r for r in v["reasons"] if r["detector"] == "strength_shift") for v in fired][:2]
    # One order's mg per unit swung past 2x the usual mix many times: the single-order test would have held.
    assert max(strengths) / (sum(strengths) / len(strengths)) > 2


def test_the_30_day_strength_round_trips_through_avro_and_old_states_decode() -> None:
    history = five_mg_history(DEA, 4)
    monitor = Monitor()
    state, _ = run(monitor, history)
    fb = state["families"]["OXYCODONE"]
    assert fb["mg_per_unit_30d"]["n"] > 0 and fb["mg_per_unit_30d"]["mean"] == pytest.approx(5.0)
    assert fb["days"]["mg"] and sum(fb["days"]["mg"]) > 0
    decoded, _ = avro_roundtrip(state)
    assert decoded["families"]["OXYCODONE"]["mg_per_unit_30d"] == fb["mg_per_unit_30d"]
    assert decoded["families"]["OXYCODONE"]["days"]["mg"] == fb["days"]["mg"]
    # A state written before the 30-day strength existed: scored, the window is "not applicable" until learned.
    old = dict(state, families={f: {**{k: v for k, v in b.items() if k != "mg_per_unit_30d"},
                                    "days": {k: v for k, v in b["days"].items() if k != "mg"}}
                                for f, b in state["families"].items()})
    probe = with_strength(order(DEA, history[-1]["received_at"] + timedelta(days=3), {"OXYCODONE": 500}), 5.0)
    v = monitor.score(old, probe)
    r = next(r for r in v["reasons"] if r["detector"] == "strength_shift")
    assert not r["fired"] and r["window"].startswith("not applicable")


# --------------------------------------------------------------------------
# new customer: one order
# --------------------------------------------------------------------------

def test_new_retail_pharmacy_is_held_on_one_order_above_its_activity_ceiling() -> None:
    monitor = Monitor()  # no peers: the activity's per-order ceiling (1,300 units for a retail pharmacy)
    dea = "BN5555550"
    ordinary = order(dea, START, {"OXYCODONE": 900})
    v = monitor.score(None, ordinary)
    assert v["verdict"] == "RELEASE"
    state = monitor.learn(None, ordinary)
    big = order(dea, START + timedelta(days=4), {"OXYCODONE": 2400})  # month 3,300: under the monthly ceiling
    v = monitor.score(state, big)
    assert v["verdict"] == "HOLD" and fired_detectors(v) & {"new_customer_order"}
    assert "new_customer" not in fired_detectors(v)  # the monthly ceiling alone would have shipped it
    r = next(r for r in v["reasons"] if r["detector"] == "new_customer_order")
    assert r["value"] == 2400 and r["threshold"] == 1300
    assert "2,400 dosage units in one order of a new customer" in r["explanation"]
    # After the period (or onboarding) the rule does not apply: same order, an established registrant.
    later = Monitor(MonitorConfig(new_customer_months=0))
    assert not [r for r in later.score(state, big)["reasons"] if r["detector"] == "new_customer_order"]

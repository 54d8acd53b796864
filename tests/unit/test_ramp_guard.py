"""Issue 11: the long-memory guard (ramp_2x), the analyst's cleared level, new customers' activity ceilings."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from streams.monitoring import Monitor, MonitorConfig
from streams.monitoring.onboarding import activity_ceilings
from tests.unit.test_cases import a_decision
from tests.unit.test_detectors_issue11 import first_hold, ramp_stream
from tests.unit.test_monitoring import order
from tests.unit.test_open_cases import T0, Pipeline, fired

DEA = "BG1234563"


@pytest.mark.parametrize("growth_to,months", [(3.0, 2), (5.0, 6), (10.0, 9)])
def test_ramp_2x_is_never_later_than_the_2x_12_month_rule(growth_to: float, months: float) -> None:
    orders = ramp_stream("BR2222228", growth_to, months)
    guard_at, v = first_hold(Monitor(MonitorConfig(hold_detectors=("ramp_2x",))), orders)
    static_at, _ = first_hold(Monitor(MonitorConfig(hold_detectors=("static_2x_12m",))), orders)
    assert static_at is not None and guard_at is not None and guard_at <= static_at
    r = next(r for r in v["reasons"] if r["detector"] == "ramp_2x")
    assert r["fired"] and r["value"] > r["threshold"] >= 2 * r["baseline"] > 0
    assert f"{r['value']:,.0f} dosage units" in r["explanation"]
    # the default learned policy holds it no later either
    learned_at, _ = first_hold(Monitor(), orders)
    assert learned_at is not None and learned_at <= static_at


def grown_store(p: Pipeline, months: int = 5) -> list[dict[str, Any]]:
    """~4,000 OXYCODONE units a month (30,000 MME) for ``months`` months, then the same store at 2.5x."""
    start = T0 - timedelta(days=30 * months)
    for i in range(10 * months):
        v = p.submit(order(DEA, start + timedelta(days=3 * i), {"OXYCODONE": 400}))
        assert v["verdict"] == "RELEASE", v["reasons"]
    return [order(DEA, T0 + timedelta(days=3 * i), {"OXYCODONE": 1000}) for i in range(20)]


def test_a_released_growth_is_cleared_and_held_again_only_well_above_it() -> None:
    p = Pipeline(Monitor(MonitorConfig(hold_detectors=("ramp_2x",))))
    grown = grown_store(p)
    verdicts = []
    held = None
    for o in grown:
        v = p.submit(o)
        verdicts.append(v)
        if v["verdict"] == "HOLD" and held is None:
            held = o
            assert "ramp_2x" in fired(v)
            p.decide(a_decision({"order_id": o["order_id"]}, "RELEASE"))  # the analyst found a real growth
    assert held is not None
    # the clearance is in the monitor's state, through the Avro changelog: the held order's month
    state = p.state(DEA)
    month = held["received_at"].year * 12 + held["received_at"].month - 1
    assert state["due_diligence"]["cleared"] == {"OXYCODONE": month}
    # the grown store is held once, not on every order until its 12-month average catches up
    after = verdicts[grown.index(held) + 1:]
    assert after and all(v["verdict"] == "RELEASE" for v in after), [fired(v) for v in after]
    # without the analyst's release every later order of the grown month would have been held
    unreleased = Pipeline(Monitor(MonitorConfig(hold_detectors=("ramp_2x",))))
    again = [unreleased.submit(o) for o in grown_store(unreleased)]
    assert sum(v["verdict"] == "HOLD" for v in again) > 3
    # a further jump far above the cleared month is held again
    last = grown[-1]["received_at"]
    jump = p.submit(order(DEA, last + timedelta(days=1), {"OXYCODONE": 20000}))
    r = fired(jump)["ramp_2x"]
    assert "cleared" in r["window"] and "an analyst cleared" in r["explanation"]


def test_ramp_2x_leaves_a_minor_non_opioid_family_to_the_other_detectors() -> None:
    monitor = Monitor(MonitorConfig(hold_detectors=("ramp_2x",)))
    state = None
    start = T0 - timedelta(days=150)
    for i in range(50):  # an alprazolam month doubling at a pharmacy that mostly orders oxycodone
        items = {"OXYCODONE": 400, "ALPRAZOLAM": 20 if i < 45 else 60}
        o = order(DEA, start + timedelta(days=3 * i), items)
        v = monitor.score(state, o)
        assert v["verdict"] == "RELEASE"
        state = monitor.learn(state, o)


def test_new_customer_ceiling_follows_its_business_activity_and_the_cleared_level() -> None:
    p = Pipeline(Monitor(MonitorConfig(new_customer_order_units=())))  # the monthly ceiling alone
    clinic = dict(order("AH1111116", T0, {"HYDROCODONE": 2000}), business_activity="HOSPITAL/CLINIC")
    assert p.submit(clinic)["verdict"] == "RELEASE"
    v = p.submit(dict(order("AH1111116", T0 + timedelta(days=2), {"HYDROCODONE": 1000}),
                      business_activity="HOSPITAL/CLINIC"))
    r = fired(v)["new_customer"]
    assert r["threshold"] == 2325 and r["value"] == 3000 and "hospital/clinic" in r["explanation"]
    # a new retail pharmacy: held above 7,300 units a month, once; after the analyst's release the ceiling
    # is 1.5x the cleared month, so the legitimate new store is not held on every order
    first = p.submit(order("BN4444440", T0, {"HYDROCODONE": 8000}))
    assert fired(first)["new_customer"]["threshold"] == 7300
    p.decide(a_decision({"order_id": first["order_id"]}, "RELEASE"))
    later = [p.submit(order("BN4444440", T0 + timedelta(days=3 + 3 * i), {"HYDROCODONE": 1000})) for i in range(4)]
    assert all(v["verdict"] == "RELEASE" for v in later), [fired(v) for v in later]
    big = p.submit(order("BN4444440", T0 + timedelta(days=16), {"HYDROCODONE": 8000}))
    assert "an analyst cleared" in fired(big)["new_customer"]["explanation"]


def test_activity_ceilings_refuse_a_malformed_item() -> None:
    assert activity_ceilings(("RETAIL PHARMACY=7300",)) == {"RETAIL PHARMACY": 7300.0}
    with pytest.raises(ValueError, match="ACTIVITY=units"):
        activity_ceilings(("RETAIL PHARMACY:7300",))
    env = {"SOM_NEW_CUSTOMER_ACTIVITY_UNITS": "RETAIL PHARMACY=5000,PRACTITIONER=900"}
    assert MonitorConfig.from_env(env).new_customer_activity_units == ("RETAIL PHARMACY=5000", "PRACTITIONER=900")


def test_ramp_too_holds_a_released_growth_again_only_well_above_the_cleared_month() -> None:
    """An analyst who released a focused growth is not asked again every month until the long memory catches up."""
    def replay(release: bool) -> tuple[Pipeline, list[dict[str, Any]], list[dict[str, Any]]]:
        p = Pipeline(Monitor(MonitorConfig(hold_detectors=("ramp",))))
        grown = grown_store(p, months=8)
        verdicts = []
        for o in grown:
            v = p.submit(o)
            verdicts.append(v)
            if v["verdict"] == "HOLD" and release:
                assert "ramp" in fired(v)
                p.decide(a_decision({"order_id": o["order_id"]}, "RELEASE"))
        return p, grown, verdicts

    _, _, unreleased = replay(False)
    assert sum(v["verdict"] == "HOLD" for v in unreleased) > 3  # held on every order of the grown months
    p, grown, verdicts = replay(True)
    held = [i for i, v in enumerate(verdicts) if v["verdict"] == "HOLD"]
    assert len(held) == 1, [fired(verdicts[i]) for i in held]  # held once: the growth step the analyst cleared
    jump = p.submit(order(DEA, grown[-1]["received_at"] + timedelta(days=1), {"OXYCODONE": 20000}))
    r = fired(jump)["ramp"]
    assert "cleared" in r["window"] and "an analyst cleared" in r["explanation"]


def _paused_growth(lapse: float) -> list[dict[str, Any]]:
    """A store held and cleared at 2.5x (June), back at its old level (July), then doubling again (August).

    Returns the August verdicts under ``ramp_2x`` alone with ``ramp_2x_cleared_lapse`` = ``lapse``.
    """
    p = Pipeline(Monitor(MonitorConfig(hold_detectors=("ramp_2x",), ramp_2x_cleared_lapse=lapse)))
    grown_store(p)  # ~4,000 units a month until T0 (June 1st)
    released = False
    for i in range(10):  # June: ~10,000 units; the first hold is released by the analyst
        o = order(DEA, T0 + timedelta(days=3 * i), {"OXYCODONE": 1000})
        if p.submit(o)["verdict"] == "HOLD" and not released:
            p.decide(a_decision({"order_id": o["order_id"]}, "RELEASE"))
            released = True
    assert released
    for i in range(10):  # July: back at ~4,000
        assert p.submit(order(DEA, T0 + timedelta(days=30 + 3 * i), {"OXYCODONE": 400}))["verdict"] == "RELEASE"
    return [p.submit(order(DEA, T0 + timedelta(days=61 + 3 * i), {"OXYCODONE": 1100})) for i in range(10)]


def test_a_clearance_lapses_when_the_buyer_falls_back_and_its_next_doubling_is_held() -> None:
    """A growth step the analyst cleared but the buyer did not keep: its next doubling is judged afresh.

    August's ~11,000 units are over 2x the store's trailing average (the 2x rule holds them) but under 1.5x
    the cleared June month. With the clearance lasting 12 months the guard waits for 15,000, later than the
    rule; once July fell under ``ramp_2x_cleared_lapse`` x June, it holds August as the rule does.
    """
    lapsed = _paused_growth(0.67)
    held = [v for v in lapsed if v["verdict"] == "HOLD"]
    assert held and "cleared" not in fired(held[0])["ramp_2x"]["window"]
    assert all(v["verdict"] == "RELEASE" for v in _paused_growth(0.0))  # without the lapse: still cleared

"""Issue 11: ramp and ramp_2x judge a month at the buyer's own cadence (a monthly orderer's two orders in one
calendar month are its usual demand; larger orders, or orders faster than its cadence, are still growth)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from streams.monitoring import Monitor, MonitorConfig
from test_detectors_issue11 import first_hold
from test_monitoring import fired_detectors, order

DEA = "BM3333331"
SIZES = (4400, 4300, 4500, 4350, 4450, 4400, 4300, 4500, 4400, 4350, 4450, 4400, 4300, 4500, 4400)


def monthly_orderer(factors: tuple[float, ...] = ()) -> list[dict[str, Any]]:
    """~4,400 OXYCODONE units (6,600 MME) on the first of every month for 15 months, the last on 1 March 2025;
    then an order every 28 days (the first of them on 29 March: two orders in March), its size the usual times
    each ``factors`` item (1.07 without: an ordinary order)."""
    out = [order(DEA, datetime(2024 + (i // 12), i % 12 + 1, 1, 14, tzinfo=timezone.utc), {"OXYCODONE": units})
           for i, units in enumerate(SIZES)]
    t = out[-1]["received_at"]
    for f in factors or (1.07,):
        t += timedelta(days=28)
        out.append(order(DEA, t, {"OXYCODONE": round(4400 * f)}))
    return out


def two_in_one_month(orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The orders that are the second of their calendar month (the ones the calendar alone doubled)."""
    seen: set[tuple[int, int]] = set()
    second = []
    for o in orders:
        key = (o["received_at"].year, o["received_at"].month)
        if key in seen:
            second.append(o)
        seen.add(key)
    return second


def replay(monitor: Monitor, orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
    state, verdicts = None, []
    for o in orders:
        v = monitor.score(state, o, decided_at=o["received_at"])
        verdicts.append(v)
        if v["verdict"] == "RELEASE":
            state = monitor.learn(state, o)
    return verdicts


def test_a_monthly_orderers_two_orders_in_one_month_are_not_held() -> None:
    orders = monthly_orderer()
    doubled = two_in_one_month(orders)
    assert doubled, "the stream has a calendar month with two orders"
    # the plain 2x-12-month rule holds such a month: two ordinary orders are over 2x its monthly average
    static = replay(Monitor(MonitorConfig(hold_detectors=("static_2x_12m",))), orders)
    assert any(v["verdict"] == "HOLD" for o, v in zip(orders, static) if o in doubled)
    verdicts = replay(Monitor(MonitorConfig(hold_detectors=("ramp", "ramp_2x"))), orders)
    held = [(o["received_at"].date(), fired_detectors(v)) for o, v in zip(orders, verdicts) if v["verdict"] == "HOLD"]
    assert not held, held
    # the finding says the month was read at the buyer's cadence
    guard = next(r for o, v in zip(orders, verdicts) if o is doubled[-1]
                 for r in v["reasons"] if r["detector"] == "ramp_2x")
    assert not guard["fired"] and guard["value"] > 2 * guard["baseline"]
    assert "at its cadence" in guard["window"] and guard["threshold"] > guard["value"]


def test_a_ramp_at_a_monthly_orderer_is_still_held_no_later_than_the_2x_12_month_rule() -> None:
    orders = monthly_orderer((1.6, 2.0, 2.5, 3.0, 3.5))  # the calendar doubles March: 1.6x orders held there
    learned_at, v = first_hold(Monitor(MonitorConfig(new_customer_months=0)), orders)  # an established buyer
    static_at, _ = first_hold(Monitor(MonitorConfig(hold_detectors=("static_2x_12m",))), orders)
    assert learned_at is not None and static_at is not None
    assert learned_at <= static_at, (learned_at, static_at)
    assert learned_at >= orders[len(SIZES)]["received_at"], "held in the ramp, not in the ordinary history"
    assert {"ramp", "ramp_2x"} & set(fired_detectors(v))


def test_a_bigger_order_beside_an_ordinary_one_is_growth_not_the_calendar() -> None:
    """Every ordering day must be about the usual size for the calendar's extra day to be forgiven.

    March holds the ordinary 1 March order and a 1.35x one on the 29th: on average 1.17x a usual day (under
    the 1.25x allowance), but the 29th alone is over it. The 2x rule holds March; so must the learned policy.
    """
    orders = monthly_orderer((1.35,))
    learned_at, v = first_hold(Monitor(MonitorConfig(new_customer_months=0)), orders)
    static_at, _ = first_hold(Monitor(MonitorConfig(hold_detectors=("static_2x_12m",))), orders)
    assert static_at == orders[-1]["received_at"]
    assert learned_at == static_at and "ramp_2x" in fired_detectors(v)

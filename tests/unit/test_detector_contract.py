"""The contract every registered detector obeys, checked the same way for each (issue 13, item 7).

In the style of river's ``check_estimator``: one set of checks, parametrized over
every detector the monitor registers (its detectors, the anomaly combiner and the
due-diligence findings), so a new detector is checked without writing a test:

* a finding that fires has its value beyond its threshold;
* a fired finding's explanation states the numbers of its fields (value and
  threshold, as the detectors render them: ``1,234``, ``1.5``, ``40%``);
* it never fires on a registrant's own typical order.

The first two run over a labelled scenario (ramps, spikes, bursts, strength
shifts, surges, new registrants) scored with peer profiles and customer limits,
plus probes at its end (a burst, a family never ordered, an order at 03:00 on a
Sunday), so that most detectors fire. A detector that fired nowhere is skipped
for those two checks, with a reason naming it.
"""
from __future__ import annotations

import copy
import re
import statistics
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from streams.tools.scenarios import generate
from streams.tools.evaluation import train_peers
from streams.monitoring import Monitor, MonitorConfig
from streams.monitoring import open_cases
from streams.monitoring.detectors import fmt_n, fmt_pct, fmt_r
from tests.unit.test_monitoring import Habit, normal_orders, order

#: Findings that state a due-diligence status (a case, a report, a terminated relationship), not a measurement:
#: their value is a flag or a count of held orders and their explanation names the case instead.
STATUS_FINDINGS = (open_cases.OPEN_CASE, open_cases.REPORTED_PENDING_LIMIT, open_cases.TERMINATED_CUSTOMER)
DUE_DILIGENCE_FINDINGS = STATUS_FINDINGS + (open_cases.ANALYST_LIMIT,)


def registered(monitor: Monitor) -> list[str]:
    """Every finding name a verdict of ``monitor`` can carry."""
    names = [d.name for d in monitor.detectors] + ([monitor.combiner.name] if monitor.combiner else [])
    return names + [n for n in DUE_DILIGENCE_FINDINGS if n not in names]


DETECTORS = registered(Monitor(MonitorConfig()))


# ----------------------------------------------------------------------------- the stream the checks read
def score_all(monitor: Monitor, orders: list[dict[str, Any]], live: dict[str, Any]) -> list[dict[str, Any]]:
    """Score each order on live baselines as the agent does (learn what is released; a hold opens its case)."""
    verdicts = []
    for o in orders:
        dea = o["purchaser_dea"]
        base = live.get(dea) or live.setdefault(dea, monitor.baselines(None, dea))
        v = monitor.score(base, o, decided_at=o["received_at"])
        if v["verdict"] == "RELEASE":
            monitor.learn_into(base, o)
        monitor.note_verdict(base, o, dict(v, received_at=o["received_at"]))
        verdicts.append(v)
    return verdicts


def _again(o: dict[str, Any], at: datetime, lines: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A copy of order ``o`` received at ``at`` (other lines if given), under a new order id."""
    new = copy.deepcopy(o)
    new.update(order_id=str(uuid.uuid4()), received_at=at, signed_at=at - timedelta(minutes=5), verified_at=at)
    if lines is not None:
        new["lines"] = copy.deepcopy(lines)
    return new


def probes(orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """After the stream: for a few registrants a burst of six orders in three hours, a family they never
    ordered, and an order at 03:00 on a Sunday."""
    last = max(o["received_at"] for o in orders)
    by_dea: dict[str, list[dict[str, Any]]] = {}
    for o in orders:
        by_dea.setdefault(o["purchaser_dea"], []).append(o)
    busiest = sorted(by_dea, key=lambda d: -len(by_dea[d]))[:4]
    sunday = (last + timedelta(days=7 - last.weekday())).replace(hour=3, minute=0) + timedelta(days=6)
    out = []
    for k, dea in enumerate(busiest):
        mine = by_dea[dea]
        start = last + timedelta(days=1 + k)
        out += [_again(mine[-1], start + timedelta(minutes=30 * i)) for i in range(6)]
        families = {ln["drug_family"] for o in mine for ln in o["lines"]}
        foreign = next(ln for o in orders for ln in o["lines"] if ln["drug_family"] not in families)
        out.append(_again(mine[-1], start + timedelta(days=2), [dict(foreign, line_no=1)]))
        out.append(_again(mine[-2], sunday + timedelta(days=7 * k)))
    return sorted(out, key=lambda o: o["received_at"])


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every finding of every verdict over the scenario and the probes."""
    scn = generate(seed=3, n_registrants=24, days=330)
    orders = list(scn.orders)
    limits = tmp_path_factory.mktemp("limits") / "customer-limits.csv"
    rows = {(ln["drug_family"], o["purchaser_dea"]) for o in orders[-200:] for ln in o["lines"]}
    limits.write_text("dea_number,drug_family,monthly_units\n" + "".join(
        f"{dea},{fam},100\n" for fam, dea in sorted(rows)[:6]))
    monitor = Monitor(MonitorConfig(customer_limits=str(limits)), peers=train_peers(11, n_registrants=40, days=240))
    assert registered(monitor) == DETECTORS
    live: dict[str, Any] = {}
    verdicts = score_all(monitor, orders, live) + score_all(monitor, probes(orders), live)
    return [r for v in verdicts for r in v["reasons"]]


def fired_of(findings: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    fired = [r for r in findings if r["detector"] == name and r["fired"]]
    if not fired:
        pytest.skip(f"{name} fired nowhere in the check's stream")
    return fired


# ----------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("name", DETECTORS)
def test_a_finding_that_fires_is_beyond_its_threshold(findings: list[dict[str, Any]], name: str) -> None:
    wrong = [r for r in fired_of(findings, name) if not r["value"] > r["threshold"]]
    assert not wrong, f"{len(wrong)} fired {name} findings not beyond the threshold, e.g. {wrong[0]}"


_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?%?")


def renderings(x: float) -> set[str]:
    """How the explanations write a number: units, rates, ratios, shares (a rarity as its complement)."""
    return {fmt_n(x), fmt_r(x), f"{x:g}", f"{x:.2f}", fmt_pct(x), fmt_pct(1 - x)}


def states(explanation: str, x: float) -> bool:
    return bool(renderings(x) & set(_NUMBER.findall(explanation)))


def states_threshold(explanation: str, x: float) -> bool:
    """The threshold as a number; a zero threshold (a rule that fires on any amount) may be said in words."""
    return states(explanation, x) or (x == 0 and "any quantity" in explanation)


@pytest.mark.parametrize("name", [n for n in DETECTORS if n not in STATUS_FINDINGS])
def test_a_fired_finding_explains_its_own_numbers(findings: list[dict[str, Any]], name: str) -> None:
    wrong = [r for r in fired_of(findings, name)
             if not (states(r["explanation"], r["value"]) and states_threshold(r["explanation"], r["threshold"]))]
    assert not wrong, (f"{len(wrong)} fired {name} findings whose explanation does not state their value "
                       f"and threshold, e.g. {wrong[0]}")


# ----------------------------------------------------------------------------- a registrant's typical order
@pytest.fixture(scope="module")
def typical() -> dict[str, Any]:
    """The verdict on a steady pharmacy's typical order: its median OXYCODONE order, on a weekday at its usual
    hour, a usual gap after its last order, early in a month (a month's units are not yet above any month's)."""
    import random

    monitor = Monitor(MonitorConfig())
    dea = "BT1234563"
    history = normal_orders(dea, [Habit("OXYCODONE", 500, 3, sigma=0.12, restock_p=0.0),
                                  Habit("ALPRAZOLAM", 200, 7, sigma=0.12, restock_p=0.0)],
                            300, random.Random(5), start=datetime(2025, 3, 4, tzinfo=timezone.utc))
    history = [o for o in history if o["received_at"] < datetime(2026, 1, 1, tzinfo=timezone.utc)]
    live: dict[str, Any] = {}
    verdicts = score_all(monitor, history, live)
    assert all(v["verdict"] == "RELEASE" for v in verdicts[-60:]), "the steady history itself must be released"
    oxy = [o for o in history if o["lines"][0]["drug_family"] == "OXYCODONE"]
    units = round(statistics.median(o["lines"][0]["dosage_units"] for o in oxy))
    hour = round(statistics.median(o["received_at"].hour for o in oxy))
    at = datetime(2026, 1, 2, hour, 15, tzinfo=timezone.utc)  # a Friday, 1-4 days after its last order
    return score_all(monitor, [order(dea, at, {"OXYCODONE": units})], live)[0]


@pytest.mark.parametrize("name", DETECTORS)
def test_a_detector_never_fires_on_a_registrants_typical_order(typical: dict[str, Any], name: str) -> None:
    scored = {r["detector"] for r in typical["reasons"]}
    # Every detector judges the order (the due-diligence findings and the new-customer ceiling only speak
    # when there is something pending or the registrant is new (monthly and per-order); this one has neither).
    assert name in scored or name in DUE_DILIGENCE_FINDINGS + ("new_customer", "new_customer_order"), f"{name} did not judge the order"
    fired = [r["explanation"] for r in typical["reasons"] if r["detector"] == name and r["fired"]]
    assert not fired, f"{name} fired on the registrant's own typical order: {fired}"

"""Peer profiles (reference data): the estimator, its Avro file, cold start and deviation from peers."""
from __future__ import annotations

import math
import random
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from streams.monitoring import Monitor, MonitorConfig
from streams.monitoring.peers import ANY_REGION, LogHistogram, PeerProfiles, build_profiles

from test_monitoring import held, order
from test_reference_rules import finding, history, month_start

T0 = datetime(2025, 1, 6, 15, 0, tzinfo=timezone.utc)


def peer_orders(n_registrants: int, units: float, activity: str = "RETAIL PHARMACY", state: str | None = "OH",
                family: str = "OXYCODONE", months: int = 6, seed: int = 3, prefix: str = "BP") -> list[dict[str, Any]]:
    """Each registrant orders ~``units`` of ``family`` weekly for ``months`` months (lognormal noise)."""
    rng = random.Random(seed)
    out = []
    for k in range(n_registrants):
        dea = f"{prefix}{k:07d}"
        for w in range(months * 4 + 2):
            o = order(dea, T0 + timedelta(days=7 * w, hours=k % 5), {family: max(1, round(units * math.exp(rng.gauss(0, 0.2))))})
            o["business_activity"] = activity
            if state:
                o["purchaser_state"] = state
            out.append(o)
    return out


@pytest.fixture(scope="module")
def profiles() -> PeerProfiles:
    """20 retail pharmacies in OH ordering ~400 OXYCODONE a week; 20 in TX ordering ~2,000."""
    return build_profiles(peer_orders(20, 400, state="OH") + peer_orders(20, 2000, state="TX", prefix="BT", seed=4),
                          "test")


# --------------------------------------------------------------------------- the estimator
def test_log_histogram_quantiles_are_within_half_a_bin_of_exact() -> None:
    rng = random.Random(5)
    xs = [math.exp(rng.gauss(6.0, 0.8)) for _ in range(5000)]
    h = LogHistogram()
    for x in xs:
        h.learn_one(x)
    xs.sort()
    for q in (0.5, 0.9, 0.99):
        exact = xs[int(q * (len(xs) - 1))]
        assert abs(math.log(h.quantile(q)) - math.log(exact)) <= 0.051 + 1e-9, q


def test_log_histograms_merge_exactly() -> None:
    rng = random.Random(6)
    xs = [rng.uniform(1, 10_000) for _ in range(300)]
    a, b, whole = LogHistogram(), LogHistogram(), LogHistogram()
    for i, x in enumerate(xs):
        (a if i % 2 else b).learn_one(x)
        whole.learn_one(x)
    merged = a.merge(b)
    assert merged.bins == whole.bins and merged.n == whole.n == 300


def test_profiles_group_by_activity_region_and_family(profiles: PeerProfiles) -> None:
    oh = profiles.groups[("RETAIL PHARMACY", "OH", "OXYCODONE")]
    tx = profiles.groups[("RETAIL PHARMACY", "TX", "OXYCODONE")]
    every = profiles.groups[("RETAIL PHARMACY", ANY_REGION, "OXYCODONE")]
    assert (oh.registrants, tx.registrants, every.registrants) == (20, 20, 40)
    assert 330 < oh.order_units.quantile(0.5) < 480 and 1650 < tx.order_units.quantile(0.5) < 2400
    # weekly ~400 -> ~1,700 a month; first and last (partial) months of each registrant are left out
    assert 1300 < oh.monthly_units.quantile(0.5) < 2300
    assert every.order_units.n == oh.order_units.n + tx.order_units.n
    assert oh.monthly_units.n == 20 * (len({(T0 + timedelta(days=7 * w)).month for w in range(26)}) - 2)


def test_lookup_prefers_region_then_all_regions_and_needs_enough_registrants(profiles: PeerProfiles) -> None:
    assert profiles.lookup("retail pharmacy", "oh", "OXYCODONE").region == "OH"
    assert profiles.lookup("RETAIL PHARMACY", "CA", "OXYCODONE").region == ANY_REGION  # no CA peers
    assert profiles.lookup("RETAIL PHARMACY", None, "OXYCODONE").region == ANY_REGION
    assert profiles.lookup("HOSPITAL/CLINIC", "OH", "OXYCODONE") is None
    assert profiles.lookup(None, "OH", "OXYCODONE") is None
    small = build_profiles(peer_orders(3, 400), "small")
    assert small.lookup("RETAIL PHARMACY", "OH", "OXYCODONE") is None  # 3 < min_registrants


def test_profiles_roundtrip_through_their_avro_file(profiles: PeerProfiles, tmp_path: Path) -> None:
    path = tmp_path / "peers.avro"
    profiles.save(path)
    assert path.read_bytes()[:2] == b"\xc3\x01"
    back = PeerProfiles.load(path)
    assert back.digest() == profiles.digest() and back.source == "test"
    k = ("RETAIL PHARMACY", "OH", "OXYCODONE")
    assert back.groups[k].monthly_units.bins == profiles.groups[k].monthly_units.bins


# --------------------------------------------------------------------------- cold start against peers
def new_customer(units: int, state: str = "OH") -> dict[str, Any]:
    o = order("BN1234563", T0 + timedelta(days=200), {"OXYCODONE": units})
    o["purchaser_state"] = state
    return o


def test_new_customer_is_judged_against_its_peers_not_the_fixed_ceiling(profiles: PeerProfiles) -> None:
    monitor = Monitor(peers=profiles)
    oh = profiles.groups[("RETAIL PHARMACY", "OH", "OXYCODONE")]
    limit = 2.0 * oh.order_units.quantile(0.99)
    assert limit < 8000  # far below the fixed new-customer ceiling
    v = monitor.score(None, new_customer(round(limit * 1.5)))
    assert v["verdict"] == "HOLD", v["reasons"]
    r = finding(v, "size")
    assert r["fired"] and r["threshold"] == pytest.approx(limit) and r["baseline"] == pytest.approx(limit / 2)
    assert "RETAIL PHARMACY in OH (20 registrants)" in r["explanation"] and "peers" in r["window"]
    assert f"{r['threshold']:,.0f}" in r["explanation"] and f"{r['value']:,.0f}" in r["explanation"]
    assert monitor.score(None, new_customer(round(limit * 0.8)))["verdict"] == "RELEASE"
    # a Texas pharmacy's peers order five times as much: the same order is ordinary there
    assert monitor.score(None, new_customer(round(limit * 1.5), state="TX"))["verdict"] == "RELEASE"
    # without peers the ceilings of its business activity apply (SOM_NEW_CUSTOMER_ORDER_UNITS: a retail
    # pharmacy's one order above 1,300 units), not the peers' numbers
    alone = Monitor().score(None, new_customer(round(limit * 1.5)))
    fired = {r["detector"]: r for r in alone["reasons"] if r["fired"]}
    assert alone["verdict"] == "HOLD" and "new_customer_order" in fired, alone["reasons"]
    assert "peers" not in fired["new_customer_order"]["window"]
    assert fired["new_customer_order"]["threshold"] != pytest.approx(limit)


# --------------------------------------------------------------------------- deviation from peers
def test_established_registrant_far_above_its_peers_is_recorded_and_holds_when_enforced(
        profiles: PeerProfiles) -> None:
    oh = profiles.groups[("RETAIL PHARMACY", "OH", "OXYCODONE")]
    level = oh.monthly_units.quantile(0.9)
    # its own history is already high (10x peers), so its own baselines see nothing unusual
    monitor = Monitor(peers=profiles)
    dea = "BR1234563"
    hist = {back: round(10 * level) for back in range(1, 9)}
    state = history(monitor, hist, per_month=4)

    def oh_order(units: int) -> dict[str, Any]:
        o = order(dea, month_start(0) + timedelta(days=5), {"OXYCODONE": units})
        o["purchaser_state"] = "OH"
        return o

    v = monitor.score(state, oh_order(round(2.5 * level)))
    r = finding(v, "peer_volume")
    assert r["fired"] and not r["enforced"] and v["verdict"] == "RELEASE", held(v)
    assert r["baseline"] == pytest.approx(level) and r["threshold"] == pytest.approx(3 * level)
    assert r["value"] > r["threshold"]
    nums = [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*", r["explanation"])]
    assert round(r["value"]) in nums and round(r["threshold"]) in nums and round(level) in nums
    enforced = Monitor(MonitorConfig(hold_detectors=("peer_volume",)), peers=profiles)
    assert enforced.score(state, oh_order(round(2.5 * level)))["verdict"] == "HOLD"
    # a registrant at its peers' level is not flagged
    small = history(monitor, {back: round(level) for back in range(1, 9)}, per_month=4)
    assert not finding(monitor.score(small, oh_order(round(level / 4))), "peer_volume")["fired"]
    # without peers the detector is not applicable
    r0 = finding(Monitor().score(state, oh_order(round(2.5 * level))), "peer_volume")
    assert not r0["fired"] and r0["window"].startswith("not applicable")


def test_monitor_loads_peers_from_env_path_and_names_them_in_model_version(
        profiles: PeerProfiles, tmp_path: Path) -> None:
    path = tmp_path / "peers.avro"
    profiles.save(path)
    m = Monitor(MonitorConfig.from_env({"SOM_PEER_PROFILES": str(path)}))
    assert m.peers is not None and m.peers.digest() == profiles.digest()
    assert profiles.digest() in m.model_version and profiles.digest() not in Monitor().model_version
    with pytest.raises(FileNotFoundError, match="SOM_PEER_PROFILES"):
        Monitor(MonitorConfig(peer_profiles=str(tmp_path / "missing.avro")))


# --------------------------------------------------------------------------- trend: focused growth is held earlier
def test_growth_focused_on_one_family_and_above_peers_is_held_at_3x_but_an_expansion_is_not(
        profiles: PeerProfiles) -> None:
    monitor = Monitor(peers=profiles)
    level = 4 * round(profiles.groups[("RETAIL PHARMACY", "OH", "OXYCODONE")].monthly_units.quantile(0.9) / 4)
    dea = "BR1234563"

    def scored(alprazolam_growth: float, peers: bool = True) -> dict[str, Any]:
        """Ten flat months (OXYCODONE weekly, ALPRAZOLAM every other week), then a month where
        OXYCODONE runs at 3.5x and ALPRAZOLAM at ``alprazolam_growth`` x; score the month's last OXYCODONE."""
        m = monitor if peers else Monitor()

        def day(back: int, d: int) -> datetime:
            return month_start(back) - timedelta(days=9) + timedelta(days=d)  # the 1st + d days

        past = [order(dea, day(b, 7 * k), {"OXYCODONE": level // 4}) for b in range(1, 11) for k in range(4)]
        past += [order(dea, day(b, 14 * k), {"ALPRAZOLAM": 500}) for b in range(1, 11) for k in range(2)]
        past += [order(dea, day(0, 7 * k), {"OXYCODONE": round(3.5 * level / 4)}) for k in range(3)]
        past += [order(dea, day(0, 14 * k), {"ALPRAZOLAM": round(500 * alprazolam_growth)}) for k in range(2)]
        state = None
        for o in sorted(past, key=lambda o: o["received_at"]):
            state = m.learn(state, o)
        o = order(dea, day(0, 19), {"OXYCODONE": round(3.5 * level / 4)})
        o["purchaser_state"] = "OH"
        return m.score(state, o)

    focused = finding(scored(1.0), "trend")
    assert focused["fired"] and focused["enforced"] and focused["threshold"] == pytest.approx(3 * level)
    # February's last weekly order and March's four, this one included
    assert focused["value"] == pytest.approx(level // 4 + 4 * round(3.5 * level / 4))
    assert "concentrated in OXYCODONE" in focused["explanation"] and "(3x)" in focused["explanation"]
    # every family grew alike (a store expansion): the usual 5x applies and 3.75x is within it
    spread = finding(scored(3.5), "trend")
    assert not spread["fired"] and spread["threshold"] == pytest.approx(5 * level)
    # without peer profiles the focused threshold is not used
    assert not finding(scored(1.0, peers=False), "trend")["fired"]


# --------------------------------------------------------------------------- production history (ClickHouse rows)
def test_released_clickhouse_rows_become_orders_with_activity_and_state(tmp_path: Path) -> None:
    from streams.apps.peer_history import orders_from_rows, registrant_directory

    csv_path = tmp_path / "registrants.csv"
    csv_path.write_text("dea_number,name,business_activity,state\nBP0000001,A,Retail Pharmacy,oh\n")
    ms = int(T0.timestamp() * 1000)
    rows = [["o1", "BP0000001", ms, "OXYCODONE", 400, 600.0], ["o1", "BP0000001", ms, "ALPRAZOLAM", 90, 0.0],
            ["o2", "BX0000002", ms + 1000, "OXYCODONE", 100, 150.0]]
    orders = list(orders_from_rows(rows, registrant_directory(csv_path)))
    assert [o["order_id"] for o in orders] == ["o1", "o2"]
    assert orders[0]["business_activity"] == "RETAIL PHARMACY" and orders[0]["purchaser_state"] == "OH"
    assert {ln["drug_family"]: ln["dosage_units"] for ln in orders[0]["lines"]} == {"OXYCODONE": 400, "ALPRAZOLAM": 90}
    assert orders[1]["business_activity"] is None  # not in the directory: no peer group
    p = build_profiles(orders, "ch", min_registrants=1)
    assert set(p.groups) == {("RETAIL PHARMACY", r, f) for r in (ANY_REGION, "OH") for f in ("OXYCODONE", "ALPRAZOLAM")}


# --------------------------------------------------------------------------- coverage (csos peers build)
def test_coverage_names_uncovered_families_and_groups_too_small(profiles: PeerProfiles) -> None:
    """`csos peers build` says where the monitor has no peer baseline and falls back to fixed ceilings."""
    from streams.monitoring.peers import coverage, describe_coverage
    thin = build_profiles(peer_orders(20, 400) + peer_orders(3, 50, activity="HOSPITAL/CLINIC", prefix="FH",
                                                             family="HYDROCODONE"), "test")
    cov = coverage(thin, {"OXYCODONE", "HYDROCODONE", "FENTANYL"})
    assert cov["covered_families"] == ["OXYCODONE"]
    assert cov["uncovered_families"] == ["FENTANYL", "HYDROCODONE"]
    assert cov["thin_groups"] == [("HOSPITAL/CLINIC", "HYDROCODONE", 3)]
    text = describe_coverage(cov)
    assert "FENTANYL, HYDROCODONE" in text and "HOSPITAL/CLINIC / HYDROCODONE: 3 registrant(s)" in text

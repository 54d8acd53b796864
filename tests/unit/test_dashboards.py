"""The analysts' dashboards against an embedded ClickHouse loaded with known rows.

Orders, verdicts and case events go through the real sink (``ClickHouseSink``), so the materialized views of
``017_dashboard_aggregates.sql`` fill as they do in production; rejections, dead letters, reports and shipments
are inserted directly. The tests assert the aggregates, the filters and the growth ranking that
``streams/apps/review/dashboard.py`` computes with the queries of ``dashboard_sql.py``, then the pages over HTTP
(login required, filters refused with a reason, the CSP header).
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from connectors.clickhouse.sink import ClickHouseSink, SourceRecord
from connectors.clickhouse.client import apply_ddl
from connectors.clickhouse.client import open_client
from connectors.clickhouse.client import run_readonly_query
from connectors.clickhouse.sql_guard import check_select
from clickhouse_connect.driver.binding import finalize_query
from connectors.kafka import catalogue as t
from streams.core.config import Settings
from streams.apps.review import dashboard as d
from streams.apps.review import dashboard_sql
from streams.apps.review.auth import UserStore
from streams.apps.review.data import ReviewData
from streams.apps.review.server import create_app as create_review_app
from streams.apps.review.web import ReviewConfig
from connectors.kafka.testing import MemoryPublisher as RecordingPublisher  # Kafka in memory (logins are audited)

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
NOW = datetime.now(timezone.utc).replace(microsecond=0)
TODAY = NOW.date()
GROWER, STEADY, STEADY2, HOSPITAL = "AG0000001", "AS0000002", "AS0000003", "BH0000004"
PEERS = {GROWER: ("RETAIL PHARMACY", "TX"), STEADY: ("RETAIL PHARMACY", "TX"), STEADY2: ("RETAIL PHARMACY", "TX"),
         HOSPITAL: ("HOSPITAL/CLINIC", "CA")}
OXY, HYDRO = "OXYCODONE", "HYDROCODONE"
HELD_ID, OVERDUE_ID, CLOSED_ID, REPORTED_ID, UNREPORTED_ID = "held-1", "overdue-1", "closed-1", "rep-1", "rep-2"
PASSWORD = "dashboards are read only"


def _order(oid: str, dea: str, at: datetime, family: str, units: int) -> dict[str, Any]:
    activity, state = PEERS[dea]
    line = {"line_no": 1, "ndc": "00406-0512-01", "product_name": f"{family} 10MG TAB", "strength": "10 MG",
            "package_quantity": 100, "packages": max(1, units // 100), "dosage_units": units, "schedule": "2",
            "drug_family": family, "base_weight_g": units * 0.01, "mme": units * 1.5}
    return {"order_id": oid, "order_number": oid.upper(), "purchaser_dea": dea, "purchaser_name": dea,
            "supplier_dea": "PK0070297", "signed_at": at, "received_at": at, "verified_at": at, "signer_serial": "ab",
            "signer_fingerprint": "cd", "business_activity": activity, "purchaser_state": state, "lines": [line]}


def _verdict(order: dict[str, Any], hold: bool) -> dict[str, Any]:
    family, units = order["lines"][0]["drug_family"], order["lines"][0]["dosage_units"]
    reason = {"detector": "size", "dimension": "size", "drug_family": family, "value": float(units),
              "baseline": 100.0, "threshold": 700.0, "window": "EW mean", "fired": hold, "enforced": True,
              "explanation": "big" if hold else ""}
    return {"order_id": order["order_id"], "order_number": order["order_number"],
            "purchaser_dea": order["purchaser_dea"], "verdict": "HOLD" if hold else "RELEASE",
            "decided_at": order["received_at"], "received_at": order["received_at"], "signed_at": order["signed_at"],
            "model_version": "t", "reasons": [reason], "lines": order["lines"], "total_dosage_units": units}


def _case(order: dict[str, Any], kind: str, status: str, version: int, actor: str = "case-agent"
          ) -> dict[str, Any]:
    held_at = order["received_at"]
    return {"event_id": f"{order['order_id']}-{version}", "order_id": order["order_id"],
            "order_number": order["order_number"], "purchaser_dea": order["purchaser_dea"], "kind": kind,
            "status": status, "version": version, "at": held_at + timedelta(hours=version), "held_at": held_at,
            "due_at": held_at + timedelta(days=7), "escalated_at": None, "actor": actor,
            "decision_id": None if kind == "OPENED" else f"d-{order['order_id']}", "rationale": "checked",
            "evidence_notes": "", "error": "", "summary": "Held: size",
            "drug_families": [order["lines"][0]["drug_family"]],
            "total_dosage_units": order["lines"][0]["dosage_units"]}


def _history() -> list[tuple[dict[str, Any], bool]]:
    """90 days: every registrant orders every 6 days up to 33 days ago, then 20, 15, 9 and 3 days ago (inside the
    growth ranking's last four weeks, whatever today's weekday); the grower's OXYCODONE is 10x in those, the
    hospital's HYDROCODONE 2x; the grower's order 2 days ago is held (size), as are four more for the cases."""
    orders: list[tuple[dict[str, Any], bool]] = []
    for k, days_ago in enumerate([87 - 6 * k for k in range(10)] + [20, 15, 9, 3]):
        at = NOW - timedelta(days=days_ago)
        recent = days_ago < 30
        orders.append((_order(f"g-{k}", GROWER, at, OXY, 1000 if recent else 100), False))
        orders.append((_order(f"s-{k}", STEADY, at, OXY, 100), False))
        orders.append((_order(f"t-{k}", STEADY2, at, OXY, 200), False))
        orders.append((_order(f"h-{k}", HOSPITAL, at, HYDRO, 200 if recent else 100), False))
    orders.append((_order(HELD_ID, GROWER, NOW - timedelta(days=2), OXY, 5000), True))
    orders.append((_order(OVERDUE_ID, STEADY, NOW - timedelta(days=9), OXY, 4000), True))
    orders.append((_order(CLOSED_ID, HOSPITAL, NOW - timedelta(days=5), HYDRO, 1000), True))
    orders.append((_order(REPORTED_ID, GROWER, NOW - timedelta(days=4), OXY, 6000), True))
    orders.append((_order(UNREPORTED_ID, GROWER, NOW - timedelta(days=4, hours=1), OXY, 6000), True))
    return orders


def _records() -> list[SourceRecord]:
    records = []
    orders = _history()
    for i, (order, hold) in enumerate(orders):
        records.append(SourceRecord(t.VERIFIED, 0, i, "csos.orders.VerifiedOrder", order))
        records.append(SourceRecord(t.VERDICTS, 0, i, "som.Verdict", _verdict(order, hold)))
    by_id = {o["order_id"]: o for o, _ in orders}
    events = [_case(by_id[HELD_ID], "OPENED", "HELD", 1), _case(by_id[OVERDUE_ID], "OPENED", "HELD", 1),
              _case(by_id[CLOSED_ID], "OPENED", "HELD", 1), _case(by_id[CLOSED_ID], "RELEASED", "RELEASED", 2, "carol"),
              _case(by_id[REPORTED_ID], "OPENED", "HELD", 1), _case(by_id[REPORTED_ID], "REPORTED", "REPORTED", 2, "dave"),
              _case(by_id[UNREPORTED_ID], "OPENED", "HELD", 1),
              _case(by_id[UNREPORTED_ID], "REPORTED", "REPORTED", 2, "dave")]
    records += [SourceRecord(t.CASES, 0, i, "som.CaseEvent", ev) for i, ev in enumerate(events)]
    return records


def _insert_small_tables(client: Any) -> None:
    day = lambda n: NOW - timedelta(days=n)  # noqa: E731
    client.insert("rejections", [["r1", day(3), day(3), "CERT_REVOKED", "revoked", None, None, None, []],
                                 ["r2", day(3), day(3), "BAD_SIGNATURE", "bad", None, None, None, []],
                                 ["r3", day(5), day(5), "CERT_REVOKED", "revoked", None, None, None, []]],
                  column_names=["order_id", "received_at", "rejected_at", "reason_code", "reason", "order_number",
                                "purchaser_dea", "signer_subject", "checks"])
    client.insert("dead_letters", [["x1", day(1), "verify", t.RECEIVED, 0, 7, "undecodable", ""]],
                  column_names=["dead_letter_id", "failed_at", "stage", "source_topic", "source_partition",
                                "source_offset", "reason", "payload_base64"])
    client.insert("suspicious_order_reports",
                  [["sor-1", REPORTED_ID, f"{REPORTED_ID}/1", "REP-1", GROWER, GROWER, "PK0070297", day(4),
                    day(4) + timedelta(hours=2), "dave", "big", 1, "00406-0512-01", "OXY", "10 MG", "pkg", 60, 60,
                    6000, OXY, "2"]],
                  column_names=["report_id", "order_id", "transaction_id", "order_form_number",
                                "ordering_registrant_dea", "ordering_registrant_name", "reporting_registrant_dea",
                                "date_received", "reported_at", "reported_by", "circumstances", "line_no", "ndc",
                                "product_name", "strength", "unit", "package_quantity", "quantity", "dosage_units",
                                "drug_family", "schedule"])
    client.insert("shipments", [["sh1", "s-13", "S-13", STEADY, "PK0070297", day(1), 1, "00406-0512-01", 1],
                                ["sh2", HELD_ID, HELD_ID.upper(), GROWER, "PK0070297", day(1), 1, "00406-0512-01", 50]],
                  column_names=["shipment_id", "order_id", "order_number", "purchaser_dea", "supplier_dea",
                                "shipped_at", "line_no", "ndc", "packages_shipped"])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Any:
    settings = Settings().with_(data_dir=tmp_path_factory.mktemp("dash-ch"))
    writer = open_client(settings)
    apply_ddl(writer)
    ClickHouseSink(writer).write(_records())
    _insert_small_tables(writer)
    reader = open_client(settings, readonly=True)
    yield settings, reader
    reader.close()
    writer.close()


@pytest.fixture(scope="module")
def data(store) -> ReviewData:
    settings, reader = store
    return ReviewData(settings, runner=lambda _s, sql: run_readonly_query(reader, sql))


@pytest.fixture(scope="module")
def run(data) -> d.Query:
    return lambda sql, params: data.query(sql, params)


def filters(**kw: str) -> d.Filters:
    return d.Filters.from_query(kw, TODAY)


def test_every_query_is_one_guarded_select_with_bound_values():
    evil = "X' OR 1=1 --"
    params = dict(start="2026-01-01", end="2026-03-31", family=evil, state=evil, activity=evil, now=0, limit=5,
                  metric="units", recent_weeks=4, sort="own", dea=evil)
    for name, sql in dashboard_sql.ALL.items():
        text = finalize_query(sql, params)
        check_select(text)  # raises if the sink's /sql would refuse it
        assert "%(" not in text, name
        if any(f"%({k})s" in sql for k in ("family", "state", "activity", "dea")):
            assert "'X\\' OR 1=1 --'" in text, name  # the value is a quoted literal, never code


def test_filters_are_checked_and_default_to_the_last_90_days():
    f = filters()
    assert (f.start, f.end) == (TODAY - timedelta(days=89), TODAY)
    assert filters(family="oxycodone").family == OXY
    for bad in ({"start": "yesterday"}, {"start": "2026-02-01", "end": "2026-01-01"}, {"family": "X'; DROP"},
                {"start": "2020-01-01", "end": "2026-01-01"}):
        with pytest.raises(d.FilterError):
            filters(**bad)


def test_holds_and_releases_per_day_by_detector_and_family(run):
    view = d.overview(run, filters(), NOW, 7.0)
    assert view["verdicts"].total("HOLD") == 5
    assert view["verdicts"].total("RELEASE") == 56
    assert dict(view["holds_by_family"]) == {("size", OXY): 4, ("size", HYDRO): 1}
    assert view["holds"].values["size"][-3] == 1  # the held order, two days ago
    hydro = d.overview(run, filters(family=HYDRO), NOW, 7.0)
    assert (hydro["verdicts"].total("HOLD"), hydro["verdicts"].total("RELEASE")) == (1, 14)
    assert dict(hydro["holds_by_family"]) == {("size", HYDRO): 1}


def test_date_range_state_and_activity_filter_the_volumes(run):
    everything = d.overview(run, filters(), NOW, 7.0)["volume"]
    assert everything.total(HYDRO) == 10 * 100 + 4 * 200 + 1000
    last_week = d.overview(run, filters(start=(TODAY - timedelta(days=6)).isoformat()), NOW, 7.0)
    assert last_week["verdicts"].total("RELEASE") == 4  # the four registrants' orders 3 days ago
    texas = d.overview(run, filters(state="TX"), NOW, 7.0)["volume"]
    assert HYDRO not in texas.values and texas.total(OXY) > 0
    hospitals = d.overview(run, filters(activity="HOSPITAL/CLINIC"), NOW, 7.0)["volume"]
    assert set(hospitals.values) == {HYDRO}


def test_cases_decisions_reports_rejections_and_dead_letters(run):
    view = d.overview(run, filters(), NOW, 7.0)
    assert view["ages"] == [(2, 1, 0), (9, 0, 1)]  # one within the clock, one past it
    assert [c["order_id"] for c in view["oldest"]] == [OVERDUE_ID, HELD_ID]
    assert view["decisions"] == {"carol": {"RELEASED": 1}, "dave": {"REPORTED": 2}}
    assert sum(n for _, n, _ in view["weeks"]) == 1
    assert view["rejections"].total("CERT_REVOKED") == 2 and view["rejections"].total("BAD_SIGNATURE") == 1
    assert view["dead"].total() == 1
    status = {r["day"]: r for r in view["reports"]}
    shipped = status[(NOW - timedelta(days=1)).date()]
    assert (shipped["shipped_lines"], shipped["not_released"]) == (2, 1)  # the held order shipped: an exception
    assert sum(r["reported_cases"] for r in view["reports"]) == 2
    assert sum(r["sor_missing"] for r in view["reports"]) == 1  # rep-2 was decided REPORTED but is in no report


def test_growth_ranks_against_own_history_and_peers(run):
    own = d.growth(run, filters())
    # Last four weeks against the earlier weeks of the range, scaled to as many days (~0.4 of them): the grower
    # 21,000 against ~400 a month, the steady pharmacy 4,400 (its held order) against ~400, the hospital 1,800
    # against ~400, the other pharmacy 800 against ~800.
    assert [(g.purchaser_dea, g.drug_family) for g in own] == [(GROWER, OXY), (STEADY, OXY), (HOSPITAL, HYDRO),
                                                               (STEADY2, OXY)]
    assert own[0].own_ratio > 30 and 7 < own[1].own_ratio < 16 and 2 < own[2].own_ratio < 7
    assert 0.5 < own[3].own_ratio < 2
    top = own[0]
    assert (top.recent, top.peers, top.peer_median) == (21000, 3, 4400)
    assert top.business_activity == "RETAIL PHARMACY" and top.state == "TX"
    peer = d.growth(run, filters(), sort="peer")
    assert peer[0].purchaser_dea == GROWER and peer[0].peer_ratio == pytest.approx(21000 / 4400)
    assert {g.purchaser_dea for g in d.growth(run, filters(state="CA"))} == {HOSPITAL}
    assert d.growth(run, filters(family=HYDRO), metric="mme")[0].recent == pytest.approx(1.5 * 1800)


def test_registrant_page_has_points_holds_thresholds_cases_and_reports(run):
    page = d.registrant(run, GROWER, filters())
    points = page["points"][OXY]
    assert len(points) == 17 and sum(p.verdict == "HOLD" for p in points) == 3
    assert page["thresholds"] == {OXY: 700.0}
    assert [c["order_id"] for c in page["open"]] == [HELD_ID]
    assert {c["order_id"] for c in page["closed"]} == {REPORTED_ID, UNREPORTED_ID}
    assert [r["order_id"] for r in page["reports"]] == [REPORTED_ID]
    assert page["families"][0]["activity"] == "RETAIL PHARMACY" and page["families"][0]["state"] == "TX"


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dash-users") / "users.json"
    UserStore(path).add("victor", "viewer", PASSWORD)
    return path


def test_pages_need_a_login_refuse_bad_filters_and_allow_no_script(data, users):
    config = ReviewConfig(port=0, users_path=users, secret=Fernet.generate_key().decode())

    async def go() -> None:
        app = create_review_app(data.settings, config, data=data, publisher=RecordingPublisher())
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/dashboard", allow_redirects=False)
            assert r.status == 303 and r.headers["Location"] == "/login"
            html = await (await client.get("/login")).text()
            token = html.split('name="csrf_token" value="')[1].split('"')[0]
            r = await client.post("/login", data={"csrf_token": token, "username": "victor", "password": PASSWORD},
                                  allow_redirects=False)
            assert r.status == 303
            r = await client.get(f"/dashboard?family={OXY}")
            page = await r.text()
            assert r.status == 200 and 'id="chart-verdicts"' in page and "<script" not in page
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "http" not in csp
            assert f'href="/dashboard/registrants/{GROWER}' in page
            r = await client.get("/dashboard/growth?sort=peer")
            assert r.status == 200 and f'data-dea="{GROWER}"' in await r.text()
            r = await client.get(f"/dashboard/registrants/{GROWER}")
            assert r.status == 200 and f'href="/cases/{HELD_ID}"' in await r.text()
            assert (await client.get("/dashboard?start=2026-13-01")).status == 400
            assert (await client.get("/dashboard/registrants/x'y")).status == 404

    asyncio.run(go())


def test_the_demo_prints_where_the_dashboards_are(monkeypatch):
    monkeypatch.setenv("CSOS_REVIEW_PORT", "7001")
    monkeypatch.delenv("CSOS_REVIEW_HOST", raising=False)
    assert d.dashboard_url() == "http://127.0.0.1:7001/dashboard"


#: The fill report's status as a plain query over the base tables (shipments deduplicated by FINAL, releases read
#: from every verdict): what FILL_REPORT_STATUS must equal while it reads ``dash_released_orders`` instead.
FILL_REFERENCE = """
SELECT toDate(shipped_at) AS ship_day, count() AS lines, uniqExact(order_id) AS orders,
       countIf(order_id NOT IN (SELECT order_id FROM verdicts WHERE verdict = 'RELEASE'
                                  AND received_at >= greatest(toDate(%(start)s), toDate(%(end)s) - 13) - 60))
FROM shipments FINAL
WHERE shipped_at >= greatest(toDate(%(start)s), toDate(%(end)s) - 13) AND shipped_at < toDate(%(end)s) + 1
GROUP BY ship_day ORDER BY ship_day
"""


def test_fill_status_from_released_orders_equals_the_plain_query_also_after_an_upgrade(store):
    """Releases stored before 018_dashboard_fast_paths.sql existed (copied once when it is applied: here the
    table is emptied and the DDL applied again, as on a store upgraded to this version) and after (its
    materialized view); orders shipped on several days, some lines delivered twice, some orders held, unknown or
    released too long ago: the fast query and the plain one agree on every day."""
    settings, reader = store
    writer = open_client(settings)
    try:
        writer.command("TRUNCATE TABLE dash_released_orders")
        apply_ddl(writer)  # the upgrade: 018 copies the releases already stored
        apply_ddl(writer)  # applied again (every start): the table is no longer empty, nothing is copied
        copied = writer.query("SELECT count() FROM dash_released_orders").result_rows[0][0]
        assert copied == writer.query("SELECT count() FROM verdicts WHERE verdict = 'RELEASE'").result_rows[0][0]
        long_ago = _order("old-1", STEADY, NOW - timedelta(days=100), OXY, 100)
        fresh = _order("new-1", STEADY, NOW - timedelta(days=1), OXY, 100)
        ClickHouseSink(writer).write([SourceRecord(t.VERDICTS, 1, i, "som.Verdict", _verdict(o, False))
                                      for i, o in enumerate((long_ago, fresh))])  # through the view
        shipped = [o for o, _ in _history()] + [long_ago, fresh, _order("unknown-1", STEADY, NOW, OXY, 100)]
        rows = [[f"sh-{i}", o["order_id"], o["order_number"], o["purchaser_dea"], "PK0070297",
                 NOW - timedelta(days=i % 16, hours=i % 5), line, "00406-0512-01", 1]
                for i, o in enumerate(shipped) for line in (1, 2)]
        columns = ["shipment_id", "order_id", "order_number", "purchaser_dea", "supplier_dea", "shipped_at",
                   "line_no", "ndc", "packages_shipped"]
        writer.insert("shipments", rows, column_names=columns)
        writer.insert("shipments", rows[::3], column_names=columns)  # redelivered lines: exact copies
    finally:
        writer.close()
    params = {"start": (TODAY - timedelta(days=89)).isoformat(), "end": TODAY.isoformat()}
    fast = run_readonly_query(reader, finalize_query(dashboard_sql.FILL_REPORT_STATUS, params))[1]
    plain = run_readonly_query(reader, finalize_query(FILL_REFERENCE, params))[1]
    assert fast == plain
    assert len(fast) >= 13 and sum(r[3] for r in fast) >= 6  # held, unknown and released-long-ago lines


#: The growth ranking as a plain query over ``dash_registrant_week`` (017), every week of the range one row: what
#: GROWTH must equal while it reads 4-week blocks and single weeks from ``dash_growth`` (018).
GROWTH_REFERENCE = dashboard_sql.GROWTH[:dashboard_sql.GROWTH.index("        FROM dash_growth")] + """\
        FROM dash_registrant_week
        WHERE week >= toMonday(toDate(%(start)s)) AND week <= toDate(%(end)s)
          AND (%(family)s = '' OR drug_family = %(family)s)
          AND (%(state)s = '' OR purchaser_state = %(state)s) AND (%(activity)s = '' OR business_activity = %(activity)s)
""" + dashboard_sql.GROWTH[dashboard_sql.GROWTH.index("        GROUP BY purchaser_dea, drug_family"):]


@pytest.mark.parametrize("days,recent_weeks,extra", [
    (90, 4, {}), (40, 4, {}), (29, 4, {}), (200, 2, {}), (120, 1, {"sort": "peer", "metric": "mme"}),
    (50, 8, {}), (90, 4, {"family": OXY, "state": "TX", "activity": "RETAIL PHARMACY"})])
def test_growth_from_blocks_and_weeks_equals_the_plain_query_over_every_week(store, days, recent_weeks, extra):
    """Ranges with no whole block, one, several, recent weeks reaching before the range, filters: same rows, as
    the views filled dash_growth behind the sink and (first case) again after emptying it and applying the DDL
    (the copy made on an upgraded store)."""
    settings, reader = store

    def compare() -> None:
        for end in (TODAY, TODAY - timedelta(days=3), TODAY - timedelta(days=10)):  # weekday alignments
            params = {"start": (end - timedelta(days=days - 1)).isoformat(), "end": end.isoformat(), "family": "",
                      "state": "", "activity": "", "metric": "units", "sort": "own", "recent_weeks": recent_weeks,
                      "limit": 100, **extra}
            fast = run_readonly_query(reader, finalize_query(dashboard_sql.GROWTH, params))[1]
            plain = run_readonly_query(reader, finalize_query(GROWTH_REFERENCE, params))[1]
            assert fast == plain, (params, fast, plain)
            assert plain or days < 90 or extra, params  # the demo-like history ranks registrants

    compare()
    if (days, recent_weeks, extra) == (90, 4, {}):
        writer = open_client(settings)
        try:
            writer.command("TRUNCATE TABLE dash_growth")
            apply_ddl(writer)
            assert writer.query("SELECT count() FROM dash_growth WHERE weeks = 4").result_rows[0][0] > 0
        finally:
            writer.close()
        compare()

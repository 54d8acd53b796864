"""The review page without a browser: passwords and roles, CSRF, decisions, the chart, and bound SQL.

Rows are seeded into a temporary embedded ClickHouse through the real sink (``ClickHouseSink``)
from real Avro-shaped records, and the page reads them through a read-only client, as it does
through the sink's /sql endpoint in production. Kafka is replaced by a recording publisher: the
end-to-end path through the broker and the case agent is tests/test_review_browser.py.
"""
from __future__ import annotations

import asyncio
import json
import re
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from connectors.clickhouse.sink import ClickHouseSink, SourceRecord
from connectors.clickhouse.client import apply_ddl, open_client, run_readonly_query
from connectors.kafka import catalogue as t
from connectors.kafka.testing import MemoryPublisher
from streams.core.avro_codec import default_codec
from streams.core.config import Settings
from streams.apps.review.auth import UserError, UserStore, hash_password, verify_password
from streams.apps.review.chart import render_history_svg
from streams.apps.review.data import ReviewData
from streams.apps.review.web import ReviewConfig, create_review_app

# aiohttp-session keeps its per-request keys as strings, which aiohttp 3.14 warns about (the library's own keys).
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
codec = default_codec()
NOW = datetime.now(timezone.utc).replace(microsecond=0)
DEA = "BE8821844"
FAMILY = "OXYCODONE"
HELD = "held-0001"  # the order under review (overdue)
HELD2 = "held-0002"  # another open case, not overdue
CLOSED = "closed-0001"  # already released after review
PASSWORD = "correct horse battery staple"


def line(no: int, units: int, family: str = FAMILY) -> dict[str, Any]:
    return {"line_no": no, "ndc": "00406-0512-01" if family == FAMILY else "00406-0123-01",
            "product_name": f"{family} 10MG TAB", "strength": "10 MG", "package_quantity": 100,
            "packages": max(1, units // 100), "dosage_units": units, "schedule": "2", "drug_family": family,
            "base_weight_g": units * 0.009, "mme": units * 15.0}


def verified(order_id: str, at: datetime, lines: list[dict[str, Any]]) -> dict[str, Any]:
    return {"order_id": order_id, "order_number": f"26X{abs(hash(order_id)) % 10**6:06d}", "purchaser_dea": DEA,
            "purchaser_name": "MAIN ST PHARMACY", "supplier_dea": "PK0070297", "signed_at": at, "received_at": at,
            "verified_at": at, "signer_serial": "ab", "signer_fingerprint": "cd", "business_activity": None,
            "lines": lines}


def verdict(order: dict[str, Any], hold: bool) -> dict[str, Any]:
    units = sum(ln["dosage_units"] for ln in order["lines"])
    reasons = [{"detector": "size", "dimension": "size", "drug_family": FAMILY, "value": float(units),
                "baseline": 300.0, "threshold": 1200.0, "window": "EW mean over ~12 released orders", "fired": hold,
                "enforced": True,
                "explanation": f"Ordered {units:,} dosage units of {FAMILY}; this registrant's usual order is 300."
                if hold else ""},
               {"detector": "static_8000_du", "dimension": "size", "drug_family": FAMILY, "value": float(units),
                "baseline": 0.0, "threshold": 8000.0, "window": "calendar month", "fired": hold, "enforced": False,
                "explanation": "Month above 8,000 units (reference rule)." if hold else ""}]
    return {"order_id": order["order_id"], "order_number": order["order_number"], "purchaser_dea": DEA,
            "verdict": "HOLD" if hold else "RELEASE", "decided_at": order["received_at"],
            "received_at": order["received_at"], "signed_at": order["signed_at"], "model_version": "t",
            "reasons": reasons, "lines": order["lines"], "total_dosage_units": units}


def case_event(order: dict[str, Any], kind: str, status: str, version: int, *, held_at: datetime,
               actor: str = "case-agent", rationale: str = "") -> dict[str, Any]:
    return {"event_id": f"{order['order_id']}-{version}", "order_id": order["order_id"],
            "order_number": order["order_number"], "purchaser_dea": DEA, "kind": kind, "status": status,
            "version": version, "at": held_at + timedelta(minutes=version), "held_at": held_at,
            "due_at": held_at + timedelta(days=7), "escalated_at": None, "actor": actor,
            "decision_id": None if kind == "OPENED" else f"d-{version}", "rationale": rationale,
            "evidence_notes": "", "error": "", "summary": "Held: size", "drug_families": [FAMILY],
            "total_dosage_units": sum(ln["dosage_units"] for ln in order["lines"])}


#: OXYCODONE orders inside the 180-day window of HELD: 12 released + 2 earlier holds + HELD itself.
EXPECTED_POINTS = 15


def seed_records() -> list[SourceRecord]:
    held_at = NOW - timedelta(days=8)
    orders: list[tuple[dict[str, Any], bool]] = []
    for k in range(1, 13):
        lines = [line(1, 300 + 10 * k)] + ([line(2, 500, "HYDROCODONE")] if k == 3 else [])
        orders.append((verified(f"rel-{k:04d}", held_at - timedelta(days=10 * k), lines), False))
    orders.append((verified("old-0001", held_at - timedelta(days=200), [line(1, 320)]), False))  # outside window
    orders.append((verified("hold-0035", held_at - timedelta(days=35), [line(1, 2500)]), True))
    orders.append((verified("hold-0075", held_at - timedelta(days=75), [line(1, 2600)]), True))
    held = verified(HELD, held_at, [line(1, 6000), line(2, 4000)])
    orders.append((held, True))
    held2 = verified(HELD2, NOW - timedelta(hours=5), [line(1, 9000, "FENTANYL")])
    closed = verified(CLOSED, NOW - timedelta(days=2), [line(1, 7000, "HYDROCODONE")])
    records: list[SourceRecord] = []
    for i, (order, hold) in enumerate(orders + [(held2, True), (closed, True)]):
        records.append(SourceRecord(t.VERIFIED, 0, i, "csos.orders.VerifiedOrder", order))
        v = verdict(order, hold)
        if order is held2:  # held because an earlier case of the registrant is open (the open-case rule)
            v["reasons"].append({"detector": "open_case", "dimension": "pattern", "drug_family": "FENTANYL",
                                 "value": 2.0, "baseline": 0.0, "threshold": 0.0, "window": f"case {HELD}",
                                 "fired": True, "enforced": True,
                                 "explanation": f"FENTANYL: joins open case {HELD}; later orders are held."})
        records.append(SourceRecord(t.VERDICTS, 0, i, "som.Verdict", v))
    events = [case_event(held, "OPENED", "HELD", 1, held_at=held_at),
              case_event(held2, "OPENED", "HELD", 1, held_at=NOW - timedelta(hours=5)),
              case_event(closed, "OPENED", "HELD", 1, held_at=NOW - timedelta(days=2)),
              case_event(closed, "RELEASED", "RELEASED", 2, held_at=NOW - timedelta(days=2), actor="carol",
                         rationale="Hospital opened a new wing; DEA registration checked.")]
    events[1]["drug_families"] = ["FENTANYL"]
    events[2]["drug_families"] = events[3]["drug_families"] = ["HYDROCODONE"]
    for i, ev in enumerate(events):
        codec.encode("som.CaseEvent", ev)  # the record is a valid som.CaseEvent
        records.append(SourceRecord(t.CASES, 0, i, "som.CaseEvent", ev))
    return records


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Settings, Any]:
    settings = Settings().with_(data_dir=tmp_path_factory.mktemp("review-ch"))
    writer = open_client(settings)
    apply_ddl(writer)
    ClickHouseSink(writer).write(seed_records())
    reader = open_client(settings, readonly=True)
    yield settings, reader
    reader.close()
    writer.close()


@pytest.fixture(scope="module")
def data(store) -> ReviewData:
    settings, reader = store
    return ReviewData(settings, runner=lambda _s, sql: run_readonly_query(reader, sql))


# ------------------------------------------------------------------ passwords and users
def test_password_hash_is_salted_scrypt_and_checked_in_full():
    a, b = hash_password(PASSWORD), hash_password(PASSWORD)
    assert a.startswith("scrypt$16384$8$1$") and a != b  # salted: same password, different hashes
    assert verify_password(PASSWORD, a) and verify_password(PASSWORD, b)
    assert not verify_password(PASSWORD + " ", a)
    assert not verify_password("", a)
    assert not verify_password(PASSWORD, "plain$" + PASSWORD)
    assert not verify_password(PASSWORD, "scrypt$garbage")
    with pytest.raises(UserError):
        hash_password("")


def test_user_store_roles_and_file_permissions(tmp_path):
    store = UserStore(tmp_path / "users.json")
    store.add("alice", "analyst", PASSWORD)
    store.add("victor", "viewer", "another one")
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    assert PASSWORD not in (tmp_path / "users.json").read_text()
    assert store.authenticate("alice", PASSWORD).may_act
    assert not store.authenticate("victor", "another one").may_act
    assert store.authenticate("alice", "wrong") is None
    assert store.authenticate("mallory", PASSWORD) is None
    with pytest.raises(UserError):
        store.add("Bob; DROP", "analyst", "x")
    with pytest.raises(UserError):
        store.add("bob", "admin", "x")
    assert store.remove("victor") and store.authenticate("victor", "another one") is None


def test_add_user_cli_reads_the_password_from_the_environment(tmp_path):
    from click.testing import CliRunner

    from streams.cli import main

    users = tmp_path / "u.json"
    env = {"CSOS_REVIEW_USERS": str(users), "CSOS_REVIEW_PASSWORD": PASSWORD, "CSOS_DATA_DIR": str(tmp_path)}
    result = CliRunner().invoke(main, ["review", "add-user", "alice", "--role", "analyst"], env=env)
    assert result.exit_code == 0, result.output
    assert UserStore(users).authenticate("alice", PASSWORD).role == "analyst"
    listed = CliRunner().invoke(main, ["review", "users"], env=env)
    assert listed.output.strip() == "alice\tanalyst"


# ------------------------------------------------------------------ data access
def test_values_are_bound_not_spliced(data):
    assert data.case(HELD).status == "HELD"
    assert data.case("x' OR 1=1 --") is None  # not an order id: never reaches SQL
    # Values that are not ids are bound and escaped by clickhouse-connect, so a quote is just a character.
    assert data.history(DEA, "OXY' OR '1'='1", NOW) == []
    assert data.history("x\\' OR 1=1 --", FAMILY, NOW) == []
    assert [c.order_id for c in data.held_cases()] == [HELD, HELD2]  # oldest deadline first
    assert [c.order_id for c in data.closed_cases()] == [CLOSED]


def test_case_detail_has_reasons_lines_history_and_events(data):
    d = data.detail(HELD)
    assert d.case.overdue(NOW) and d.purchaser_name == "MAIN ST PHARMACY"
    assert [(r.detector, r.enforced) for r in d.reasons] == [("size", True), ("static_8000_du", False)]
    assert d.reasons[0].value == 10000 and d.reasons[0].baseline == 300 and d.reasons[0].threshold == 1200
    assert [ln.dosage_units for ln in d.lines] == [6000, 4000]
    assert [e.kind for e in d.events] == ["OPENED"]
    points = d.history[FAMILY]
    assert len(points) == EXPECTED_POINTS
    assert sum(p.verdict == "HOLD" for p in points) == 3
    assert next(p for p in points if p.order_id == HELD).dosage_units == 10000  # both lines of the family
    assert d.thresholds == {FAMILY: 1200.0}


# ------------------------------------------------------------------ the chart
def test_chart_marks_the_held_order_and_draws_one_mark_per_order(data):
    d = data.detail(HELD)
    svg = render_history_svg(FAMILY, d.history[FAMILY], HELD, d.thresholds[FAMILY])
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    marks = re.findall(r'class="pt (\w+)" data-order-id="([^"]+)"', svg)
    assert len(marks) == EXPECTED_POINTS
    assert [oid for kind, oid in marks if kind == "current"] == [HELD]
    assert sorted(oid for kind, oid in marks if kind == "held") == ["hold-0035", "hold-0075"]
    assert sum(kind == "released" for kind, _ in marks) == 12
    assert "old-0001" not in svg  # outside the 180-day window
    assert 'data-points="15"' in svg and "this order: 10,000" in svg and 'class="threshold"' in svg


def test_chart_escapes_what_it_draws():
    from streams.apps.review.data import HistoryPoint

    svg = render_history_svg("<script>", [HistoryPoint('"><x', NOW, 5, "RELEASE")], "other")
    assert "<script>" not in svg and '"><x' not in svg
    assert render_history_svg("X", [], "o").count('class="pt') == 0


# ------------------------------------------------------------------ the web application
class Page:
    """One browser-like session against the app (cookies kept), with helpers for forms."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def token(self, path: str) -> str:
        r = await self.client.get(path)
        html = await r.text()
        m = re.search(r'name="csrf_token" value="([^"]+)"', html)
        assert m, html[:500]
        return m.group(1)

    async def login(self, name: str, password: str) -> Any:
        return await self.client.post("/login", data={"csrf_token": await self.token("/login"), "username": name,
                                                      "password": password}, allow_redirects=False)


def run_app(data: ReviewData, users: Path, body) -> MemoryPublisher:
    publisher = MemoryPublisher()
    config = ReviewConfig(port=0, users_path=users, secret=Fernet.generate_key().decode())

    async def go() -> None:
        app = create_review_app(data.settings, config, data=data, publisher=publisher)
        async with TestClient(TestServer(app)) as client:
            await body(Page(client), publisher)

    asyncio.run(go())
    return publisher


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("review-users") / "users.json"
    store = UserStore(path)
    store.add("alice", "analyst", PASSWORD)
    store.add("victor", "viewer", PASSWORD)
    return path


def test_login_refuses_wrong_passwords_and_missing_csrf_and_audits_them(data, users):
    async def body(page: Page, pub: MemoryPublisher) -> None:
        r = await page.client.get("/cases", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/login"
        r = await page.login("alice", "wrong password")
        assert r.status == 401 and "Wrong user name or password" in await r.text()
        r = await page.client.post("/login", data={"username": "alice", "password": PASSWORD},
                                   allow_redirects=False)
        assert r.status == 403  # no CSRF token
        r = await page.client.get("/cases", allow_redirects=False)
        assert r.status == 303  # still not logged in
        r = await page.login("alice", PASSWORD)
        assert r.status == 303 and r.headers["Location"] == "/cases"
        r = await page.client.get("/cases")
        html = await r.text()
        assert r.status == 200 and HELD in html and HELD2 in html and CLOSED in html
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]

    pub = run_app(data, users, body)
    failed = pub.audits("login.failed")
    assert len(failed) == 1 and json.loads(failed[0]["detail"])["username"] == "alice"
    assert failed[0]["stage"] == "review" and failed[0]["outcome"] == "REFUSED"
    assert len(pub.audits("login.refused")) == 1
    assert [a["actor"] for a in pub.audits("login.succeeded")] == ["alice"]


def test_repeated_failed_logins_lock_the_user_name_for_a_while(data, users):
    async def body(page: Page, pub: MemoryPublisher) -> None:
        for _ in range(5):
            assert (await page.login("victor", "guess")).status == 401
        r = await page.login("victor", PASSWORD)  # even the right password, for now
        assert r.status == 429 and "Too many failed logins" in await r.text()
        assert (await page.login("alice", PASSWORD)).status == 303  # other names are not affected

    pub = run_app(data, users, body)
    assert len(pub.audits("login.failed")) == 5 and len(pub.audits("login.refused")) == 1


def test_the_case_page_shows_reasons_chart_lines_and_the_overdue_deadline(data, users):
    async def body(page: Page, pub: MemoryPublisher) -> None:
        await page.login("alice", PASSWORD)
        html = await (await page.client.get("/cases")).text()
        row = re.search(rf'<tr class="case([^"]*)" data-order-id="{HELD}"', html)
        assert row and "overdue" in row.group(1)
        assert "overdue" not in re.search(rf'<tr class="case([^"]*)" data-order-id="{HELD2}"', html).group(1)
        html = await (await page.client.get(f"/cases/{HELD}")).text()
        assert "Ordered 10,000 dosage units of OXYCODONE" in html
        assert "1 reference rule finding also fired" in html and html.count("<table class=\"reasons") == 2
        assert html.count('class="pt ') == EXPECTED_POINTS and 'class="pt current"' in html
        assert html.count('<form method="post" action="/cases/') == 6  # 3 case decisions, 3 about the registrant
        assert (await page.client.get("/cases/nope")).status == 404
        assert (await page.client.get("/cases/x'%20OR%201=1")).status == 404

    run_app(data, users, body)


def test_a_viewer_reads_but_cannot_act(data, users):
    async def body(page: Page, pub: MemoryPublisher) -> None:
        await page.login("victor", PASSWORD)
        r = await page.client.get(f"/cases/{HELD}")
        html = await r.text()
        assert r.status == 200 and 'class="pt current"' in html
        assert 'class="decision"' not in html and "read-only access" in html
        token = await page.token(f"/cases/{HELD}")
        r = await page.client.post(f"/cases/{HELD}/decision", data={
            "csrf_token": token, "action": "RELEASE", "rationale": "looks fine"})
        assert r.status == 403

    pub = run_app(data, users, body)
    assert pub.records(t.DECISIONS) == []
    refused = pub.audits("decision.refused")
    assert len(refused) == 1 and refused[0]["actor"] == "victor" and refused[0]["order_id"] == HELD
    assert "viewer" in json.loads(refused[0]["detail"])["reason"]


def test_an_analyst_decision_needs_csrf_and_a_rationale_and_a_held_case(data, users):
    async def body(page: Page, pub: MemoryPublisher) -> None:
        await page.login("alice", PASSWORD)
        r = await page.client.post(f"/cases/{HELD}/decision", data={"action": "RELEASE", "rationale": "x"})
        assert r.status == 403  # no CSRF token
        r = await page.client.post(f"/cases/{HELD}/decision", data={
            "csrf_token": "forged", "action": "RELEASE", "rationale": "x"})
        assert r.status == 403
        token = await page.token(f"/cases/{HELD}")
        r = await page.client.post(f"/cases/{HELD}/decision", data={
            "csrf_token": token, "action": "REPORT", "rationale": "   ", "evidence_notes": "called them"})
        assert r.status == 400 and "the rationale is required" in await r.text()
        r = await page.client.post(f"/cases/{HELD}/decision", data={
            "csrf_token": token, "action": "SHIP_IT", "rationale": "x"})
        assert r.status == 400
        r = await page.client.post(f"/cases/{CLOSED}/decision", data={
            "csrf_token": token, "action": "CANCEL", "rationale": "changed my mind"})
        assert r.status == 409 and "RELEASED, not HELD" in await r.text()
        assert pub.records(t.DECISIONS) == []
        r = await page.client.post(f"/cases/{HELD}/decision", data={
            "csrf_token": token, "action": "RELEASE", "rationale": "Pharmacist confirmed <b>flu</b> clinic",
            "evidence_notes": "Call 2026-11-20"}, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == f"/cases/{HELD}"
        html = await (await page.client.get(f"/cases/{HELD}")).text()
        assert "Decision submitted: Release after due diligence" in html
        assert "Decision submitted" not in await (await page.client.get(f"/cases/{HELD}")).text()  # shown once

    pub = run_app(data, users, body)
    [decision] = pub.records(t.DECISIONS)
    assert decision["order_id"] == HELD and decision["action"] == "RELEASE" and decision["actor"] == "alice"
    assert decision["actor_role"] == "analyst" and decision["rationale"] == "Pharmacist confirmed <b>flu</b> clinic"
    assert decision["evidence_notes"] == "Call 2026-11-20"
    key = pub.on(t.DECISIONS)[0].key()
    assert key in (HELD, HELD.encode())  # keyed by order id (the emitter passes keys on as bytes)
    [submitted] = pub.audits("decision.submitted")
    assert submitted["actor"] == "alice" and submitted["outcome"] == "RELEASE" and submitted["stage"] == "review"
    assert json.loads(submitted["detail"])["decision_id"] == decision["decision_id"]
    assert len(pub.audits("decision.refused")) == 2  # the two CSRF failures


def test_a_case_names_the_open_case_it_joined_and_an_analyst_can_set_a_limit(data, users):
    async def body(page: Page, pub: MemoryPublisher) -> None:
        await page.login("alice", PASSWORD)
        html = await (await page.client.get(f"/cases/{HELD2}")).text()
        assert f'This order joined <a href="/cases/{HELD}"' in html
        token = await page.token(f"/cases/{HELD}")
        r = await page.client.post(f"/cases/{HELD}/registrant-decision", data={
            "csrf_token": token, "action": "SET_LIMIT", "rationale": "Reported; limit at its 2025 level",
            "drug_family": FAMILY, "monthly_limit_units": "lots"})
        assert r.status == 400 and "whole number" in await r.text()
        r = await page.client.post(f"/cases/{HELD}/registrant-decision", data={
            "csrf_token": token, "action": "SET_LIMIT", "rationale": "Reported; limit at its 2025 level",
            "drug_family": FAMILY, "monthly_limit_units": "4000"}, allow_redirects=False)
        assert r.status == 303
        r = await page.client.post(f"/cases/{HELD}/registrant-decision", data={
            "csrf_token": token, "action": "TERMINATE", "rationale": "Pill mill: DEA order to show cause"},
            allow_redirects=False)
        assert r.status == 303

    pub = run_app(data, users, body)
    limit, term = pub.records(t.DECISIONS)
    assert (limit["action"], limit["drug_family"], limit["monthly_limit_units"], limit["purchaser_dea"]) == (
        "SET_LIMIT", FAMILY, 4000, DEA)
    assert (term["action"], term["order_id"], term["actor"]) == ("TERMINATE", HELD, "alice")
    assert [json.loads(a["detail"])["action"] for a in pub.audits("decision.submitted")] == ["SET_LIMIT", "TERMINATE"]

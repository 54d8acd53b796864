"""Due diligence end to end: real broker, worker (case agent + monitor), sink and embedded ClickHouse.

Held orders of the session's feed open cases; these tests decide some of
them by publishing ``som.Decision`` records (what the review page does) and
follow each decision to the warehouse's release topic, the learner, the
suspicious order reports and ClickHouse.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from connectors.kafka.io import Publisher, consume_all
from connectors.kafka import catalogue as t
from streams.core.avro_codec import default_codec
from tests.conftest import DUE_DILIGENCE_SECONDS

codec = default_codec()


@pytest.fixture(scope="module")
def holds(streamed) -> list[tuple[str, str]]:
    """(order id, purchaser DEA) of the feed's held orders, once each has an open case."""
    rows = streamed.sql("SELECT order_id, purchaser_dea FROM verdicts FINAL WHERE verdict = 'HOLD' ORDER BY order_id")
    assert len(rows) >= 8, "the session feed must hold several orders"
    streamed.eventually("SELECT count() FROM cases FINAL WHERE order_id IN "
               "(SELECT order_id FROM verdicts FINAL WHERE verdict = 'HOLD')",
               want=lambda r: r and int(r[0][0]) == len(rows))
    return [(r[0], r[1]) for r in rows]


def decide(p, order_id: str, action: str, *, actor: str = "alice", role: str = "analyst",
           rationale: str = "Verified with the pharmacist in charge; documents on file.") -> str:
    decision_id = str(uuid.uuid4())
    pub = Publisher(p.settings.kafka_bootstrap)
    pub.publish(t.DECISIONS, order_id, codec.encode("som.Decision", {
        "decision_id": decision_id, "order_id": order_id, "action": action, "actor": actor, "actor_role": role,
        "rationale": rationale, "evidence_notes": "call log 2026-11-24", "decided_at": datetime.now(timezone.utc)}))
    pub.flush()
    return decision_id


def first_on(p, topic: str, schema: str, match) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def seen(messages) -> bool:
        for m in messages:
            rec = codec.decode(m.value(), expect=schema)[1]
            if match(m.key().decode(), rec):
                found["rec"] = rec
                return True
        return False

    consume_all(p.settings.kafka_bootstrap, [topic], until=seen, timeout=120)
    assert "rec" in found, f"nothing matching on {topic}\n{p.processes.tail()}"
    return found["rec"]


def test_every_held_order_opens_a_case_with_a_deadline(streamed, holds) -> None:
    rows = streamed.sql("SELECT c.order_id, c.due_at - c.held_at, c.summary, v.summary FROM cases AS c FINAL "
                        "JOIN (SELECT order_id, summary FROM verdicts FINAL WHERE verdict = 'HOLD') AS v "
                        "ON v.order_id = c.order_id")
    assert len(rows) == len(holds)
    for oid, period, case_summary, verdict_summary in rows:
        assert abs(float(period) - DUE_DILIGENCE_SECONDS) < 0.01, (oid, period)
        assert case_summary and case_summary in verdict_summary  # the hold's reasons travel with the case


def test_release_after_review_reaches_warehouse_learner_and_clickhouse(streamed, holds) -> None:
    oid, dea = holds[0]
    decision_id = decide(streamed, oid, "RELEASE", actor="alice")
    release = first_on(streamed, t.RELEASE, "som.Release", lambda k, r: k == oid and r["released_by"] == "alice")
    n_lines = int(streamed.sql(f"SELECT count() FROM order_lines FINAL WHERE order_id = '{oid}'")[0][0])
    assert release["purchaser_dea"] == dea and len(release["lines"]) == n_lines > 0
    rows = streamed.eventually(f"SELECT status, decided_by, decision_id, rationale FROM cases FINAL "
                                f"WHERE order_id = '{oid}'", want=lambda r: r and r[0][0] == "RELEASED")
    assert rows[0][1:3] == ["alice", decision_id] or tuple(rows[0][1:3]) == ("alice", decision_id)
    actions = streamed.eventually(f"SELECT action, actor FROM audit_events WHERE order_id = '{oid}'",
                         want=lambda r: {"case.released", "order.learned_after_review"} <= {x[0] for x in r})
    assert ("case.released", "alice") in {tuple(a) for a in actions}
    # a second decision on the closed case is refused, visibly, and changes nothing
    decide(streamed, oid, "REPORT", actor="bob")
    refused = streamed.eventually(f"SELECT actor, error, status FROM case_events FINAL "
                                   f"WHERE order_id = '{oid}' AND kind = 'REFUSED'")
    assert refused[0][0] == "bob" and "already RELEASED by alice" in refused[0][1] and refused[0][2] == "RELEASED"
    assert streamed.sql(f"SELECT count() FROM suspicious_order_reports WHERE order_id = '{oid}'")[0][0] == 0


def test_report_produces_the_suspicious_order_report(streamed, holds) -> None:
    oid, dea = holds[1]
    decide(streamed, oid, "REPORT", actor="carol", rationale="No prescriptions support this volume.")
    report = first_on(streamed, t.REPORTS, "som.SuspiciousOrderReport", lambda k, r: k == oid)
    lines = streamed.sql(f"SELECT line_no, ndc, strength, packages, dosage_units, order_number, received_at, "
                         f"supplier_dea FROM order_lines FINAL WHERE order_id = '{oid}' ORDER BY line_no")
    assert [(ln["line_no"], ln["ndc"], ln["strength"], ln["quantity"], ln["dosage_units"]) for ln in report["lines"]] \
        == [tuple(r[:5]) for r in lines]
    assert report["ordering_registrant_dea"] == dea and report["order_form_number"] == lines[0][5]
    assert report["reporting_registrant_dea"] == lines[0][7] and report["reported_by"] == "carol"
    assert "No prescriptions support this volume." in report["circumstances"]
    stored = streamed.eventually(f"SELECT count(), any(reported_by) FROM suspicious_order_reports FINAL "
                                  f"WHERE order_id = '{oid}'", want=lambda r: r and int(r[0][0]) == len(lines))
    assert stored[0][1] == "carol"
    assert not released_by_on_topic(streamed, t.RELEASE, oid, "carol")


def released_by_on_topic(p, topic: str, oid: str, actor: str) -> bool:
    msgs = consume_all(p.settings.kafka_bootstrap, [topic], idle_seconds=1.0)
    return any(m.key().decode() == oid and codec.decode(m.value())[1]["released_by"] == actor for m in msgs)


def test_viewer_cannot_decide(streamed, holds) -> None:
    oid, _ = holds[2]
    decide(streamed, oid, "RELEASE", actor="vic", role="viewer")
    refused = streamed.eventually(f"SELECT error FROM case_events FINAL WHERE order_id = '{oid}' AND kind = 'REFUSED'")
    assert "only an analyst may release" in refused[0][0]
    assert streamed.sql(f"SELECT status FROM cases FINAL WHERE order_id = '{oid}'")[0][0] == "HELD"


def test_lapsed_clock_escalates_an_undecided_case_once(streamed, holds) -> None:
    oid, _ = holds[3]
    rows = streamed.eventually(f"SELECT at, due_at, status FROM case_events FINAL WHERE order_id = '{oid}' "
                                f"AND kind = 'ESCALATED'", timeout=DUE_DILIGENCE_SECONDS + 60)
    assert len(rows) == 1 and rows[0][2] == "HELD"
    at, due = rows[0][0], rows[0][1]
    assert at >= due  # never before the deadline
    # The audit event may reach ClickHouse in the sink's next batch: wait for it, then count it (once).
    assert streamed.eventually(f"SELECT count() FROM audit_events WHERE order_id = '{oid}' "
                                f"AND action = 'case.escalated'", want=lambda r: r and int(r[0][0]) > 0)[0][0] == 1


def test_daily_suspicious_order_report_files(streamed, holds, tmp_path) -> None:
    import csv
    import json

    from connectors.clickhouse.query import run_query
    from streams.apps.reports import write_suspicious_order_report

    oid, dea = holds[5]
    decide(streamed, oid, "REPORT", actor="dana", rationale="Volume inconsistent with the patient population.")
    n_lines = int(streamed.sql(f"SELECT count() FROM order_lines FINAL WHERE order_id = '{oid}'")[0][0])
    streamed.eventually(f"SELECT count() FROM suspicious_order_reports FINAL WHERE order_id = '{oid}'",
               want=lambda r: r and int(r[0][0]) == n_lines)
    day = datetime.now(timezone.utc).date()
    w = write_suspicious_order_report(lambda sql: run_query(streamed.settings, sql), day, tmp_path)
    with w.csv_path.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["order_id"] == oid]
    assert len(rows) == n_lines and {r["reported_by"] for r in rows} == {"dana"}
    assert {r["ordering_registrant_dea"] for r in rows} == {dea}
    assert all(r["ndc"] and int(r["quantity"]) > 0 and r["strength"] and r["unit"] for r in rows)
    doc = json.loads(w.json_path.read_text())
    [rep] = [r for r in doc["reports"] if r["order_id"] == oid]
    assert len(rep["lines"]) == n_lines and "Volume inconsistent" in rep["circumstances"]
    assert doc["date"] == day.isoformat()
    # another day has none of them
    other = write_suspicious_order_report(lambda sql: run_query(streamed.settings, sql), day - timedelta(days=3),
                                          tmp_path / "other")
    assert oid not in other.csv_path.read_text()


def test_fill_report_from_warehouse_confirmations(streamed, holds, tmp_path) -> None:
    import csv
    import json

    from streams.tools.warehouse import confirmation, released_orders
    from connectors.clickhouse.query import run_query
    from streams.apps.reports import write_fill_report

    shipped = datetime(2026, 11, 20, 16, 30, tzinfo=timezone.utc)  # a Friday: due at DEA by Tuesday
    releases = [r for r in released_orders(streamed.settings.kafka_bootstrap) if r["released_by"] == "monitor"][:3]
    held_oid, _ = holds[4]  # still HELD: shipping it is an exception
    held = streamed.sql(f"SELECT order_number, purchaser_dea, supplier_dea, line_no, ndc, packages "
                        f"FROM order_lines FINAL WHERE order_id = '{held_oid}' ORDER BY line_no")
    confirmations = [confirmation(r, shipped) for r in releases]
    over = confirmation(releases[0], shipped)
    over["shipment_id"] = str(uuid.uuid4())
    over["lines"] = over["lines"][:1]
    over["lines"][0] = dict(over["lines"][0], packages_shipped=over["lines"][0]["packages_shipped"] + 5)
    confirmations.append(over)
    confirmations.append({
        "shipment_id": str(uuid.uuid4()), "order_id": held_oid, "order_number": held[0][0],
        "purchaser_dea": held[0][1], "supplier_dea": held[0][2], "shipped_at": shipped,
        "lines": [{"line_no": h[3], "ndc": h[4], "packages_shipped": h[5]} for h in held]})
    pub = Publisher(streamed.settings.kafka_bootstrap)
    for c in confirmations:
        pub.publish(t.SHIPMENTS, c["order_id"], codec.encode("warehouse.ShipmentConfirmation", c))
    pub.flush()
    n_lines = sum(len(c["lines"]) for c in confirmations)
    ids = ", ".join(f"'{c['shipment_id']}'" for c in confirmations)
    streamed.eventually(f"SELECT count() FROM shipments FINAL WHERE shipment_id IN ({ids})",
               want=lambda r: r and int(r[0][0]) == n_lines)

    w = write_fill_report(lambda sql: run_query(streamed.settings, sql), shipped.date(), tmp_path)
    with w.csv_path.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["shipment_id"] in ids]
    assert len(rows) == n_lines
    assert list(rows[0])[:6] == ["order_number", "purchaser_dea", "supplier_dea", "ndc", "packages_shipped",
                                 "ship_date"]
    assert {r["ship_date"] for r in rows} == {"2026-11-20"}
    exceptions = {(r["order_id"], r["exception"]) for r in rows if r["exception"]}
    assert exceptions == {(held_oid, "NOT_RELEASED"), (releases[0]["order_id"], "MORE_THAN_ORDERED")}
    normal = [r for r in rows if not r["exception"]]
    expected = {(c["order_number"], ln["ndc"], str(ln["packages_shipped"])) for c in confirmations[:3]
                for ln in c["lines"]}
    assert {(r["order_number"], r["ndc"], r["packages_shipped"]) for r in normal} == expected
    doc = json.loads(w.json_path.read_text())
    assert doc["send_by"] == "2026-11-24" and len(doc["exceptions"]) == w.exceptions == len(held) + 1


def test_summary_counts_cases_and_overdue_ones(streamed, holds) -> None:
    from streams.apps.summary import fetch_summary

    streamed.eventually(f"SELECT count() FROM case_events FINAL WHERE order_id = '{holds[3][0]}' "
                        f"AND kind = 'ESCALATED'", want=lambda r: r and int(r[0][0]) == 1,
                        timeout=DUE_DILIGENCE_SECONDS + 60)
    s = fetch_summary(streamed.settings)
    rows = dict(streamed.sql("SELECT status, count() FROM cases FINAL GROUP BY status"))
    assert s.cases_by_status == {k: int(v) for k, v in rows.items()} and s.cases_by_status["RELEASED"] >= 1
    assert 1 <= s.overdue <= s.cases_by_status["HELD"]
    assert f"HELD {s.cases_by_status['HELD']}" in s.render() and "past the deadline" in s.render()


def test_workers_compute_the_partition_producers_chose(streamed) -> None:
    """The clock escalates only cases in partitions the worker owns; that needs our hash to be the producers'."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from streams.pipeline.agents.cases import key_partition

    topic, n = f"test.partitioning.{uuid.uuid4().hex[:8]}", 7
    admin = AdminClient({"bootstrap.servers": streamed.settings.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, n, 1)])[topic].result(30)
    keys = [str(uuid.uuid4()) for _ in range(200)]
    pub = Publisher(streamed.settings.kafka_bootstrap)
    for k in keys:
        pub.publish(topic, k, b"x")
    pub.flush()
    msgs = consume_all(streamed.settings.kafka_bootstrap, [topic], until=lambda m: len(m) >= len(keys), timeout=60)
    placed = {m.key().decode(): m.partition() for m in msgs}
    assert len(placed) == len(keys) and len(set(placed.values())) == n
    assert all(key_partition(k, n) == p for k, p in placed.items())
    admin.delete_topics([topic])

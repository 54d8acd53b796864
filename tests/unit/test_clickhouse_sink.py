"""The ClickHouse sink: idempotent DDL, rows that mirror the messages, no duplicates on retry."""
from __future__ import annotations

from datetime import datetime, timezone

from pathlib import Path

import pytest

from connectors.clickhouse.sink import ClickHouseSink, SourceRecord
from connectors.clickhouse.client import apply_ddl, open_client, run_readonly_query
from streams.core.config import Settings

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
LINE = {"line_no": 1, "ndc": "00406-0512-01", "product_name": "OXYCODONE HCL 10MG TAB", "strength": "10 MG",
        "package_quantity": 100, "packages": 3, "dosage_units": 300, "schedule": "2", "drug_family": "OXYCODONE",
        "base_weight_g": 2.69, "mme": 4035.0}


def reason(fired: bool, detector: str = "size") -> dict:
    return {"detector": detector, "dimension": "size", "drug_family": "OXYCODONE", "value": 3000.0,
            "baseline": 300.0, "threshold": 1200.0, "window": "EW mean", "fired": fired,
            "explanation": "Ordered 3,000 dosage units" if fired else ""}


def batch(n: int, offset0: int = 0) -> list[SourceRecord]:
    out = []
    for i in range(n):
        oid = f"order-{i}"
        out.append(SourceRecord("som.verdicts", 0, offset0 + i, "som.Verdict", {
            "order_id": oid, "order_number": f"26X{i:06d}", "purchaser_dea": "BE8821844",
            "verdict": "HOLD" if i % 2 else "RELEASE", "decided_at": NOW, "received_at": NOW, "signed_at": NOW,
            "model_version": "t", "reasons": [reason(bool(i % 2)), reason(False, "frequency_24h")],
            "lines": [LINE], "total_dosage_units": 300}))
        out.append(SourceRecord("csos.orders.verified", 1, offset0 + i, "csos.orders.VerifiedOrder", {
            "order_id": oid, "order_number": f"26X{i:06d}", "purchaser_dea": "BE8821844", "purchaser_name": "P",
            "supplier_dea": "PK0070297", "signed_at": NOW, "received_at": NOW, "verified_at": NOW,
            "signer_serial": "ab", "signer_fingerprint": "cd", "business_activity": None,
            "lines": [LINE, dict(LINE, line_no=2)]}))
        out.append(SourceRecord("audit.events", 2, offset0 + i, "audit.AuditEvent", {
            "event_id": f"ev-{i}", "occurred_at": NOW, "stage": "monitor", "action": "order.held",
            "order_id": oid, "purchaser_dea": "BE8821844", "outcome": "HOLD", "detail": "{}", "actor": "t"}))
    out.append(SourceRecord("csos.orders.rejected", 3, offset0, "csos.orders.Rejection", {
        "order_id": "bad-1", "received_at": NOW, "rejected_at": NOW, "reason_code": "CERT_REVOKED",
        "reason": "revoked", "order_number": "26X999999", "purchaser_dea": "BE8821844", "signer_subject": "CN=x",
        "checks": [{"check": "signature", "passed": True, "detail": "ok"},
                   {"check": "revocation", "passed": False, "detail": "on CRL"}]}))
    out.append(SourceRecord("dlq", 0, offset0, "dlq.DeadLetter", {
        "dead_letter_id": "dl-1", "failed_at": NOW, "stage": "verify", "source_topic": "csos.orders.received",
        "source_partition": 0, "source_offset": 5, "key": None, "payload": b"\x00garbage", "reason": "too short"}))
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings().with_(data_dir=tmp_path_factory.mktemp("ch"))
    c = open_client(settings)
    c.analyst_dir = str(settings.data_dir)
    apply_ddl(c)
    apply_ddl(c)  # idempotent: a restart re-applies it
    yield c
    c.close()


def counts(client) -> dict[str, int]:
    return {t: int(client.query(f"SELECT count() FROM {t}").result_rows[0][0])
            for t in ("verdicts", "verdict_reasons", "order_lines", "audit_events", "rejections", "dead_letters")}


def test_rows_mirror_the_messages_and_a_retried_batch_is_not_doubled(client):
    sink = ClickHouseSink(client)
    records = batch(10)
    sink.write(records)
    first = counts(client)
    assert first == {"verdicts": 10, "verdict_reasons": 20, "order_lines": 20, "audit_events": 10,
                     "rejections": 1, "dead_letters": 1}
    sink.write(records)  # the same batch again (a retry after a timeout): same token, dropped
    assert counts(client) == first
    held = client.query("SELECT order_id, fired_detectors, summary FROM verdicts WHERE verdict = 'HOLD' "
                        "ORDER BY order_id LIMIT 1").result_rows[0]
    assert held[1] == ["size"] and "3,000" in held[2]
    checks = client.query("SELECT arrayMap(c -> (c.check, c.passed), checks) FROM rejections").result_rows[0][0]
    assert [tuple(c) for c in checks] == [("signature", True), ("revocation", False)]


def test_a_batch_re_formed_after_a_restart_collapses_on_the_key(client):
    sink = ClickHouseSink(client)
    # Redelivered after a crash, cut into different batches: the tokens differ, the keys do not.
    records = batch(10)
    sink.write(records[:7])
    sink.write(records[7:])
    for table, n in {"verdicts": 10, "order_lines": 20, "audit_events": 10, "rejections": 1}.items():
        assert int(client.query(f"SELECT count() FROM {table} FINAL").result_rows[0][0]) == n


def test_analyst_queries_cannot_write_and_do_not_stop_the_writer(client, tmp_path_factory):
    settings = Settings().with_(data_dir=Path(client.analyst_dir))
    reader = open_client(settings, readonly=True)
    with pytest.raises(Exception, match="readonly"):
        run_readonly_query(reader, "INSERT INTO verdicts (order_id) VALUES ('forged')")
    with pytest.raises(Exception, match="readonly"):
        run_readonly_query(reader, "SELECT 1 SETTINGS readonly = 0")
    cols, rows = run_readonly_query(reader, "SELECT count() FROM verdicts WHERE order_id = 'forged'")
    assert rows == [(0,)]
    # The refused write left the writer's session writable (a shared session would now be read-only).
    ClickHouseSink(client).write(batch(2, offset0=1000))
    assert int(client.query("SELECT count() FROM verdicts WHERE order_id = 'order-1'").result_rows[0][0]) >= 1


def test_peer_history_query_returns_released_orders_only(client):
    from streams.apps.peer_history import RELEASED_LINES_SQL, orders_from_rows

    ClickHouseSink(client).write(batch(6, offset0=2000))
    rows = [list(r) for r in client.query(RELEASED_LINES_SQL).result_rows]
    orders = list(orders_from_rows(rows, {"BE8821844": ("RETAIL PHARMACY", "OH")}))
    ids = {o["order_id"] for o in orders}
    assert ids and ids <= {f"order-{i}" for i in range(0, 10, 2)}  # the even ones are RELEASE, the odd HOLD
    assert "order-1" not in ids and len(ids) == len(orders)  # one order per id, however often it was written
    for o in orders:
        assert o["business_activity"] == "RETAIL PHARMACY" and o["purchaser_state"] == "OH"
        assert o["lines"] == [{"drug_family": "OXYCODONE", "dosage_units": 600, "mme": 8070.0}]
        assert o["received_at"] == NOW

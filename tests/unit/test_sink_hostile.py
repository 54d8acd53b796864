"""No input stops the ClickHouse sink, and no dead letter is lost (issue 9).

An attacker's message used to stop the sink (and with it the audit trail and
the review page): values its columns cannot hold were retried forever, a batch
spanning 120 months was refused whole, and a dead letter of a ~1 MB message was
too large to send. Unit-level: a temporary embedded ClickHouse, no broker.
"""
from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timezone
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from streams.pipeline import sink_service
from connectors.clickhouse.audit_chain import verify_store
from connectors.clickhouse.sink import ClickHouseSink, SourceRecord, is_data_error
from connectors.clickhouse.client import apply_ddl, open_client
from connectors.kafka.io import MessageTooLarge, Publisher
from connectors.kafka import catalogue as t
from streams.core.avro_codec import DecodeError, check_ranges, default_codec
from streams.core.config import Settings
from connectors.kafka.emit import MAX_DEAD_LETTER_PAYLOAD, Emitter
from connectors.kafka.testing import PRODUCER_LIMIT, MemoryMessage, MemoryPublisher

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
CODEC = default_codec()
LINE = {"line_no": 1, "ndc": "00406-0512-01", "product_name": "OXYCODONE HCL 10MG TAB", "strength": "10 MG",
        "package_quantity": 100, "packages": 3, "dosage_units": 300, "schedule": "2", "drug_family": "OXYCODONE",
        "base_weight_g": 2.69, "mme": 4035.0}


def verified(oid: str, **line: Any) -> dict[str, Any]:
    return {"order_id": oid, "order_number": f"N-{oid}", "purchaser_dea": "BE8821844", "purchaser_name": "P",
            "supplier_dea": "PK0070297", "signed_at": NOW, "received_at": NOW, "verified_at": NOW,
            "signer_serial": "ab", "signer_fingerprint": "cd", "lines": [dict(LINE, **line)]}


def shipment(sid: str, shipped_at: datetime = NOW, packages: int = 3, ndc: str = "00406-0512-01") -> dict[str, Any]:
    return {"shipment_id": sid, "order_id": f"o-{sid}", "order_number": "N", "purchaser_dea": "BE8821844",
            "supplier_dea": "PK0070297", "shipped_at": shipped_at,
            "lines": [{"line_no": 1, "ndc": ndc, "packages_shipped": packages}]}


def audit(i: int, occurred_at: datetime = NOW, detail: str = "{}") -> dict[str, Any]:
    return {"event_id": f"ev-{i}", "occurred_at": occurred_at, "stage": "monitor", "action": "order.held",
            "order_id": f"o-{i}", "purchaser_dea": "BE8821844", "outcome": "HOLD", "detail": detail, "actor": "t"}


def msg(topic: str, offset: int, schema: str, record: dict[str, Any]) -> MemoryMessage:
    return MemoryMessage(topic, 0, offset, None, CODEC.encode(schema, record))


@pytest.fixture()
def client(tmp_path):
    c = open_client(Settings().with_(data_dir=tmp_path))
    apply_ddl(c)
    yield c
    c.close()


@pytest.fixture()
def service(client):
    """The sink service's decode and write over a real store, its dead letters caught by a fake publisher."""
    svc = object.__new__(sink_service.SinkService)  # no broker: decode() and write() only
    svc.codec, svc.dead_lettered, svc.lock, svc.stopping = CODEC, 0, threading.Lock(), threading.Event()
    svc.emitter = Emitter(MemoryPublisher(), "clickhouse-sink")
    svc.sink = ClickHouseSink(client)
    # Without the fix write() retries a refused batch forever: stop it (it then raises) instead of hanging.
    guard = threading.Timer(30, svc.stopping.set)
    guard.start()
    yield svc
    guard.cancel()


def count(client, sql: str) -> int:
    return int(client.query(sql).result_rows[0][0])


# ------------------------------------------------------------------------------------------ decode
def test_an_int_beyond_32_bits_is_refused_at_decode_and_dead_lettered(service):
    data = CODEC.encode("csos.orders.VerifiedOrder", verified("o-big", packages=2 ** 40))  # fastavro writes it
    with pytest.raises(DecodeError, match=r"OrderLine\.packages = 1099511627776"):
        CODEC.decode(data)
    assert service.decode([MemoryMessage(t.VERIFIED, 0, 3, None, data)]) == []
    [dl] = service.emitter.publisher.records(t.DLQ)
    assert (dl["source_topic"], dl["source_offset"], dl["payload"]) == (t.VERIFIED, 3, data)
    assert "packages" in dl["reason"]
    assert [a["action"] for a in service.emitter.publisher.records(t.AUDIT)] == ["message.dead_lettered"]


def test_a_long_beyond_64_bits_is_out_of_range():
    schema = CODEC.catalog.get("dlq.DeadLetter").parsed
    record = {"dead_letter_id": "x", "failed_at": NOW, "stage": "s", "source_topic": "t", "source_partition": 0,
              "source_offset": 2 ** 63, "key": None, "payload": b"", "reason": "r"}
    with pytest.raises(DecodeError, match="source_offset"):
        check_ranges("dlq.DeadLetter", record, schema)
    check_ranges("dlq.DeadLetter", dict(record, source_offset=2 ** 63 - 1), schema)


# ------------------------------------------------------------------------------------------ column ranges
def test_values_their_columns_cannot_hold_are_dead_lettered_and_the_rest_written(service, client):
    messages = [
        msg(t.VERIFIED, 0, "csos.orders.VerifiedOrder", verified("o-ok-1")),
        msg(t.VERIFIED, 1, "csos.orders.VerifiedOrder", verified("o-line", line_no=70_000)),  # UInt16
        msg(t.VERIFIED, 2, "csos.orders.VerifiedOrder", verified("o-ok-2")),
        msg(t.SHIPMENTS, 0, "warehouse.ShipmentConfirmation", shipment("s-neg", packages=-5)),  # UInt32
        msg(t.SHIPMENTS, 1, "warehouse.ShipmentConfirmation", shipment("s-ok")),
    ]
    records = service.decode(messages)
    service.write(records)
    assert sorted(r[0] for r in client.query("SELECT order_id FROM order_lines").result_rows) == ["o-ok-1", "o-ok-2"]
    assert client.query("SELECT shipment_id FROM shipments").result_rows == [("s-ok",)]
    reasons = {(d["source_topic"], d["source_offset"]): d["reason"] for d in service.emitter.publisher.records(t.DLQ)}
    assert set(reasons) == {(t.VERIFIED, 1), (t.SHIPMENTS, 0)}
    assert "order_lines.line_no = 70000" in reasons[(t.VERIFIED, 1)] and "UInt16" in reasons[(t.VERIFIED, 1)]
    assert "shipments.packages_shipped = -5" in reasons[(t.SHIPMENTS, 0)]
    assert len(service.emitter.publisher.records(t.AUDIT)) == 2 and service.dead_lettered == 2


def test_a_batch_spanning_120_months_is_written_whole(client):
    sink = ClickHouseSink(client)
    months = [datetime(2016 + i // 12, i % 12 + 1, 15, tzinfo=timezone.utc) for i in range(120)]
    records = [SourceRecord(t.SHIPMENTS, 0, i, "warehouse.ShipmentConfirmation", shipment(f"s{i}", at))
               for i, at in enumerate(months)]
    records += [SourceRecord(t.AUDIT, 0, i, "audit.AuditEvent", audit(i, at)) for i, at in enumerate(months)]
    sink.write(records)
    assert count(client, "SELECT count() FROM shipments") == 120
    assert count(client, "SELECT uniqExact(toYYYYMM(shipped_at)) FROM shipments") == 120
    report = verify_store(lambda q: client.query(q).result_rows)  # the chain spans several inserts, intact
    assert report.ok and report.chains[0].events == 120


# ------------------------------------------------------------------------------------------ refused on insert
def test_a_batch_clickhouse_refuses_is_bisected_and_only_the_refused_messages_dead_lettered(service, client):
    # Constraints stand in for any data error only the server sees (the values pass the type checks).
    client.command("ALTER TABLE shipments ADD CONSTRAINT no_boom CHECK ndc != 'BOOM'")
    client.command("ALTER TABLE audit_events ADD CONSTRAINT no_boom CHECK detail != 'BOOM'")
    messages = [msg(t.AUDIT, i, "audit.AuditEvent", audit(i, detail="BOOM" if i == 5 else "{}")) for i in range(12)]
    messages += [msg(t.SHIPMENTS, i, "warehouse.ShipmentConfirmation",
                     shipment(f"s{i}", ndc="BOOM" if i == 2 else "00406-0512-01")) for i in range(8)]
    service.write(service.decode(messages))
    assert count(client, "SELECT count() FROM shipments") == 7
    assert count(client, "SELECT count() FROM audit_events") == 11
    refused = sorted((d["source_topic"], d["source_offset"]) for d in service.emitter.publisher.records(t.DLQ))
    assert refused == sorted([(t.AUDIT, 5), (t.SHIPMENTS, 2)])
    assert all("VIOLATED_CONSTRAINT" in d["reason"] or "469" in d["reason"] for d in service.emitter.publisher.records(t.DLQ))
    # The refused audit event leaves no hole: the next one was sealed after the last one stored.
    report = verify_store(lambda q: client.query(q).result_rows)
    assert report.ok, report.problems
    assert client.query("SELECT chain_seq, chain_offset FROM audit_events WHERE event_id = 'ev-6'").result_rows \
        == [(5, 6)]
    # Redelivered after a crash before the commit: the stored events are recognised, the chain stays whole.
    service.write(service.decode(messages))
    assert count(client, "SELECT count() FROM audit_events FINAL") == 11
    assert count(client, "SELECT count() FROM shipments FINAL") == 7
    assert verify_store(lambda q: client.query(q).result_rows).ok


def test_an_outage_is_retried_not_dead_lettered(service, client):
    insert, calls = service.sink.client.insert, []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("Network Error: connection refused")
        return insert(*args, **kwargs)

    service.sink.client.insert = flaky
    try:
        service.write(service.decode([msg(t.SHIPMENTS, 0, "warehouse.ShipmentConfirmation", shipment("s1"))]))
    finally:
        service.sink.client.insert = insert
    assert count(client, "SELECT count() FROM shipments") == 1 and service.emitter.publisher.messages == []


def test_outages_and_data_errors_are_told_apart():
    assert not is_data_error(OperationalError("Network Error"))
    assert not is_data_error(ConnectionRefusedError())
    assert not is_data_error(DatabaseError("Code: 209. DB::Exception: Timeout (SOCKET_TIMEOUT)", code=209))
    assert not is_data_error(DatabaseError("Code: 252. Too many parts (3000). Merges are processing "
                                           "significantly slower than inserts", code=252))
    assert is_data_error(DatabaseError("Code: 252. Too many partitions for single INSERT block", code=252))
    assert is_data_error(DatabaseError("Code: 53. Type mismatch", code=53))
    assert is_data_error(OverflowError("can't convert negative int to unsigned"))


# ------------------------------------------------------------------------------------------ dead letters
def test_a_dead_letter_of_a_huge_message_is_cut_to_fit_and_the_sink_writes_it(service, client):
    payload = bytes(range(256)) * (1_200_000 // 256)
    publisher = MemoryPublisher()
    Emitter(publisher, "verify").dead_letter("verify", t.RECEIVED, 0, 9, b"k", payload, "undecodable")
    [(topic, value)] = [(m.topic(), m.value()) for m in publisher.on(t.DLQ)]
    assert len(value) < PRODUCER_LIMIT
    dl = CODEC.decode(value)[1]
    assert dl["payload"] == payload[:MAX_DEAD_LETTER_PAYLOAD]
    assert f"of {len(payload)} bytes" in dl["reason"] and hashlib.sha256(payload).hexdigest() in dl["reason"]
    service.write(service.decode([MemoryMessage(t.DLQ, 0, 0, None, value)]))
    assert client.query("SELECT source_offset, length(base64Decode(payload_base64)), position(reason, 'SHA-256') > 0 "
                        "FROM dead_letters").result_rows == [(9, MAX_DEAD_LETTER_PAYLOAD, True)]


def test_a_dead_letter_the_producer_still_refuses_keeps_its_reason_size_and_hash():
    payload = b"x" * 300_000
    publisher = MemoryPublisher(limit=100_000)  # a producer configured below the dead letters' margin
    Emitter(publisher, "verify").dead_letter("verify", t.RECEIVED, 0, 9, None, payload, "undecodable")
    [dl] = publisher.records(t.DLQ)
    assert dl["payload"] == b"" and "300000 bytes" in dl["reason"]
    assert hashlib.sha256(payload).hexdigest() in dl["reason"]


def test_the_publisher_names_a_message_too_large_for_the_producer():
    publisher = Publisher("127.0.0.1:1")  # refused before any broker is contacted
    with pytest.raises(MessageTooLarge, match="1100000 bytes"):
        publisher.publish(t.DLQ, None, b"x" * 1_100_000)


def test_an_audit_event_repeated_at_a_new_offset_is_sealed_once(service, client):
    """A worker recovering from a crash publishes its recorded outputs again, byte for byte: the same event id
    at a later offset. Sealing both would leave a gap once the table keeps one row per event id."""
    first = [msg(t.AUDIT, i, "audit.AuditEvent", audit(i)) for i in range(4)]
    service.write(service.decode(first))
    repeats = [msg(t.AUDIT, 4 + i, "audit.AuditEvent", audit(i)) for i in (1, 2)]  # ev-1, ev-2 again
    later = [msg(t.AUDIT, 6, "audit.AuditEvent", audit(6))]
    service.write(service.decode(repeats + later))
    client.command("OPTIMIZE TABLE audit_events FINAL")
    assert count(client, "SELECT count() FROM audit_events") == 5
    report = verify_store(lambda q: client.query(q).result_rows)
    assert report.ok, report.problems
    assert client.query("SELECT chain_seq, chain_offset FROM audit_events WHERE event_id = 'ev-6'").result_rows \
        == [(4, 6)]
    # A sink that restarts has forgotten what it sealed: ClickHouse still knows.
    fresh = ClickHouseSink(client)
    fresh.write(service.decode([msg(t.AUDIT, 7, "audit.AuditEvent", audit(3))]))
    assert count(client, "SELECT count() FROM audit_events") == 5

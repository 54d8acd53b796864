"""The dashboards' aggregates (017_dashboard_aggregates.sql) against the two ways they could go wrong.

* An existing installation upgraded: the orders it stored before the aggregates existed must be in them
  (backfilled once by the migration), and not counted again by a later start.
* A sink that stored a batch and crashed before committing its offsets: Kafka re-delivers the messages,
  in a batch formed differently (more messages arrived meanwhile), so the insert deduplication tokens
  differ; the aggregates' sums cannot collapse a copy as FINAL does on the tables, so the re-delivered
  messages must not be inserted again.

Both on the embedded engine in a temporary directory, through the sink's own write path.
"""
from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from clickhouse_connect.driver.exceptions import OperationalError

from connectors.clickhouse.client import DDL_DIR, apply_ddl, open_client
from connectors.clickhouse.sink import ClickHouseSink, SourceRecord
from connectors.kafka import catalogue as t
from streams.core.config import Settings

DAY = datetime(2026, 11, 2, 15, 0, tzinfo=timezone.utc)


def line(no: int) -> dict:
    return {"line_no": no, "ndc": "00406-0512-01", "product_name": "OXYCODONE HCL 10MG TAB", "strength": "10 MG",
            "package_quantity": 100, "packages": 1, "dosage_units": 100, "schedule": "2",
            "drug_family": "OXYCODONE", "base_weight_g": 0.9, "mme": 1500.0}


def order_messages(i: int, offset: int) -> list[SourceRecord]:
    """A verified order of two lines and its verdict (held every third order), at ``offset`` on each topic."""
    oid, at = f"o-{i}", DAY + timedelta(minutes=i)
    hold = i % 3 == 0
    verified = {"order_id": oid, "order_number": f"26X{i:06d}", "purchaser_dea": "BE8821844", "purchaser_name": "P",
                "supplier_dea": "PK0070297", "signed_at": at, "received_at": at, "verified_at": at,
                "signer_serial": "ab", "signer_fingerprint": "cd", "business_activity": "RETAIL PHARMACY",
                "purchaser_state": "TX", "lines": [line(1), line(2)]}
    reason = {"detector": "size", "dimension": "size", "drug_family": "OXYCODONE", "value": 200.0,
              "baseline": 100.0, "threshold": 150.0, "window": "EW mean", "fired": hold, "enforced": True,
              "explanation": "big" if hold else ""}
    verdict = {"order_id": oid, "order_number": f"26X{i:06d}", "purchaser_dea": "BE8821844",
               "verdict": "HOLD" if hold else "RELEASE", "decided_at": at, "received_at": at, "signed_at": at,
               "model_version": "t", "reasons": [reason], "lines": [line(1), line(2)], "total_dosage_units": 200}
    return [SourceRecord(t.VERIFIED, 0, offset, "csos.orders.VerifiedOrder", verified),
            SourceRecord(t.VERDICTS, 0, offset, "som.Verdict", verdict)]


def orders(first: int, last: int) -> list[SourceRecord]:
    return [m for i in range(first, last) for m in order_messages(i, offset=i)]


def dashboard_totals(client) -> dict[str, int]:
    """What the dashboards read: orders and lines per day (volume), per registrant and week, and verdicts."""
    q = lambda sql: int(client.query(sql).result_rows[0][0] or 0)  # noqa: E731
    return {
        "orders": q("SELECT sum(orders) FROM dash_volume_day"),
        "lines": q("SELECT sum(lines) FROM dash_volume_day"),
        "registrant_orders": q("SELECT sum(orders) FROM dash_registrant_week"),
        "verdicts": q("SELECT sum(orders) FROM dash_verdict_day WHERE drug_family = ''"),
        "holds": q("SELECT sum(orders) FROM dash_verdict_day WHERE verdict = 'HOLD' AND detector = 'size'"),
    }


def expected(n: int) -> dict[str, int]:
    holds = len([i for i in range(n) if i % 3 == 0])
    return {"orders": n, "lines": 2 * n, "registrant_orders": n, "verdicts": n, "holds": holds}


@pytest.fixture()
def client(tmp_path: Path):
    c = open_client(Settings().with_(data_dir=tmp_path))
    yield c
    c.close()


def test_orders_stored_before_the_upgrade_are_in_the_aggregates_once(client, tmp_path):
    before = tmp_path / "ddl-before-017"  # an installation from before the dashboards
    before.mkdir()
    for path in sorted(DDL_DIR.glob("*.sql")):
        if path.name < "017":
            shutil.copy(path, before / path.name)
    apply_ddl(client, before)
    for statement in ("CREATE TABLE sink_progress (topic String, partition UInt32, stored_offset Int64) "
                      "ENGINE = ReplacingMergeTree(stored_offset) ORDER BY (topic, partition)",
                      "CREATE TABLE sink_batches (topic String, partition UInt32, batch_id String, "
                      "batch_partitions UInt32, first_offset Int64, last_offset Int64) "
                      "ENGINE = ReplacingMergeTree(last_offset) ORDER BY (topic, partition)"):
        client.command(statement)  # what the sink writes besides (019, 021), so this old store can take its writes
    ClickHouseSink(client).write(orders(0, 12))
    # and a copy of some, as an old sink re-delivering a re-formed batch stored them: FINAL collapses them
    client.insert("order_lines", [["o-1", "26X000001", "BE8821844", "P", "PK0070297", DAY, DAY, DAY, "ab", 1,
                                   "00406-0512-01", "X", "10 MG", 100, 1, 100, "2", "OXYCODONE", 0.9, 1500.0,
                                   "RETAIL PHARMACY", "TX"]],
                  column_names=["order_id", "order_number", "purchaser_dea", "purchaser_name", "supplier_dea",
                                "signed_at", "received_at", "verified_at", "signer_serial", "line_no", "ndc",
                                "product_name", "strength", "package_quantity", "packages", "dosage_units",
                                "schedule", "drug_family", "base_weight_g", "mme", "business_activity",
                                "purchaser_state"])

    apply_ddl(client)  # the upgrade: creates the aggregates and backfills them
    assert dashboard_totals(client) == expected(12)

    ClickHouseSink(client).write(orders(12, 15))  # new orders reach the aggregates through the views
    apply_ddl(client)  # a later start: no second backfill
    assert dashboard_totals(client) == expected(15)


def test_a_batch_re_delivered_after_a_crash_counts_once(client):
    apply_ddl(client)
    ClickHouseSink(client).write(orders(0, 10))  # stored; the sink dies before committing the offsets
    restarted = ClickHouseSink(client)
    restarted.write(orders(0, 16))  # Kafka re-delivers from the last commit, with the orders that came since
    restarted.write(orders(10, 16))  # and a part of it once more (another restart): other tokens again
    assert dashboard_totals(client) == expected(16)
    # the tables themselves hold each row once, without FINAL
    assert int(client.query("SELECT count() FROM order_lines").result_rows[0][0]) == 32
    assert int(client.query("SELECT count() FROM verdicts").result_rows[0][0]) == 16


class TimesOutAfterStoring:
    """A ClickHouse client whose first insert into ``table`` is stored but reported as a timeout (as a server
    does when the connection drops after it wrote the block): the sink retries the batch with the same tokens."""

    def __init__(self, client, table: str) -> None:
        self.client, self.table, self.failed = client, table, False

    def insert(self, table, *args, **kwargs):
        result = self.client.insert(table, *args, **kwargs)
        if table == self.table and not self.failed:
            self.failed = True
            raise OperationalError("timed out (the block was stored)")
        return result

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_an_insert_retried_after_a_timeout_counts_once(client):
    apply_ddl(client)
    flaky = TimesOutAfterStoring(client, "order_lines")
    sink = ClickHouseSink(flaky)  # type: ignore[arg-type]
    batch = orders(0, 9)
    with pytest.raises(OperationalError):
        sink.write(batch)
    sink.write(batch)  # the sink service's retry: the same batch, so the same tokens
    assert dashboard_totals(client) == expected(9)


def test_a_sink_assigned_partitions_rereads_what_another_stored(client):
    apply_ddl(client)
    first, second = ClickHouseSink(client), ClickHouseSink(client)
    assert second.progress.stored_offset(t.VERIFIED, 0) == -1
    first.write(orders(0, 5))  # written by another sink while it owned the partition
    second.forget()  # on assignment
    assert second.progress.stored_offset(t.VERIFIED, 0) == 4
    second.write(orders(0, 8))
    assert dashboard_totals(client) == expected(8)


def test_a_recreated_topic_is_stored_again_not_skipped(client):
    """A topic deleted and re-created (or a new broker) against an old store starts again at offset 0: its
    messages must be stored, not skipped as "already stored" by the old progress."""
    apply_ddl(client)
    ClickHouseSink(client).write(orders(0, 10))  # the old topic's offsets 0..9 stored
    restarted = ClickHouseSink(client)
    # on assignment the sink service compares the progress with each partition's end (what the broker says)
    assert restarted.progress.drop_beyond(t.VERIFIED, 0, 10) is False  # the same topic, grown: progress kept
    assert restarted.progress.stored_offset(t.VERIFIED, 0) == 9
    assert restarted.progress.drop_beyond(t.VERIFIED, 0, 3) is True  # re-created: it ends before the progress
    assert restarted.progress.drop_beyond(t.VERDICTS, 0, 3) is True
    fresh = [SourceRecord(m.topic, m.partition, m.offset - 20, m.schema, m.record) for m in orders(20, 23)]
    restarted.write(fresh)  # the new topic's offsets 0..2: new orders
    assert dashboard_totals(client)["orders"] == 13
    assert ClickHouseSink(client).progress.stored_offset(t.VERIFIED, 0) == 2  # what a later start reads

"""`csos summary` counts each order once, whatever was written twice.

A crash makes the pipeline write some rows again (a redelivered batch) and,
before the fix for issue 10, even give one order two outcomes (verified, then
rejected as a duplicate of itself); the verify agent also re-publishes a
rerouted order. The summary once added up per-table counts and reported
15,063 orders received for 11,476; now every count is of distinct order ids,
each in one class, and an order with two outcomes is shown as a conflict.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from connectors.clickhouse.client import apply_ddl, open_client
from streams.core.config import Settings
from streams.apps.summary import fetch_summary

ROWS = [
    # A: verified (two lines, the second batch written twice), then rejected by its own redelivery
    "INSERT INTO order_lines (order_id, purchaser_dea, line_no) VALUES ('A', 'BX1', 1), ('A', 'BX1', 2)",
    "INSERT INTO order_lines (order_id, purchaser_dea, line_no) VALUES ('A', 'BX1', 2)",
    "INSERT INTO rejections (order_id, reason_code) VALUES ('A', 'DUPLICATE_ORDER_NUMBER')",
    # B: rejected, the row written twice (not merged yet); E: rejected once
    "INSERT INTO rejections (order_id, reason_code) VALUES ('B', 'SIGNATURE_INVALID')",
    "INSERT INTO rejections (order_id, reason_code) VALUES ('B', 'SIGNATURE_INVALID')",
    "INSERT INTO rejections (order_id, reason_code) VALUES ('E', 'CERT_REVOKED')",
    # C: parked, then verified once the reference data came; D: still parked
    "INSERT INTO pending_orders (order_id) VALUES ('C'), ('D'), ('D')",
    "INSERT INTO order_lines (order_id, purchaser_dea, line_no) VALUES ('C', 'BX2', 1)",
    # verdicts for the verified ones, A's written twice
    "INSERT INTO verdicts (order_id, purchaser_dea, verdict) VALUES ('A', 'BX1', 'RELEASE'), ('C', 'BX2', 'HOLD')",
    "INSERT INTO verdicts (order_id, purchaser_dea, verdict) VALUES ('A', 'BX1', 'RELEASE')",
    # one unreadable message, dead-lettered twice (a redelivery)
    "INSERT INTO dead_letters (dead_letter_id, stage, source_topic, source_partition, source_offset) "
    "VALUES ('d1', 'verify', 'csos.orders.received', 0, 7), ('d1', 'verify', 'csos.orders.received', 0, 7)",
]


@pytest.fixture()
def store(tmp_path: Path):
    settings = Settings.from_env().with_(data_dir=tmp_path, clickhouse_url="")
    client = open_client(settings)
    apply_ddl(client)
    for statement in ROWS:
        client.command(statement)
    try:
        yield settings, client
    finally:
        client.close()


def test_every_order_is_counted_once_in_one_class(store) -> None:
    settings, client = store
    s = fetch_summary(settings, query=lambda q: [list(r) for r in client.query(q).result_rows])
    assert (s.verified, s.rejected, s.pending, s.dead_lettered) == (2, 2, 1, 1)
    assert s.received == 6  # A, B, C, D, E and the unreadable message
    assert s.rejected_by_reason == {"SIGNATURE_INVALID": 1, "CERT_REVOKED": 1}
    assert (s.released, s.held) == (1, 1)
    assert s.conflicting == 1
    assert "verified AND rejected" in s.render()

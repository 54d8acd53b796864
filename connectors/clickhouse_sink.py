"""Write verdicts, rejections, order lines, audit events and dead letters to ClickHouse.

All access goes through clickhouse-connect, so the same code talks to the
embedded engine (``chdb:///dir``, zero setup) and to a ClickHouse server
(``http(s)://...``) with the same DDL from ``schemas/clickhouse/``.

Delivery from Kafka is at-least-once, so every write must be idempotent:
  * an exact retry of a batch carries the same ``insert_deduplication_token``
    (table + topic-partition + offset range) and is dropped by the server;
  * a batch re-formed differently after a restart collapses on each table's
    ReplacingMergeTree sorting key (order id, event id), so queries that need
    exact counts use ``FINAL`` (the ``csos sql`` docs say so).
"""
from __future__ import annotations

import base64
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from streams.config import REPO_ROOT, Settings

DDL_DIR = REPO_ROOT / "schemas" / "clickhouse"


def open_client(settings: Settings, *, readonly: bool = False) -> Client:
    """Connect to the configured ClickHouse; create the database if we may."""
    url = settings.effective_clickhouse_url
    db = settings.clickhouse_database
    if url.startswith("chdb:"):
        Path(url[len("chdb://"):]).mkdir(parents=True, exist_ok=True)
        client = clickhouse_connect.get_client(dsn=url)
        if not readonly:
            client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        client.database = db
    else:
        parsed = urlparse(url)
        kwargs: dict[str, Any] = dict(
            host=parsed.hostname, port=parsed.port, secure=parsed.scheme == "https",
            username=parsed.username or settings.clickhouse_user,
            password=parsed.password or settings.clickhouse_password,
        )
        if not readonly:
            admin = clickhouse_connect.get_client(**kwargs)
            admin.command(f"CREATE DATABASE IF NOT EXISTS {db}")
            admin.close()
        client = clickhouse_connect.get_client(database=db, **kwargs)
    return client


def apply_ddl(client: Client, ddl_dir: Path = DDL_DIR) -> list[str]:
    """Apply every DDL file in order; each is idempotent (IF NOT EXISTS)."""
    applied = []
    for path in sorted(ddl_dir.glob("*.sql")):
        sql = "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("--"))
        for statement in (s.strip() for s in sql.split(";")):
            if statement:
                client.command(statement)
        applied.append(path.name)
    return applied


@dataclass(frozen=True)
class SourceRecord:
    """A decoded message and where it came from (for dedup tokens)."""

    topic: str
    partition: int
    offset: int
    schema: str
    record: dict[str, Any]


TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "order_lines": (
        "order_id", "order_number", "purchaser_dea", "purchaser_name", "supplier_dea", "signed_at",
        "received_at", "verified_at", "signer_serial", "line_no", "ndc", "product_name", "strength",
        "package_quantity", "packages", "dosage_units", "schedule", "drug_family", "base_weight_g", "mme",
    ),
    "verdicts": (
        "order_id", "order_number", "purchaser_dea", "verdict", "decided_at", "received_at", "signed_at",
        "model_version", "total_dosage_units", "fired_detectors", "summary",
    ),
    "verdict_reasons": (
        "order_id", "purchaser_dea", "decided_at", "verdict", "detector", "dimension", "drug_family",
        "value", "baseline", "threshold", "window", "fired", "explanation",
    ),
    "rejections": (
        "order_id", "received_at", "rejected_at", "reason_code", "reason", "order_number",
        "purchaser_dea", "signer_subject", "checks",
    ),
    "audit_events": (
        "event_id", "occurred_at", "stage", "action", "order_id", "purchaser_dea", "outcome", "detail", "actor",
    ),
    "dead_letters": (
        "dead_letter_id", "failed_at", "stage", "source_topic", "source_partition", "source_offset",
        "reason", "payload_base64",
    ),
}


def verdict_summary(verdict: dict[str, Any]) -> str:
    """One sentence an analyst or a warehouse clerk can read."""
    fired = [r for r in verdict["reasons"] if r["fired"]]
    if not fired:
        return "Released: no detector fired."
    return "Held: " + " ".join(r["explanation"] for r in fired)


def rows_for(schema: str, rec: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """Map one decoded message to rows per table."""
    if schema == "csos.orders.VerifiedOrder":
        head = [rec["order_id"], rec["order_number"], rec["purchaser_dea"], rec["purchaser_name"],
                rec["supplier_dea"], rec["signed_at"], rec["received_at"], rec["verified_at"], rec["signer_serial"]]
        return {"order_lines": [
            head + [ln["line_no"], ln["ndc"], ln["product_name"], ln["strength"], ln["package_quantity"],
                    ln["packages"], ln["dosage_units"], ln["schedule"], ln["drug_family"], ln["base_weight_g"], ln["mme"]]
            for ln in rec["lines"]
        ]}
    if schema == "som.Verdict":
        fired = [r["detector"] for r in rec["reasons"] if r["fired"]]
        return {
            "verdicts": [[rec["order_id"], rec["order_number"], rec["purchaser_dea"], rec["verdict"], rec["decided_at"],
                          rec["received_at"], rec["signed_at"], rec["model_version"], rec["total_dosage_units"],
                          sorted(set(fired)), verdict_summary(rec)]],
            "verdict_reasons": [
                [rec["order_id"], rec["purchaser_dea"], rec["decided_at"], rec["verdict"], r["detector"], r["dimension"],
                 r["drug_family"], r["value"], r["baseline"], r["threshold"], r["window"], r["fired"], r["explanation"]]
                for r in rec["reasons"]
            ],
        }
    if schema == "csos.orders.Rejection":
        return {"rejections": [[
            rec["order_id"], rec["received_at"], rec["rejected_at"], rec["reason_code"], rec["reason"],
            rec["order_number"], rec["purchaser_dea"], rec["signer_subject"],
            [(c["check"], c["passed"], c["detail"]) for c in rec["checks"]],
        ]]}
    if schema == "audit.AuditEvent":
        return {"audit_events": [[rec[c] for c in TABLE_COLUMNS["audit_events"]]]}
    if schema == "dlq.DeadLetter":
        return {"dead_letters": [[
            rec["dead_letter_id"], rec["failed_at"], rec["stage"], rec["source_topic"], rec["source_partition"],
            rec["source_offset"], rec["reason"], base64.b64encode(rec["payload"]).decode("ascii"),
        ]]}
    return {}


class ClickHouseSink:
    """Batched, idempotent writer. Not thread-safe: call from one thread."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.rows_written: dict[str, int] = defaultdict(int)

    def write(self, batch: Iterable[SourceRecord]) -> dict[str, int]:
        per_table: dict[str, list[list[Any]]] = defaultdict(list)
        ranges: dict[str, dict[tuple[str, int], list[int]]] = defaultdict(dict)
        for item in batch:
            for table, rows in rows_for(item.schema, item.record).items():
                per_table[table].extend(rows)
                span = ranges[table].setdefault((item.topic, item.partition), [item.offset, item.offset])
                span[0] = min(span[0], item.offset)
                span[1] = max(span[1], item.offset)
        written = {}
        for table, rows in per_table.items():
            token = table + "|" + ",".join(
                f"{t}:{p}:{lo}-{hi}" for (t, p), (lo, hi) in sorted(ranges[table].items()))
            self.client.insert(table, rows, column_names=list(TABLE_COLUMNS[table]),
                               settings={"insert_deduplication_token": token})
            self.rows_written[table] += len(rows)
            written[table] = len(rows)
        return written


def run_readonly_query(client: Client, sql: str) -> tuple[list[str], list[tuple]]:
    """Run an analyst's query with ``readonly=1``: no statement can change data."""
    result = client.query(sql, settings={"readonly": 1})
    return list(result.column_names), [tuple(r) for r in result.result_rows]


def to_json_rows(columns: list[str], rows: list[tuple]) -> str:
    return json.dumps({"columns": columns, "rows": [list(r) for r in rows]}, default=str)

"""Daily regulatory reports from ClickHouse: suspicious order reports and the CSOS fill report.

Both are read through the analysts' read-only path (``connectors.clickhouse.query``) and
written per day as CSV (one row per order line, for spreadsheets and upload
tools) and JSON (the same facts, one object per report or order). Sending
them to DEA is outside this system; these files are what gets sent.

* **Suspicious orders** (21 CFR 1301.74(b)): every case an analyst REPORTED
  that day, from ``suspicious_order_reports`` (written by the case agent at
  the moment of the decision, so later edits to reference data cannot change
  what was reported).
* **Filled orders** (21 CFR 1305.29): every line the warehouse confirmed as
  shipped on that day (``shipments``, from the ``warehouse.shipments``
  topic), due at DEA within two business days of the ship date. Each line is
  checked against what was ordered and released; a shipment of an order that
  was never released, of more packages than ordered, or of an unknown order
  is marked in ``exception`` (it is reported all the same: DEA must hear of
  every shipment, and the exception needs investigating).
"""
from __future__ import annotations

import csv
import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Callable

Query = Callable[[str], tuple[list[str], list[list[Any]]]]

SOR_COLUMNS = (
    "report_id", "order_id", "transaction_id", "order_form_number", "ordering_registrant_dea",
    "ordering_registrant_name", "reporting_registrant_dea", "date_received", "reported_at", "reported_by",
    "line_no", "ndc", "product_name", "strength", "unit", "package_quantity", "quantity", "dosage_units",
    "drug_family", "schedule", "circumstances",
)
#: The CSOS fill report: what 1305.29 asks for first, then what ties each line to our records.
FILL_COLUMNS = (
    "order_number", "purchaser_dea", "supplier_dea", "ndc", "packages_shipped", "ship_date",
    "line_no", "order_id", "shipment_id", "packages_ordered", "exception",
)
REPORT_LEVEL = ("report_id", "order_id", "order_form_number", "ordering_registrant_dea", "ordering_registrant_name",
                "reporting_registrant_dea", "date_received", "reported_at", "reported_by", "circumstances")


def business_days_after(day: date, n: int) -> date:
    """``day`` plus ``n`` business days (Monday to Friday; federal holidays are not known here)."""
    d = day
    while n > 0:
        d += timedelta(days=1)
        if d.weekday() < 5:
            n -= 1
    return d


def _rows(query: Query, sql: str) -> list[dict[str, Any]]:
    columns, rows = query(sql)
    return [dict(zip(columns, r)) for r in rows]


def suspicious_order_rows(query: Query, day: date) -> list[dict[str, Any]]:
    """One row per line of every suspicious order reported on ``day`` (UTC)."""
    ts = "reported_at", "date_received"
    select = ", ".join(f"toString({c}) AS {c}" if c in ts else c for c in SOR_COLUMNS)
    return _rows(query, f"SELECT {select} FROM suspicious_order_reports FINAL "
                        f"WHERE toDate(reported_at) = toDate('{day.isoformat()}') "
                        f"ORDER BY reported_at, order_id, line_no")


def fill_rows(query: Query, day: date) -> list[dict[str, Any]]:
    """One row per shipped line with ship date ``day`` (UTC), checked against the order and its release."""
    d = day.isoformat()
    return _rows(query, f"""
        SELECT s.order_number AS order_number, s.purchaser_dea AS purchaser_dea, s.supplier_dea AS supplier_dea,
               s.ndc AS ndc, s.packages_shipped AS packages_shipped, toString(toDate(s.shipped_at)) AS ship_date,
               s.line_no AS line_no, s.order_id AS order_id, s.shipment_id AS shipment_id,
               o.packages AS packages_ordered,
               multiIf(o.found = 0, 'UNKNOWN_ORDER',
                       s.order_id NOT IN (SELECT order_id FROM verdicts FINAL WHERE verdict = 'RELEASE')
                         AND s.order_id NOT IN (SELECT order_id FROM cases FINAL WHERE status = 'RELEASED'),
                       'NOT_RELEASED',
                       s.packages_shipped > o.packages, 'MORE_THAN_ORDERED',
                       '') AS exception
        FROM shipments AS s FINAL
        LEFT JOIN (SELECT order_id, line_no, any(packages) AS packages, 1 AS found FROM order_lines FINAL
                   GROUP BY order_id, line_no) AS o
          ON o.order_id = s.order_id AND o.line_no = s.line_no
        WHERE toDate(s.shipped_at) = toDate('{d}')
        ORDER BY s.shipped_at, s.order_number, s.line_no""")


@dataclass(frozen=True)
class Written:
    csv_path: Path
    json_path: Path
    rows: int
    exceptions: int = 0


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_suspicious_order_report(query: Query, day: date, out_dir: Path) -> Written:
    """``suspicious-orders-<day>.csv`` (one row per line) and ``.json`` (one object per report, lines nested)."""
    rows = suspicious_order_rows(query, day)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"suspicious-orders-{day.isoformat()}"
    _write_csv(stem.with_suffix(".csv"), SOR_COLUMNS, rows)
    reports: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for r in rows:
        rep = reports.setdefault(r["report_id"], {k: r[k] for k in REPORT_LEVEL} | {"lines": []})
        rep["lines"].append({k: r[k] for k in SOR_COLUMNS if k not in REPORT_LEVEL})
    stem.with_suffix(".json").write_text(json.dumps(
        {"report": "suspicious orders (21 CFR 1301.74(b))", "date": day.isoformat(),
         "reports": list(reports.values())}, indent=2, default=str) + "\n")
    return Written(stem.with_suffix(".csv"), stem.with_suffix(".json"), len(rows))


def write_fill_report(query: Query, day: date, out_dir: Path) -> Written:
    """``csos-fill-report-<day>.csv`` and ``.json``: orders filled on ``day``, with the date DEA must have them."""
    rows = fill_rows(query, day)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"csos-fill-report-{day.isoformat()}"
    _write_csv(stem.with_suffix(".csv"), FILL_COLUMNS, rows)
    exceptions = [r for r in rows if r["exception"]]
    stem.with_suffix(".json").write_text(json.dumps(
        {"report": "CSOS orders filled (21 CFR 1305.29)", "ship_date": day.isoformat(),
         "send_by": business_days_after(day, 2).isoformat(), "lines": rows, "exceptions": exceptions},
        indent=2, default=str) + "\n")
    return Written(stem.with_suffix(".csv"), stem.with_suffix(".json"), len(rows), len(exceptions))

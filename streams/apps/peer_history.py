"""Shipped-order history for building peer profiles (``csos peers build``).

Peer profiles must learn only from orders that shipped. Two sources:

* the pipeline's ClickHouse store: ``order_lines`` of orders whose verdict is
  RELEASE, with each purchaser's business activity and state from a registrant
  CSV (the same file ``csos registrants load`` publishes), since the lines do
  not carry them;
* an ARCOS transaction file: every ARCOS record is a shipment, and carries the
  buyer's business activity and state.
"""
from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

RELEASED_LINES_SQL = """
SELECT l.order_id, l.purchaser_dea, toUnixTimestamp64Milli(l.received_at) AS ms, l.drug_family,
       sum(l.dosage_units) AS units, sum(l.mme) AS mme
FROM order_lines AS l FINAL
WHERE l.order_id IN (SELECT order_id FROM verdicts FINAL WHERE verdict = 'RELEASE')
GROUP BY l.order_id, l.purchaser_dea, ms, l.drug_family
ORDER BY ms, l.order_id
"""


def registrant_directory(path: str | Path) -> dict[str, tuple[str | None, str | None]]:
    """``{dea_number: (business_activity, state)}`` from a registrant CSV."""
    out = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            dea = (row.get("dea_number") or "").strip().upper()
            if dea:
                out[dea] = ((row.get("business_activity") or "").strip().upper() or None,
                            (row.get("state") or "").strip().upper() or None)
    return out


def orders_from_rows(rows: list[list[Any]], directory: dict[str, tuple[str | None, str | None]]
                     ) -> Iterator[dict[str, Any]]:
    """Order dicts (the fields peer profiles read) from rows of :data:`RELEASED_LINES_SQL`."""
    current: dict[str, Any] | None = None
    for order_id, dea, ms, family, units, mme in rows:
        if current is None or current["order_id"] != order_id:
            if current is not None:
                yield current
            act, state = directory.get(str(dea).upper(), (None, None))
            current = {"order_id": order_id, "purchaser_dea": dea, "business_activity": act,
                       "purchaser_state": state, "lines": [],
                       "received_at": datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)}
        current["lines"].append({"drug_family": family, "dosage_units": int(units), "mme": float(mme)})
    if current is not None:
        yield current


def released_orders_from_clickhouse(settings: Any, registrants_csv: str | Path) -> Iterator[dict[str, Any]]:
    """Released orders in the pipeline's ClickHouse store (read-only query)."""
    from connectors.clickhouse.query import run_query
    _, rows = run_query(settings, RELEASED_LINES_SQL)
    return orders_from_rows(rows, registrant_directory(registrants_csv))


__all__ = ["RELEASED_LINES_SQL", "registrant_directory", "orders_from_rows", "released_orders_from_clickhouse"]

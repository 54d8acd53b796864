"""Read-only data for the review page, from the ClickHouse tables the sink writes.

Why through :func:`connectors.clickhouse.query.run_query`: with the embedded engine the sink process owns the
store, so reads go through its read-only ``/sql`` endpoint while it runs (and open the store with
``readonly=1`` when it does not). That endpoint takes SQL text, not bound parameters, so every value
is bound client-side with clickhouse-connect's own escaping (:func:`finalize_query`), after ids have
also been checked against a strict pattern. Times are selected as epoch milliseconds so that both
paths (JSON from the sink, Python objects from a client) give the same values.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from clickhouse_connect.driver.binding import finalize_query

from streams.core.config import Settings
from connectors.clickhouse.query import run_query

#: Order ids are UUIDs from the intake; accept a little more (other feeds) but nothing SQL can use.
ORDER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
#: How far back the registrant's history chart reaches, and how far after the held order.
HISTORY_DAYS = 180
AFTER_DAYS = 14
RECENTLY_CLOSED = 25


def valid_order_id(order_id: str) -> bool:
    return bool(ORDER_ID_RE.match(order_id or ""))


def from_ms(ms: Any) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)


@dataclass(frozen=True)
class CaseRow:
    order_id: str
    order_number: str
    purchaser_dea: str
    status: str
    version: int
    updated_at: datetime
    held_at: datetime
    due_at: datetime
    escalated_at: datetime | None
    decided_by: str
    rationale: str
    evidence_notes: str
    summary: str
    drug_families: list[str]
    total_dosage_units: int

    def overdue(self, now: datetime) -> bool:
        return self.status == "HELD" and now >= self.due_at

    def age(self, now: datetime) -> timedelta:
        return now - self.held_at


@dataclass(frozen=True)
class Reason:
    detector: str
    dimension: str
    drug_family: str
    value: float
    baseline: float
    threshold: float
    window: str
    enforced: bool
    explanation: str


@dataclass(frozen=True)
class Line:
    line_no: int
    ndc: str
    product_name: str
    strength: str
    package_quantity: int
    packages: int
    dosage_units: int
    schedule: str
    drug_family: str


@dataclass(frozen=True)
class CaseEventRow:
    at: datetime
    kind: str
    status: str
    actor: str
    rationale: str
    evidence_notes: str
    error: str


@dataclass(frozen=True)
class HistoryPoint:
    """One order of the registrant for one drug family (units summed over the order's lines)."""

    order_id: str
    received_at: datetime
    dosage_units: int
    verdict: str  # HOLD | RELEASE | "" (no verdict recorded yet)


@dataclass
class CaseDetail:
    case: CaseRow
    purchaser_name: str
    received_at: datetime | None
    reasons: list[Reason]
    lines: list[Line]
    events: list[CaseEventRow]
    history: dict[str, list[HistoryPoint]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # family -> the size detector's threshold


_CASE_COLUMNS = ("order_id, order_number, purchaser_dea, status, version, toUnixTimestamp64Milli(updated_at), "
                 "toUnixTimestamp64Milli(held_at), toUnixTimestamp64Milli(due_at), "
                 "toUnixTimestamp64Milli(escalated_at), decided_by, rationale, evidence_notes, summary, "
                 "drug_families, total_dosage_units")


def _case(r: list[Any]) -> CaseRow:
    return CaseRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), from_ms(r[5]), from_ms(r[6]),
                   from_ms(r[7]), from_ms(r[8]), str(r[9]), str(r[10]), str(r[11]), str(r[12]),
                   [str(f) for f in (r[13] or [])], int(r[14]))


class ReviewData:
    """The page's queries. Thread-safe: one query at a time (the embedded engine is single-session)."""

    def __init__(self, settings: Settings,
                 runner: Callable[[Settings, str], tuple[list[str], list[list[Any]]]] = run_query) -> None:
        self.settings = settings
        self._run = runner
        self._lock = threading.Lock()

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[list[Any]]:
        """Rows of ``sql`` with ``%(name)s`` placeholders bound and escaped by clickhouse-connect."""
        text = finalize_query(sql, params or {})
        with self._lock:
            return [list(r) for r in self._run(self.settings, text)[1]]

    # ------------------------------------------------------------------ lists
    def held_cases(self) -> list[CaseRow]:
        """Every open case, oldest deadline first (the ones to work on now)."""
        rows = self.query(f"SELECT {_CASE_COLUMNS} FROM cases FINAL WHERE status = 'HELD' "
                          "ORDER BY due_at, held_at, order_id")
        return [_case(r) for r in rows]

    def closed_cases(self, limit: int = RECENTLY_CLOSED) -> list[CaseRow]:
        rows = self.query(f"SELECT {_CASE_COLUMNS} FROM cases FINAL WHERE status != 'HELD' "
                          "ORDER BY updated_at DESC, order_id LIMIT %(limit)s", {"limit": int(limit)})
        return [_case(r) for r in rows]

    def case(self, order_id: str) -> CaseRow | None:
        if not valid_order_id(order_id):
            return None
        rows = self.query(f"SELECT {_CASE_COLUMNS} FROM cases FINAL WHERE order_id = %(id)s", {"id": order_id})
        return _case(rows[0]) if rows else None

    def case_status(self, order_id: str) -> str | None:
        """The case's current status as the sink last wrote it (the agent may be a moment ahead)."""
        case = self.case(order_id)
        return case.status if case else None

    # ------------------------------------------------------------------ one case
    def detail(self, order_id: str) -> CaseDetail | None:
        case = self.case(order_id)
        if case is None:
            return None
        p = {"id": order_id}
        reasons = [Reason(str(r[0]), str(r[1]), str(r[2]), float(r[3]), float(r[4]), float(r[5]), str(r[6]),
                          bool(r[7]), str(r[8]))
                   for r in self.query(
                       "SELECT detector, dimension, drug_family, value, baseline, threshold, window, enforced, "
                       "explanation FROM verdict_reasons FINAL WHERE order_id = %(id)s AND fired "
                       "ORDER BY enforced DESC, detector, drug_family", p)]
        line_rows = self.query(
            "SELECT line_no, ndc, product_name, strength, package_quantity, packages, dosage_units, schedule, "
            "drug_family, purchaser_name, toUnixTimestamp64Milli(received_at) FROM order_lines FINAL "
            "WHERE order_id = %(id)s ORDER BY line_no", p)
        lines = [Line(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), int(r[5]), int(r[6]), str(r[7]),
                      str(r[8])) for r in line_rows]
        events = [CaseEventRow(from_ms(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6]))
                  for r in self.query(
                      "SELECT toUnixTimestamp64Milli(at), kind, status, actor, rationale, evidence_notes, error "
                      "FROM case_events FINAL WHERE order_id = %(id)s ORDER BY at, version, event_id", p)]
        received = from_ms(line_rows[0][10]) if line_rows else None
        detail = CaseDetail(case, str(line_rows[0][9]) if line_rows else "", received, reasons, lines, events)
        families = case.drug_families or sorted({ln.drug_family for ln in lines})
        anchor = received or case.held_at
        for family in families:
            detail.history[family] = self.history(case.purchaser_dea, family, anchor)
        for r in reasons:
            if r.detector == "size" and r.drug_family in families:
                detail.thresholds[r.drug_family] = r.threshold
        return detail

    def history(self, purchaser_dea: str, family: str, anchor: datetime,
                days: int = HISTORY_DAYS, after_days: int = AFTER_DAYS) -> list[HistoryPoint]:
        """The registrant's orders of ``family`` from ``days`` before ``anchor`` to ``after_days`` after it.

        One point per order (its lines of the family summed), with the monitor's verdict so held
        orders can be drawn differently: a pattern of earlier holds is part of the due diligence.
        """
        p = {"dea": purchaser_dea, "family": family, "start": int((anchor - timedelta(days=days)).timestamp() * 1000),
             "end": int((anchor + timedelta(days=after_days)).timestamp() * 1000)}
        rows = self.query(
            "SELECT order_id, toUnixTimestamp64Milli(min(received_at)) AS at, sum(dosage_units) "
            "FROM order_lines FINAL WHERE purchaser_dea = %(dea)s AND drug_family = %(family)s "
            "AND received_at >= fromUnixTimestamp64Milli(%(start)s, 'UTC') "
            "AND received_at <= fromUnixTimestamp64Milli(%(end)s, 'UTC') "
            "GROUP BY order_id ORDER BY at, order_id", p)
        verdicts = dict((str(r[0]), str(r[1])) for r in self.query(
            "SELECT order_id, verdict FROM verdicts FINAL WHERE purchaser_dea = %(dea)s "
            "AND received_at >= fromUnixTimestamp64Milli(%(start)s, 'UTC') "
            "AND received_at <= fromUnixTimestamp64Milli(%(end)s, 'UTC')", p))
        return [HistoryPoint(str(r[0]), from_ms(r[1]), int(r[2]), verdicts.get(str(r[0]), "")) for r in rows]

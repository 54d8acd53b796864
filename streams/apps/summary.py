"""The compliance summary: what happened to every order, from ClickHouse."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from streams.core.config import Settings
from connectors.clickhouse.query import run_query


@dataclass
class Summary:
    verified: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    pending: int = 0
    released: int = 0
    held: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    held_by_reason: dict[str, int] = field(default_factory=dict)
    cases_by_status: dict[str, int] = field(default_factory=dict)
    overdue: int = 0  # HELD cases past their due-diligence deadline
    conflicting: int = 0  # orders both verified and rejected (counted as verified): must be 0

    @property
    def received(self) -> int:
        return self.verified + self.rejected + self.dead_lettered + self.pending

    def render(self) -> str:
        out = [
            "CSOS order summary",
            "==================",
            f"Orders received:            {self.received:>7}",
            f"  verified (signature, certificate, CRL, DEA number, schedules): {self.verified}",
            f"  rejected (may not be filled; purchaser must send a new order): {self.rejected}",
        ]
        out += [f"      {code:<28} {n:>6}" for code, n in sorted(self.rejected_by_reason.items())]
        out.append(f"  awaiting reference data (CRL, registrant, product; parked, not filled): {self.pending}")
        out.append(f"  unreadable messages set aside (dead-letter topic): {self.dead_lettered}")
        if self.conflicting:
            out.append(f"  !! verified AND rejected (counted as verified above; investigate): {self.conflicting}")
        out.append(f"Verified orders released to ship: {self.released}")
        out.append(f"Verified orders held for due diligence (not shipped): {self.held}")
        out += [f"      {why:<28} {n:>6}" for why, n in sorted(self.held_by_reason.items())]
        if self.held_by_reason:
            out.append("      (an order held for several reasons counts under each)")
        if self.cases_by_status:
            out.append("Due-diligence cases: " + ", ".join(
                f"{k} {v}" for k, v in sorted(self.cases_by_status.items())) +
                (f" ({self.overdue} HELD past the deadline)" if self.overdue else ""))
        return "\n".join(out)


#: Each order id once, in one class: verified beats rejected beats parked. Re-publications (a rerouted
#: order is put back on the received topic), redeliveries after a crash and not-yet-merged parts all
#: share the order id, so no order is counted twice however often it was written.
_CLASSES = """
SELECT countIf(v), countIf(r AND NOT v), countIf(p AND NOT v AND NOT r), countIf(v AND r)
FROM (SELECT order_id, max(src = 'v') AS v, max(src = 'r') AS r, max(src = 'p') AS p FROM (
      SELECT DISTINCT order_id, 'v' AS src FROM order_lines
      UNION ALL SELECT DISTINCT order_id, 'r' AS src FROM rejections
      UNION ALL SELECT DISTINCT order_id, 'p' AS src FROM pending_orders)
      GROUP BY order_id)
"""


def fetch_summary(settings: Settings,
                  query: Callable[[str], list[list[Any]]] | None = None) -> Summary:
    """Count what happened to every order, each order id once (``query`` runs SQL; default the pipeline's store)."""
    sql = query or (lambda q: run_query(settings, q)[1])
    s = Summary()
    rows = sql(_CLASSES)
    s.verified, s.rejected, s.pending, s.conflicting = (int(x) for x in rows[0])
    rows = sql("SELECT reason_code, count() FROM rejections FINAL "
               "WHERE order_id NOT IN (SELECT order_id FROM order_lines) GROUP BY reason_code")
    s.rejected_by_reason = {r[0]: int(r[1]) for r in rows}
    rows = sql("SELECT uniqExact(source_topic, source_partition, source_offset) FROM dead_letters "
               "WHERE stage = 'verify'")
    s.dead_lettered = int(rows[0][0])
    rows = sql("SELECT verdict, count() FROM verdicts FINAL GROUP BY verdict")
    counts = {r[0]: int(r[1]) for r in rows}
    s.released, s.held = counts.get("RELEASE", 0), counts.get("HOLD", 0)
    rows = sql("SELECT concat(dimension, ' (', detector, ')'), uniqExact(order_id) "
               "FROM verdict_reasons FINAL WHERE fired AND enforced AND verdict = 'HOLD' GROUP BY 1")
    s.held_by_reason = {r[0]: int(r[1]) for r in rows}
    rows = sql("SELECT status, count(), countIf(status = 'HELD' AND due_at < now64(3)) "
               "FROM cases FINAL GROUP BY status")
    s.cases_by_status = {r[0]: int(r[1]) for r in rows}
    s.overdue = sum(int(r[2]) for r in rows)
    return s

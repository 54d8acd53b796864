"""The analysts' dashboards as data: filters parsed and checked, the queries of :mod:`.dashboard_sql` run, rows
shaped for the pages and their charts.

Why apart from the web handlers: the same functions are what the tests assert (aggregates, filters, the growth
ranking) against an embedded ClickHouse loaded with known rows, with no HTTP in between. Queries go through
``ReviewData.query`` (the review page's read-only path: the sink's ``/sql`` on the embedded engine, a
``readonly=1`` client on a server), so the dashboards need no access the review page does not already have.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Mapping
from urllib.parse import urlencode

from streams.apps.reports import business_days_after
from streams.apps.review import dashboard_sql as q
from streams.apps.review.data import HistoryPoint, from_ms
from streams.core.config import Settings
from streams.core.errors import CsosError

Query = Callable[[str, dict[str, Any]], list[list[Any]]]

DEFAULT_DAYS = 90
MAX_DAYS = 3 * 366
#: Growth compares the last RECENT_WEEKS weeks of the range with the registrant's earlier weeks in it.
RECENT_WEEKS = 4
TOP = 25
#: Drug families, states and business activities as the reference data writes them; anything else is refused.
_CHOICE_RE = re.compile(r"^[A-Z0-9][A-Z0-9 _./&()-]{0,59}$")
DEA_RE = re.compile(r"^[A-Z]{2}[0-9]{7}$|^[A-Z0-9]{2,20}$")
METRICS = {"units": "dosage units", "mme": "MME"}
SORTS = {"own": "against its own history", "peer": "against its peers"}


class FilterError(CsosError, ValueError):
    """A filter value the dashboards cannot use; the message says which and why."""

    code = "DASHBOARD_FILTER"


@dataclass(frozen=True)
class Filters:
    """Date range (UTC days, inclusive), drug family, state and business activity ('' = all)."""

    start: date
    end: date
    family: str = ""
    state: str = ""
    activity: str = ""

    @classmethod
    def from_query(cls, query: Mapping[str, str], today: date) -> "Filters":
        """From the page's query string; the default range is the last 90 days up to ``today``."""
        try:
            end = date.fromisoformat(query.get("end") or today.isoformat())
            start = date.fromisoformat(query.get("start") or (end - timedelta(days=DEFAULT_DAYS - 1)).isoformat())
        except ValueError:
            raise FilterError("Dates are YYYY-MM-DD.") from None
        if start > end:
            raise FilterError("The start date is after the end date.")
        if (end - start).days >= MAX_DAYS:
            raise FilterError(f"The range may span at most {MAX_DAYS} days.")
        values = {}
        for name in ("family", "state", "activity"):
            value = (query.get(name) or "").strip().upper()
            if value and not _CHOICE_RE.match(value):
                raise FilterError(f"That is not a {name} name.")
            values[name] = value
        return cls(start, end, **values)

    def params(self) -> dict[str, Any]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "family": self.family,
                "state": self.state, "activity": self.activity}

    def query_string(self, **extra: str) -> str:
        """The filters as a query string, for links that keep them (empty filters left out)."""
        return urlencode({k: v for k, v in dict(self.params(), **extra).items() if v})

    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days + 1)]


@dataclass
class Series:
    """Values per category (days or weeks) for each named series: what a stacked bar chart draws."""

    categories: list[date]
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, category: date, value: float) -> None:
        row = self.values.setdefault(name, [0.0] * len(self.categories))
        row[self._index[category]] += value

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.categories)}

    def total(self, name: str | None = None) -> float:
        return sum(sum(v) for k, v in self.values.items() if name is None or k == name)


def _day(value: Any) -> date:
    return value if isinstance(value, date) and not isinstance(value, datetime) else date.fromisoformat(str(value)[:10])


def _series(filters: Filters, rows: list[list[Any]], name: Callable[[list[Any]], str], value_at: int) -> Series:
    out = Series(filters.days())
    for r in rows:
        day = _day(r[0])
        if filters.start <= day <= filters.end:
            out.add(name(r), day, float(r[value_at]))
    return out


def choices(run: Query, filters: Filters) -> dict[str, list[str]]:
    rows = run(q.FILTER_CHOICES, filters.params())
    fam, states, acts = rows[0] if rows else ([], [], [])
    return {"family": [f for f in fam if f], "state": [s for s in states if s], "activity": [a for a in acts if a]}


def overview(run: Query, filters: Filters, now: datetime, clock_days: float) -> dict[str, Any]:
    """Everything the overview page shows, for ``filters`` at ``now``."""
    p = filters.params()
    verdicts = _series(filters, run(q.VERDICTS_PER_DAY, p), lambda r: str(r[1]), 2)
    hold_rows = run(q.HOLDS_BY_DETECTOR, p)
    holds = _series(filters, hold_rows, lambda r: str(r[1]), 3)
    holds_by_family: dict[tuple[str, str], int] = defaultdict(int)
    for r in hold_rows:
        holds_by_family[(str(r[1]), str(r[2]))] += int(r[3])
    volume = _series(filters, run(q.VOLUME_PER_DAY, p), lambda r: str(r[1]), 3)
    rejections = _series(filters, run(q.REJECTIONS_PER_DAY, p), lambda r: str(r[1]), 2)
    dead = _series(filters, run(q.DEAD_LETTERS_PER_DAY, p), lambda r: str(r[1]), 2)
    now_ms = int(now.timestamp() * 1000)
    ages = [(int(r[0]), int(r[1]), int(r[2])) for r in run(q.OPEN_CASES_BY_AGE, dict(p, now=now_ms))]
    oldest = [{"order_id": str(r[0]), "order_number": str(r[1]), "purchaser_dea": str(r[2]), "held_at": from_ms(r[3]),
               "due_at": from_ms(r[4]), "families": [str(f) for f in r[5]], "units": int(r[6])}
              for r in run(q.OLDEST_OPEN_CASES, dict(p, limit=TOP))]
    decisions: dict[str, dict[str, int]] = defaultdict(dict)
    for actor, kind, n in run(q.DECISIONS_PER_ANALYST, p):
        decisions[str(actor)][str(kind)] = int(n)
    weeks = [(_day(r[0]), int(r[1]), int(r[2])) for r in run(q.REPORTED_PER_WEEK, p)]
    return {"verdicts": verdicts, "holds": holds, "volume": volume, "rejections": rejections, "dead": dead,
            "holds_by_family": sorted(holds_by_family.items(), key=lambda kv: (-kv[1], kv[0])),
            "ages": ages, "clock_days": clock_days, "oldest": oldest, "decisions": dict(decisions),
            "weeks": weeks, "reports": report_status(run, filters)}


def report_status(run: Query, filters: Filters) -> list[dict[str, Any]]:
    """Per day, newest first: the fill report's lines and exceptions and its send-by date (the last 14 days of
    the range); the suspicious-order report's reported cases against orders in the report ("missing" when a
    REPORTED case has no report)."""
    p = filters.params()
    days: dict[date, dict[str, Any]] = {}
    for r in run(q.FILL_REPORT_STATUS, p):
        day = _day(r[0])
        days.setdefault(day, {"day": day})
        days[day].update(shipped_lines=int(r[1]), shipped_orders=int(r[2]), not_released=int(r[3]),
                         send_by=business_days_after(day, 2))
    for r in run(q.SOR_STATUS, p):
        day = _day(r[0])
        days.setdefault(day, {"day": day}).update(reported_cases=int(r[1]), reported_orders=int(r[2]))
    out = []
    for day in sorted(days, reverse=True):
        row = dict({"shipped_lines": 0, "shipped_orders": 0, "not_released": 0, "send_by": None,
                    "reported_cases": 0, "reported_orders": 0}, **days[day])
        row["sor_missing"] = max(0, row["reported_cases"] - row["reported_orders"])
        out.append(row)
    return out


@dataclass(frozen=True)
class Grower:
    """One registrant and family in the growth ranking."""

    purchaser_dea: str
    drug_family: str
    business_activity: str
    state: str
    recent: float
    baseline: float
    own_ratio: float
    peer_median: float
    peer_ratio: float
    peers: int


def growth(run: Query, filters: Filters, *, metric: str = "units", sort: str = "own",
           recent_weeks: int = RECENT_WEEKS, limit: int = TOP) -> list[Grower]:
    """Registrants whose ``metric`` grew most in the last ``recent_weeks`` weeks of the range (``sort``: own or
    peer). A range shorter than that compares the week holding ``end`` with the weeks before it."""
    if metric not in METRICS or sort not in SORTS:
        raise FilterError("Unknown measure or ranking.")
    recent_weeks = max(1, min(recent_weeks, (filters.end - filters.start).days // 7))
    rows = run(q.GROWTH, dict(filters.params(), metric=metric, sort=sort, recent_weeks=recent_weeks, limit=limit))
    return [Grower(str(r[0]), str(r[1]), str(r[2]), str(r[3]), float(r[4]), float(r[5]), float(r[6]),
                   float(r[7]), float(r[8]), int(r[9])) for r in rows]


def valid_dea(dea: str) -> bool:
    return bool(DEA_RE.match(dea or ""))


def registrant(run: Query, dea: str, filters: Filters) -> dict[str, Any]:
    """The registrant page: totals per family, order points per family (holds marked), thresholds, cases, reports."""
    p = dict(filters.params(), dea=dea)
    families = [{"family": str(r[0]), "activity": str(r[1]), "state": str(r[2]), "orders": int(r[3]),
                 "units": int(r[4]), "mme": float(r[5]), "first": _day(r[6]), "last": _day(r[7])}
                for r in run(q.REGISTRANT_FAMILIES, p)]
    points: dict[str, list[HistoryPoint]] = defaultdict(list)
    for oid, family, at, units, verdict in run(q.REGISTRANT_ORDERS, p):
        points[str(family)].append(HistoryPoint(str(oid), from_ms(at), int(units), str(verdict or "")))
    thresholds = {str(r[0]): float(r[1]) for r in run(q.REGISTRANT_THRESHOLDS, p)}
    cases = [{"order_id": str(r[0]), "order_number": str(r[1]), "status": str(r[2]), "held_at": from_ms(r[3]),
              "due_at": from_ms(r[4]), "updated_at": from_ms(r[5]), "decided_by": str(r[6]),
              "families": [str(f) for f in r[7]], "units": int(r[8])}
             for r in run(q.REGISTRANT_CASES, dict(p, limit=200))]
    reports = [{"report_id": str(r[0]), "order_id": str(r[1]), "order_form_number": str(r[2]),
                "reported_at": from_ms(r[3]), "reported_by": str(r[4]), "families": sorted(str(f) for f in r[5]),
                "units": int(r[6])} for r in run(q.REGISTRANT_REPORTS, dict(p, limit=200))]
    return {"dea": dea, "families": families, "points": dict(sorted(points.items())), "thresholds": thresholds,
            "open": [c for c in cases if c["status"] == "HELD"], "closed": [c for c in cases if c["status"] != "HELD"],
            "reports": reports}


def today_utc() -> date:
    return datetime.now(timezone.utc).date()


def dashboard_url(settings: Settings | None = None) -> str:
    """Where ``csos review`` serves the dashboards with these settings (default: the environment's;
    CSOS_REVIEW_HOST, _PORT)."""
    review = (settings or Settings.from_env()).review
    return f"http://{review.host}:{review.port}/dashboard"

"""Every ClickHouse query of the Grafana dashboards runs on real pipeline data, so a broken panel fails CI.

The panels' SQL is taken from ``deploy/grafana/dashboards/*.json`` as Grafana stores it, the
plugin's macros are expanded the way grafana-clickhouse-datasource expands them (``pkg/macros``:
``$__timeFilter(c)`` -> ``c >= toDateTime(<from>) AND c <= toDateTime(<to>)`` and so on), the
dashboard variables are filled in as Grafana would (each value in turn), and the result goes to the
session pipeline's sink through its read-only ``/sql`` path: the same guard and ``readonly=1``
session an analyst has, on the embedded engine loaded by the ``streamed`` fixture.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
CLICKHOUSE = "grafana-clickhouse-datasource"
#: Panels the session's feed always gives rows (the others may be empty: no analyst decides there).
ALWAYS_DATA = {"Holds per day by detector", "Holds per day by drug family", "Releases per day by drug family",
               "Holds and releases per day", "Rejections per day by reason", "Dead letters per day by stage"}


def expand_macros(sql: str, start: datetime, end: datetime, interval_s: int = 3600) -> str:
    """Grafana ClickHouse plugin macros, as its backend expands them (v4)."""
    def dt(t: datetime) -> str:
        return f"toDateTime({int(t.timestamp())})"

    def dt64(t: datetime) -> str:
        return f"fromUnixTimestamp64Milli({int(t.timestamp() * 1000)})"

    def date(t: datetime) -> str:
        return f"toDate('{t.strftime('%Y-%m-%d')}')"

    with_args = {
        "timeFilter_ms": lambda c: f"{c} >= {dt64(start)} AND {c} <= {dt64(end)}",
        "timeFilter": lambda c: f"{c} >= {dt(start)} AND {c} <= {dt(end)}",
        "dateFilter": lambda c: f"{c} >= {date(start)} AND {c} <= {date(end)}",
        "timeInterval_ms": lambda c: f"toStartOfInterval(toDateTime64({c}, 3), INTERVAL {interval_s * 1000} millisecond)",
        "timeInterval": lambda c: f"toStartOfInterval(toDateTime({c}), INTERVAL {interval_s} second)",
    }
    for name, fn in with_args.items():
        sql = re.sub(rf"\$__{name}\(\s*([^()]+?)\s*\)", lambda m, fn=fn: fn(m.group(1)), sql)
    plain = {"fromTime_ms": dt64(start), "toTime_ms": dt64(end), "fromTime": dt(start), "toTime": dt(end),
             "interval_s": str(interval_s)}
    for name, value in plain.items():
        sql = sql.replace(f"$__{name}", value)
    assert "$__" not in sql, f"a macro this test does not know: {sql}"
    return sql


def fill_variables(sql: str, values: dict[str, str]) -> str:
    """``$name`` and ``${name}`` replaced by the variable's value, as Grafana does before the plugin sees it."""
    for name, value in values.items():
        sql = sql.replace("${" + name + "}", value)
        sql = re.sub(rf"\${name}\b", value, sql)
    assert not re.search(r"\$\{?[A-Za-z]", sql), f"an unfilled dashboard variable: {sql}"
    return sql


def clickhouse_queries() -> Iterator[tuple[str, str, str, str]]:
    """(dashboard, panel title, format, rawSql) of every ClickHouse panel target, and each variable's query."""
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        for var in dash.get("templating", {}).get("list", []):
            if (var.get("datasource") or {}).get("type") == CLICKHOUSE:
                yield path.name, f"variable {var['name']}", "table", var["query"]
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                ds = target.get("datasource") or panel.get("datasource") or {}
                if ds.get("type") == CLICKHOUSE:
                    yield path.name, panel["title"], target.get("queryType", "table"), target["rawSql"]


def test_the_macro_expansion_matches_the_plugin():
    start = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    end = start + timedelta(days=1)
    assert expand_macros("WHERE $__timeFilter(decided_at)", start, end) == \
        f"WHERE decided_at >= toDateTime({int(start.timestamp())}) AND decided_at <= toDateTime({int(end.timestamp())})"
    assert expand_macros("$__timeFilter_ms(t) $__fromTime_ms", start, end) == \
        f"t >= fromUnixTimestamp64Milli(1767323045678) AND t <= fromUnixTimestamp64Milli(1767409445678) " \
        f"fromUnixTimestamp64Milli(1767323045678)"
    assert expand_macros("$__dateFilter(d)", start, end) == "d >= toDate('2026-01-02') AND d <= toDate('2026-01-03')"
    assert expand_macros("$__timeInterval(t)", start, end, 60) == "toStartOfInterval(toDateTime(t), INTERVAL 60 second)"


def test_every_dashboard_query_is_a_clickhouse_or_prometheus_one():
    queries = list(clickhouse_queries())
    titles = {title for _dash, title, _fmt, _sql in queries}
    assert ALWAYS_DATA <= titles
    assert {"Open cases by age against the due-diligence clock", "Decisions per analyst",
            "Reported orders per week"} <= titles
    for path in DASHBOARDS.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            kinds = {(t.get("datasource") or panel["datasource"])["type"] for t in panel["targets"]}
            assert kinds <= {CLICKHOUSE, "prometheus"}, (path.name, panel["title"], kinds)


@pytest.mark.kafka
def test_every_clickhouse_panel_runs_on_the_pipelines_data(streamed):
    from connectors.clickhouse.query import run_query

    now = datetime.now(timezone.utc)
    start, end = now - timedelta(days=800), now + timedelta(days=1)
    families = [r[0] for r in streamed.sql("SELECT DISTINCT drug_family FROM order_lines ORDER BY drug_family")]
    held_family = streamed.sql("SELECT drug_family FROM verdict_reasons FINAL WHERE verdict = 'HOLD' AND fired "
                               "AND drug_family != '*' GROUP BY drug_family ORDER BY count() DESC LIMIT 1")[0][0]
    assert held_family in families
    failures: list[str] = []
    rows_seen: dict[str, int] = {}
    for value in ("ALL", held_family):  # "All" (the variable's allValue) and one family
        for dash, title, fmt, raw in clickhouse_queries():
            sql = fill_variables(expand_macros(raw, start, end), {"family": value})
            try:
                columns, rows = run_query(streamed.settings, sql)
            except Exception as exc:  # noqa: BLE001 - collect them all: one report names every broken panel
                failures.append(f"{dash} / {title} (family={value}): {exc}")
                continue
            if fmt == "timeseries" and rows:  # (the embedded engine names no columns for an empty result)
                assert columns[0] == "time", (title, columns)  # the plugin's time-series format needs it
            if value == "ALL":
                rows_seen[title] = len(rows)
    assert not failures, "\n".join(failures)
    empty = sorted(t for t in ALWAYS_DATA if not rows_seen.get(t))
    assert not empty, f"panels with no rows on the session's data: {empty}"
    # A drawn number agrees with the table it summarises: holds per day add up to the held orders.
    held = int(streamed.sql("SELECT countIf(verdict = 'HOLD') FROM verdicts FINAL")[0][0])
    raw = next(sql for _d, title, _f, sql in clickhouse_queries() if title == "Holds and releases per day")
    _cols, rows = run_query(streamed.settings, fill_variables(expand_macros(raw, start, end), {"family": "ALL"}))
    assert sum(int(r[1]) for r in rows) == held


"""``csos bench-dashboards``: every dashboard query timed against millions of order lines on the embedded engine.

Why generated inside ClickHouse: ten million order lines signed, verified and streamed through Kafka would take
hours on a small machine and measure the pipeline, not the dashboards. ``INSERT ... SELECT FROM numbers()``
writes them in seconds, through the sink's own DDL, so the materialized views fill exactly as they do when the
sink inserts; the queries timed are the text of :mod:`streams.apps.review.dashboard_sql`, bound as the pages bind
them and run on a ``readonly=1`` client through the analysts' guard (``run_readonly_query``), as the review
page does when no sink holds the store.

The data: ``lines`` order lines, 7 per order, from ``registrants`` registrants over ``days`` days ending today,
six drug families, four business activities, ten states; 1 % of orders held (with cases: open for the last
ten days, then released or reported), 2 % rejected, one shipment line per released order, some dead letters.
"""
from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.binding import finalize_query

from connectors.clickhouse.client import apply_ddl
from connectors.clickhouse.client import open_client
from connectors.clickhouse.client import run_readonly_query

from streams.core.config import Settings
from streams.apps.review import dashboard_sql as q

LINES_PER_ORDER = 7
CHUNK_LINES = 2_000_000
FAMILIES = "['OXYCODONE','HYDROCODONE','MORPHINE','FENTANYL','METHADONE','AMPHETAMINE']"
ACTIVITIES = "['RETAIL PHARMACY','CHAIN PHARMACY','HOSPITAL/CLINIC','PRACTITIONER']"
STATES = "['TX','CA','FL','OH','NY','PA','KY','WV','TN','GA']"

#: Expressions of an order number ``o`` shared by every generated table (so the rows agree with each other).
_DEA = "concat('AB', leftPad(toString(o % {registrants}), 7, '0'))"
_AT = ("toDateTime64(toDateTime({end}) - toIntervalSecond(intHash32(o) % ({days} * 86400)), 3, 'UTC')")
_HELD = "(o % 100 = 0)"
_REJECTED = "(o % 50 = 1)"
AGGREGATES = ("dash_volume_day", "dash_registrant_week", "dash_verdict_day", "dash_growth", "dash_released_orders")


@dataclass(frozen=True)
class Timing:
    name: str
    median_ms: float
    best_ms: float
    rows: int


def _expr(template: str, registrants: int, days: int, end: int) -> str:
    return template.format(registrants=registrants, days=days, end=end)


def load(client: Any, lines: int, registrants: int, days: int, end: datetime) -> dict[str, int]:
    """Generate the tables inside ClickHouse; returns the row count per table."""
    e = int(end.timestamp())
    dea, at = _expr(_DEA, registrants, days, e), _expr(_AT, registrants, days, e)
    reg = f"(o % {registrants})"
    for start in range(0, lines, CHUNK_LINES):
        n = min(CHUNK_LINES, lines - start)
        client.command(f"""
            INSERT INTO order_lines (order_id, order_number, purchaser_dea, purchaser_name, supplier_dea, signed_at,
                received_at, verified_at, signer_serial, line_no, ndc, product_name, strength, package_quantity,
                packages, dosage_units, schedule, drug_family, base_weight_g, mme, business_activity, purchaser_state)
            SELECT concat('o', toString(o)), toString(o), {dea}, 'PHARMACY', 'PK0070297', {at}, {at}, {at}, 'ab',
                   l + 1, '00406-0512-01', 'PRODUCT', '10 MG', 100, p, p * 100, '2',
                   {FAMILIES}[1 + intHash32(o * 7 + l) % 6], p * 0.5, p * 150.0,
                   {ACTIVITIES}[1 + {reg} % 4], {STATES}[1 + intHash32({reg}) % 10]
            FROM (SELECT intDiv(number, {LINES_PER_ORDER}) AS o, number % {LINES_PER_ORDER} AS l,
                         1 + intHash32(number) % 20 AS p FROM numbers({start}, {n}))
            WHERE NOT {_REJECTED}""")
    orders = (lines + LINES_PER_ORDER - 1) // LINES_PER_ORDER
    first_family = f"{FAMILIES}[1 + intHash32(o * 7) % 6]"
    client.command(f"""
        INSERT INTO verdicts (order_id, order_number, purchaser_dea, verdict, decided_at, received_at, signed_at,
                              model_version, total_dosage_units, fired_detectors, summary)
        SELECT concat('o', toString(o)), toString(o), {dea}, if({_HELD}, 'HOLD', 'RELEASE'), {at}, {at}, {at}, 'b',
               1000, if({_HELD}, ['size'], []), '' FROM (SELECT number AS o FROM numbers({orders}))
        WHERE NOT {_REJECTED}""")
    client.command(f"""
        INSERT INTO verdict_reasons (order_id, purchaser_dea, decided_at, verdict, detector, dimension, drug_family,
                                     value, baseline, threshold, window, fired, explanation, enforced)
        SELECT concat('o', toString(o)), {dea}, {at}, if({_HELD}, 'HOLD', 'RELEASE'), d, 'size', {first_family},
               1000, 300, 1200, 'w', {_HELD} AND d = 'size', '', d = 'size'
        FROM (SELECT number AS o FROM numbers({orders})) ARRAY JOIN ['size', 'static_8000_du'] AS d
        WHERE NOT {_REJECTED}""")
    recent = f"({at} > now64(3) - INTERVAL 10 DAY)"
    status = f"if({recent}, 'HELD', if(o % 1000 = 0, 'REPORTED', 'RELEASED'))"
    client.command(f"""
        INSERT INTO cases (order_id, order_number, purchaser_dea, status, version, updated_at, held_at, due_at,
                           decided_by, rationale, evidence_notes, summary, drug_families, total_dosage_units)
        SELECT concat('o', toString(o)), toString(o), {dea}, {status}, 2, {at} + INTERVAL 1 DAY, {at},
               {at} + INTERVAL 7 DAY, if({recent}, '', concat('analyst', toString(o % 7))), '', '', 'Held',
               [{first_family}], 1000
        FROM (SELECT number * 100 AS o FROM numbers(intDiv({orders}, 100)))""")
    client.command(f"""
        INSERT INTO case_events (event_id, order_id, order_number, purchaser_dea, kind, status, version, at, held_at,
                                 due_at, actor, rationale, evidence_notes, error, summary, drug_families,
                                 total_dosage_units)
        SELECT concat('e', toString(o), '-', toString(v)), concat('o', toString(o)), toString(o), {dea},
               if(v = 1, 'OPENED', {status}), if(v = 1, 'HELD', {status}), v, {at} + toIntervalDay(v - 1), {at},
               {at} + INTERVAL 7 DAY, if(v = 1, 'case-agent', concat('analyst', toString(o % 7))), '', '', '', '',
               [{first_family}], 1000
        FROM (SELECT number * 100 AS o FROM numbers(intDiv({orders}, 100))) ARRAY JOIN [1, 2] AS v
        WHERE v = 1 OR NOT {recent}""")
    client.command(f"""
        INSERT INTO suspicious_order_reports (report_id, order_id, transaction_id, order_form_number,
            ordering_registrant_dea, ordering_registrant_name, reporting_registrant_dea, date_received, reported_at,
            reported_by, circumstances, line_no, ndc, product_name, strength, unit, package_quantity, quantity,
            dosage_units, drug_family, schedule)
        SELECT concat('r', toString(o)), concat('o', toString(o)), concat('o', toString(o), '/1'), toString(o), {dea},
               'PHARMACY', 'PK0070297', {at}, {at} + INTERVAL 1 DAY, 'analyst0', '', 1, '00406-0512-01', 'P', '10 MG',
               'pkg', 100, 10, 1000, {first_family}, '2'
        FROM (SELECT number * 1000 AS o FROM numbers(intDiv({orders}, 1000))) WHERE NOT {recent}""")
    client.command(f"""
        INSERT INTO rejections (order_id, received_at, rejected_at, reason_code, reason)
        SELECT concat('o', toString(o)), {at}, {at}, ['CERT_REVOKED','BAD_SIGNATURE','UNKNOWN_REGISTRANT'][1 + o % 3],
               'generated' FROM (SELECT number AS o FROM numbers({orders})) WHERE {_REJECTED}""")
    client.command(f"""
        INSERT INTO dead_letters (dead_letter_id, failed_at, stage, source_topic, source_partition, source_offset,
                                  reason, payload_base64)
        SELECT concat('x', toString(o)), {at}, ['verify','monitor','sink'][1 + o % 3], 'csos.orders.received', 0, o,
               'generated', '' FROM (SELECT number * 997 AS o FROM numbers(intDiv({orders}, 997)))""")
    client.command(f"""
        INSERT INTO shipments (shipment_id, order_id, order_number, purchaser_dea, supplier_dea, shipped_at, line_no,
                               ndc, packages_shipped)
        SELECT concat('s', toString(o)), concat('o', toString(o)), toString(o), {dea}, 'PK0070297',
               {at} + INTERVAL 1 DAY, 1, '00406-0512-01', 5
        FROM (SELECT number AS o FROM numbers({orders})) WHERE NOT {_HELD} AND NOT {_REJECTED}""")
    tables = ("order_lines", "verdicts", "verdict_reasons", "cases", "case_events", "suspicious_order_reports",
              "rejections", "dead_letters", "shipments")
    return _counts(client, tables + AGGREGATES)


def _counts(client: Any, tables: tuple[str, ...]) -> dict[str, int]:
    return {t: int(client.query(f"SELECT count() FROM {t}").result_rows[0][0]) for t in tables}


def settle(client: Any) -> None:
    """Merge the aggregates' parts, as the engine's background merges do within minutes of a steady load.

    A bulk load of a year in a few minutes leaves a SummingMergeTree with unmerged parts (2.8x the rows for
    ``dash_registrant_week``) that a store filled over the year would not have; the queries are timed on the
    settled tables, the state they are in after a day's orders.
    """
    for table in AGGREGATES:
        client.command(f"OPTIMIZE TABLE {table} FINAL")


def cases(end: datetime, busiest_dea: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, query name, parameters): every query with the page's default filters, and the filtered variants."""
    base = {"start": (end.date() - timedelta(days=89)).isoformat(), "end": end.date().isoformat(), "family": "",
            "state": "", "activity": ""}
    now = int(end.timestamp() * 1000)
    growth = dict(base, metric="units", sort="own", recent_weeks=4, limit=25)
    reg = dict(base, dea=busiest_dea, limit=200)
    out = [(name, name, dict(base, now=now, limit=25)) for name in
           ("FILTER_CHOICES", "VERDICTS_PER_DAY", "HOLDS_BY_DETECTOR", "VOLUME_PER_DAY", "REJECTIONS_PER_DAY",
            "DEAD_LETTERS_PER_DAY", "OPEN_CASES_BY_AGE", "OLDEST_OPEN_CASES", "DECISIONS_PER_ANALYST",
            "REPORTED_PER_WEEK", "FILL_REPORT_STATUS", "SOR_STATUS")]
    out += [("GROWTH", "GROWTH", growth),
            ("GROWTH (MME, peers, one family and state)", "GROWTH",
             dict(growth, metric="mme", sort="peer", family="OXYCODONE", state="TX")),
            ("VOLUME_PER_DAY (one family, state, activity)", "VOLUME_PER_DAY",
             dict(base, family="OXYCODONE", state="TX", activity="RETAIL PHARMACY")),
            ("GROWTH (a whole year)", "GROWTH", dict(growth, start=(end.date() - timedelta(days=364)).isoformat()))]
    out += [(name, name, reg) for name in ("REGISTRANT_FAMILIES", "REGISTRANT_ORDERS", "REGISTRANT_THRESHOLDS",
                                           "REGISTRANT_CASES", "REGISTRANT_REPORTS")]
    assert {name for _, name, _ in out} == set(q.ALL), "every dashboard query is timed"
    return out


def time_queries(client: Any, plan: list[tuple[str, str, dict[str, Any]]], runs: int) -> list[Timing]:
    out = []
    for label, name, params in plan:
        text = finalize_query(q.ALL[name], params)
        rows = len(run_readonly_query(client, text)[1])  # warm-up (and the result size)
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            run_readonly_query(client, text)
            samples.append((time.perf_counter() - t0) * 1000)
        out.append(Timing(label, statistics.median(samples), min(samples), rows))
    return out


def run(lines: int, *, registrants: int = 5000, days: int = 365, runs: int = 5, path: Path | None = None,
        keep: bool = False) -> dict[str, Any]:
    """Load ``lines`` order lines into a scratch embedded store and time every dashboard query."""
    base = path or Path("var") / "bench-dashboards"
    shutil.rmtree(base, ignore_errors=True)
    settings = Settings().with_(data_dir=base, clickhouse_url="")
    end = datetime.now(timezone.utc).replace(microsecond=0)
    writer = open_client(settings)
    try:
        apply_ddl(writer)
        t0 = time.perf_counter()
        counts = load(writer, lines, registrants, days, end)
        load_s = time.perf_counter() - t0
        settle(writer)
        counts.update(_counts(writer, AGGREGATES))
        busiest = str(writer.query("SELECT purchaser_dea FROM dash_registrant_week GROUP BY purchaser_dea "
                                   "ORDER BY sum(orders) DESC LIMIT 1").result_rows[0][0])
    finally:
        writer.close()
    reader = open_client(settings, readonly=True)
    try:
        timings = time_queries(reader, cases(end, busiest), runs)
    finally:
        reader.close()
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    return {"lines": lines, "registrants": registrants, "days": days, "runs": runs, "load_s": load_s,
            "counts": counts, "timings": timings}


def render(result: dict[str, Any], target_ms: float = 200.0) -> str:
    counts = result["counts"]
    head = (f"{result['lines']:,} order lines ({counts['verdicts']:,} verdicts, {result['registrants']:,} registrants, "
            f"{result['days']} days) generated in {result['load_s']:.0f} s; aggregates: "
            f"dash_volume_day {counts['dash_volume_day']:,} rows, dash_registrant_week {counts['dash_registrant_week']:,}, "
            f"dash_verdict_day {counts['dash_verdict_day']:,} (merged). Median of {result['runs']} runs after one warm-up, embedded engine, readonly client:")
    width = max(len(t.name) for t in result["timings"])
    lines = [head, "", f"{'query':<{width}}  {'median ms':>9}  {'best ms':>7}  {'rows':>6}",
             "-" * (width + 30)]
    for t in result["timings"]:
        flag = "" if t.median_ms <= target_ms else f"  over {target_ms:.0f} ms"
        lines.append(f"{t.name:<{width}}  {t.median_ms:>9.1f}  {t.best_ms:>7.1f}  {t.rows:>6}{flag}")
    slow = [t for t in result["timings"] if t.median_ms > target_ms]
    lines.append("")
    lines.append(f"all {len(result['timings'])} within {target_ms:.0f} ms" if not slow
                 else f"{len(slow)} of {len(result['timings'])} over {target_ms:.0f} ms")
    return "\n".join(lines)

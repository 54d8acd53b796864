"""The demo: the whole pipeline on the embedded defaults, from nothing to a compliance summary.

Starts a local Kafka broker, creates the topics, builds a test PKI and a
simulated customer population, starts a worker, streams the signed orders,
waits until every order has its outcome in ClickHouse, and prints what a
compliance officer wants to know - next to the simulator's ground truth.
"""
from __future__ import annotations

import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping
from typing import Callable

import click

from streams.tools.broker import LocalBroker
from streams.tools.feed import PreparedFeed, prepare_feed, publish, publish_reference_data, replay_settings
from connectors.kafka.io import Publisher
from connectors.kafka.topics import ensure_topics

from streams.core.config import Settings
from connectors.clickhouse.query import run_query
from streams.apps.summary import Summary, fetch_summary
from streams.tools.processes import Pipeline
from streams.apps.review.dashboard import dashboard_url

OWNED = ("kafka", "clickhouse", "pki", "faust", "labels.csv", "registrants.csv", "worker.log", "sink.log", "reports")


def reset_data_dir(settings: Settings) -> None:
    """Remove what an earlier demo left, so the summary describes this run only."""
    for name in OWNED:
        path = settings.data_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def wait_for_outcomes(settings: Settings, feed: PreparedFeed, timeout: float,
                      on_progress: Callable[[int], None] | None = None) -> Summary:
    """Poll ClickHouse until every published order has exactly one outcome (or time runs out)."""
    expected_total = len(feed.messages)
    deadline = time.monotonic() + timeout
    done = 0
    summary = fetch_summary(settings)
    while time.monotonic() < deadline:
        summary = fetch_summary(settings)
        now_done = summary.rejected + summary.dead_lettered + summary.released + summary.held
        if on_progress and now_done > done:
            on_progress(now_done - done)
        done = now_done
        if done >= expected_total and summary.verified == summary.released + summary.held:
            break
        time.sleep(0.5)
    return summary


def ground_truth(feed: PreparedFeed) -> str:
    exp = Counter(m.sim.expected_outcome for m in feed.messages)
    rejected = {k.split(":", 1)[1]: v for k, v in exp.items() if k.startswith("REJECT:")}
    labels = Counter(m.sim.label for m in feed.messages if m.sim.is_suspicious)
    lines = ["Simulator ground truth (what was injected)", "------------------------------------------",
             f"Bad orders: {sum(rejected.values())} ({', '.join(f'{k} {v}' for k, v in sorted(rejected.items()))}),"
             f" unreadable messages: {exp.get('DLQ', 0)}",
             f"Suspicious orders: {sum(labels.values())} ({', '.join(f'{k} {v}' for k, v in sorted(labels.items()))})"]
    return "\n".join(lines)


#: Findings that hold an order only while due diligence is pending: such a hold is not a detector's false hold.
WAITING_DETECTORS = ("open_case", "reported_pending_limit", "analyst_limit", "terminated_customer", "new_customer",
                     "new_customer_order")


def detection_report(settings: Settings, feed: PreparedFeed) -> str:
    """How the verdicts compare with what the simulator injected: episodes caught, false holds."""
    verdicts = dict(run_query(settings, "SELECT order_id, verdict FROM verdicts FINAL")[1])
    # Orders held by a detector of their own (not only because an earlier hold's case is still open, or a new
    # customer awaits onboarding: those wait for due diligence, which the demo's scripted analyst barely does).
    waiting = ", ".join(f"'{d}'" for d in WAITING_DETECTORS)
    judged = {r[0] for r in run_query(settings, (
        f"SELECT DISTINCT order_id FROM verdict_reasons FINAL WHERE fired AND enforced AND detector NOT IN ({waiting})"
    ))[1]}
    rejections = dict(run_query(settings, "SELECT order_id, reason_code FROM rejections FINAL")[1])
    return compare_with_truth(feed, verdicts, judged, rejections)


def compare_with_truth(feed: PreparedFeed, verdicts: Mapping[str, str], judged: Collection[str],
                       rejections: Mapping[str, str]) -> str:
    """The comparison the demo prints, from the outcomes alone (the demo reads them from ClickHouse,
    ``streams.tools.demo_core`` from the processors): ``verdicts`` order id -> HOLD/RELEASE, ``judged`` the
    orders a detector of their own held, ``rejections`` order id -> reason code."""
    episodes: dict[tuple[str, str], list[str]] = defaultdict(list)
    normal_held = normal = normal_judged = 0
    wrong_rejections = 0
    for m in feed.messages:
        sim = m.sim
        if sim.reason_code and rejections.get(sim.sim_id) != sim.reason_code:
            wrong_rejections += 1
        if sim.label == "normal":
            normal += 1
            normal_held += verdicts.get(sim.sim_id) == "HOLD"
            normal_judged += verdicts.get(sim.sim_id) == "HOLD" and sim.sim_id in judged
        elif sim.is_suspicious:
            key = str(sim.detail.get("burst", sim.sim_id))
            episodes[(sim.label, key)].append(verdicts.get(sim.sim_id, "?"))
    lines = ["", "Against the ground truth", "------------------------"]
    for label in sorted({k[0] for k in episodes}):
        eps = [v for k, v in episodes.items() if k[0] == label]
        caught = sum(1 for v in eps if "HOLD" in v)
        lines.append(f"  {label:<16} episodes held: {caught} of {len(eps)}")
    lines.append(f"  normal orders held by a detector (false holds): {normal_judged} of {normal} "
                 f"({normal_judged / max(normal, 1):.2%})")
    lines.append(f"  normal orders held in all, open cases and new-customer ceilings included (they wait for "
                 f"due diligence): {normal_held}")
    lines.append(f"  bad orders rejected with the expected reason: "
                 f"{sum(1 for m in feed.messages if m.sim.reason_code) - wrong_rejections} of "
                 f"{sum(1 for m in feed.messages if m.sim.reason_code)}")
    return "\n".join(lines)


def due_diligence(settings: Settings, timeout: float = 120.0) -> str:
    """Play the analyst and the warehouse: decide two held orders, ship what was released, write the day's reports.

    The decisions go through ``som.decisions`` exactly as the review page
    sends them; the rest of the held orders stay HELD, as they would until
    someone reviews them.
    """
    import uuid
    from datetime import datetime, timezone
    from pathlib import Path

    from streams.tools.warehouse import released_orders, ship

    from connectors.kafka import catalogue as t
    from streams.core.avro_codec import default_codec
    from streams.apps.reports import write_fill_report, write_suspicious_order_report

    def poll(sql: str, ok: Callable[[list], bool]) -> list:
        deadline = time.monotonic() + timeout
        rows = run_query(settings, sql)[1]
        while not ok(rows) and time.monotonic() < deadline:
            time.sleep(0.5)
            rows = run_query(settings, sql)[1]
        return rows

    held = poll("SELECT order_id FROM verdicts FINAL WHERE verdict = 'HOLD' ORDER BY decided_at",
                lambda r: True)
    ids = [r[0] for r in held]
    poll("SELECT count() FROM cases FINAL WHERE status = 'HELD'", lambda r: r and int(r[0][0]) >= len(ids))
    codec = default_codec()
    pub = Publisher(settings.kafka_bootstrap)
    plan = list(zip(ids[:2], ("RELEASE", "REPORT"), (
        "Demo: the pharmacist documented a new oncology clinic; invoices on file.",
        "Demo: no prescriptions support the volume; the purchaser could not explain it.")))
    for oid, action, why in plan:
        pub.publish(t.DECISIONS, oid, codec.encode("som.Decision", {
            "decision_id": str(uuid.uuid4()), "order_id": oid, "action": action, "actor": "demo-analyst",
            "actor_role": "analyst", "rationale": why, "evidence_notes": "", "decided_at": datetime.now(timezone.utc)}))
    pub.flush()
    poll("SELECT count() FROM cases FINAL WHERE decided_by = 'demo-analyst'", lambda r: r and int(r[0][0]) >= len(plan))
    releases = released_orders(settings.kafka_bootstrap)
    shipped = ship(pub, releases, shipped_at=datetime.now(timezone.utc))
    n_lines = sum(len(r["lines"]) for r in {r["order_id"]: r for r in releases}.values())
    poll("SELECT count() FROM shipments FINAL", lambda r: r and int(r[0][0]) >= n_lines)
    today = datetime.now(timezone.utc).date()
    out = Path(settings.data_dir) / "reports"
    query = lambda sql: run_query(settings, sql)  # noqa: E731
    sor = write_suspicious_order_report(query, today, out)
    fills = write_fill_report(query, today, out)
    statuses = dict(run_query(settings, "SELECT status, count() FROM cases FINAL GROUP BY status")[1])
    lines = ["", "Due diligence (a scripted analyst, then the warehouse)",
             "------------------------------------------------------",
             f"  cases: {', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}",
             f"  warehouse confirmed {shipped} shipments ({fills.rows} lines; {fills.exceptions} exceptions)",
             f"  suspicious order report: {sor.rows} line(s) -> {sor.csv_path}",
             f"  CSOS fill report: {fills.rows} line(s) -> {fills.csv_path}"]
    return "\n".join(lines)


def audit_check(settings: Settings) -> str:
    """What ``csos audit verify`` says about this run's audit trail."""
    from connectors.clickhouse.audit_chain import KeyRing, verify_store

    report = verify_store(lambda sql: run_query(settings, sql)[1], keys=KeyRing.from_settings(settings))
    events = sum(c.events for c in report.chains)
    verdict = "intact (no gap, edit or reordering)" if report.ok else f"{len(report.problems)} problem(s)"
    return (f"\nAudit trail: {events} events in {len(report.chains)} hash chains, {verdict}; "
            f"`csos audit verify` prints the head hashes to record")


def run_demo(settings: Settings, *, registrants: int, seed: int, days: int, keep_running: bool,
             timeout: float = 600.0) -> Summary:
    echo = click.echo
    reset_data_dir(settings)
    port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    broker = LocalBroker(port=port, data_dir=settings.data_dir / "kafka")
    echo(f"1/6 Starting Apache Kafka (KRaft) on {broker.bootstrap} ...")
    broker.start()
    pipeline: Pipeline | None = None
    try:
        ensure_topics(broker.bootstrap, settings.partitions)
        echo("2/6 Topics created. Building a test CSOS PKI and a simulated customer population ...")
        feed: PreparedFeed
        with click.progressbar(length=1, label="    signing orders", show_pos=True) as bar:
            def tick(n: int) -> None:
                bar.length = max(bar.length or 1, bar.pos + n + 1)
                bar.update(n)
            feed = prepare_feed(settings, registrants=registrants, seed=seed, days=days, progress=tick)
        echo(f"    {len(feed.result.population)} registrants, {len(feed.messages)} signed orders "
             f"({feed.lines} lines) over {days} days; certificates and CRL in {settings.pki_dir}")
        settings = replay_settings(settings, feed)
        echo(f"    supplier {settings.supplier_dea}; receipt times of the replayed history accepted within "
             f"{settings.receipt_skew_seconds / 86400:.0f} days of the broker's append time")
        issuers, n_reg = publish_reference_data(settings, Publisher(broker.bootstrap))
        echo(f"    published {len(issuers)} CRL(s) to pki.crl and {n_reg} registrations to registrants")
        echo("3/6 Starting the ClickHouse sink and the worker (verification, monitoring) ...")
        pipeline = Pipeline(settings)
        pipeline.start()
        echo(f"4/6 Streaming the warehouse feed to {broker.bootstrap} ...")
        with click.progressbar(length=len(feed.messages), label="    orders sent", show_pos=True) as bar:
            publish(feed.messages, Publisher(broker.bootstrap), progress=bar.update)
        echo("5/6 Waiting for every order's outcome in ClickHouse ...")
        with click.progressbar(length=len(feed.messages), label="    orders decided", show_pos=True) as bar:
            summary = wait_for_outcomes(settings, feed, timeout, bar.update)
        echo("6/6 Done.\n")
        echo(summary.render())
        echo("")
        echo(ground_truth(feed))
        echo(detection_report(settings, feed))
        _, rows = run_query(settings, "SELECT purchaser_dea, order_id, explanation FROM verdict_reasons FINAL "
                                      "WHERE fired AND enforced ORDER BY decided_at LIMIT 3")
        if rows:
            echo("\nWhy orders were held (first three):")
            for dea, oid, why in rows:
                echo(f"  {dea} order {oid[:8]}: {why}")
        echo(due_diligence(settings))
        echo(audit_check(settings))
        if summary.received != len(feed.messages):
            raise click.ClickException(f"only {summary.received} of {len(feed.messages)} orders have an outcome "
                                       f"after {timeout:.0f}s; see {pipeline.worker.log_path}")
        echo("\nQuery the results, e.g.:\n"
             "  csos sql \"SELECT verdict, count() FROM verdicts FINAL GROUP BY verdict\"\n"
             "  csos sql \"SELECT reason_code, reason FROM rejections FINAL LIMIT 5\"\n"
             "  csos sql \"SELECT status, count() FROM cases FINAL GROUP BY status\"\n"
             "  csos audit verify\n"
             "Work the held orders on the review page: run the demo with --keep-running, then see README, 'Review page'.")
        return summary
    finally:
        if keep_running:
            echo(f"\nBroker, worker and sink left running (logs in {settings.data_dir}); stop them with: "
                 "pkill -f 'streams.cli (worker|sink)'; csos broker stop")
            echo(f"Dashboards: {dashboard_url(settings)} (and the held orders at /cases) once the review page runs: "
                 "csos review add-user alice --role analyst; csos review")
        else:
            if pipeline:
                pipeline.stop()
            broker.stop()

"""``csos hostile soak``: thousands of hostile messages through a pipeline of its own (not a test).

The CI test (tests/integration/test_hostile_input.py) sends ~1,500; this sends as many as
asked (10,000 is the issue-9 bar) to a broker, sink and worker started for the
purpose on free ports, with data under ``CSOS_DATA_DIR/hostile``, so neither a
developer's broker nor the demo's data is touched. It publishes a small normal
feed first (history), then the hostile messages with normal orders mixed in,
then one normal sentinel order; waits until every message has a trace (or the
timeout); and prints a table per class with the checks of the bar:
no process or agent died, 0 released, 0 without a trace, the sink never stalled.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

from streams.tools.broker import free_port, running_broker
from streams.tools.feed import prepare_feed, publish, publish_reference_data
from streams.tools.hostile import (
    HostileContext, SentMessage, collect_report, collect_traces, generate, publish_hostile, sentinel_order, untraced,
)
from connectors.kafka.io import Publisher

from streams.core.config import Settings
from streams.tools.processes import ChildProcess, Pipeline
from connectors.clickhouse.query import run_query

Echo = Callable[[str], None]
OWNED = ("kafka", "clickhouse", "pki", "faust", "labels.csv", "registrants.csv", "worker.log", "sink.log")


def agent_crashes(worker: ChildProcess) -> list[str]:
    """Faust's "Crashed reason=" lines in the worker log: an agent died (its supervisor restarts it,
    so the process lives on, but the message that killed it comes round again)."""
    try:
        log = worker.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line[:300] for line in log.splitlines() if "Crashed reason=" in line]


def _wait_decided(query: Callable[[str], list[list[Any]]], n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    decided = 0
    while time.monotonic() < deadline:
        decided = int(query("SELECT (SELECT count() FROM verdicts FINAL) + (SELECT count() FROM rejections FINAL)")
                      [0][0])
        if decided >= n:
            break
        time.sleep(0.5)
    return decided


def _wait_traced(query: Callable[[str], list[list[Any]]], sent: list[SentMessage], timeout: float,
                 echo: Echo) -> int:
    """Poll until every message has a trace or ``timeout``; returns how many still have none."""
    deadline = time.monotonic() + timeout
    missing = untraced(query, sent)
    last_said = time.monotonic()
    while missing and time.monotonic() < deadline:
        time.sleep(2.0)
        missing = untraced(query, sent)
        if time.monotonic() - last_said > 15:
            echo(f"  {len(sent) - missing} of {len(sent)} messages traced ...")
            last_said = time.monotonic()
    return missing


def run_soak(settings: Settings, *, count: int, seed: int, registrants: int = 30, days: int = 60,
             timeout: float = 900.0, echo: Echo = print) -> bool:
    """Run the soak; print the table and the checks; return whether every check passed."""
    data = Path(settings.data_dir)
    for name in OWNED:
        path = data / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    echo(f"starting a broker of its own (data in {data}) ...")
    with running_broker(data / "kafka", settings.partitions) as broker:
        settings = settings.with_(kafka_bootstrap=broker.bootstrap, pki_dir=data / "pki", web_port=free_port(),
                                  sink_port=free_port(), app_id=f"csos-hostile-soak-{seed}")

        def query(sql: str) -> list[list[Any]]:
            return run_query(settings, sql)[1]

        feed = prepare_feed(settings, registrants=registrants, seed=seed, days=days, bad_counts={},
                            suspicious_counts={})
        publish_reference_data(settings, Publisher(broker.bootstrap))
        ctx = HostileContext.from_feed(feed)
        echo(f"generating {count} hostile messages (seed {seed}) ...")
        messages = generate(ctx, seed, count)
        pipeline = Pipeline(settings)
        pipeline.worker.extra_env["CSOS_SUPPLIER_DEA"] = ctx.supplier.dea_number
        pipeline.start()
        try:
            publish(feed.messages, Publisher(broker.bootstrap))
            echo(f"normal history: {_wait_decided(query, len(feed.messages), 300)} of {len(feed.messages)} "
                 f"orders decided; publishing the hostile messages ...")
            sent = publish_hostile(broker.bootstrap, messages)
            sentinel = publish_hostile(broker.bootstrap, [sentinel_order(ctx, seed)])[0]
            missing = _wait_traced(query, [*sent, sentinel], timeout, echo)
            report = collect_report(query, broker.bootstrap, sent)
            sentinel_traces = collect_traces(query, [sentinel])[0]
            echo(report.render())
            crashes = agent_crashes(pipeline.worker)
            checks = {
                "worker alive": pipeline.worker.proc is not None and pipeline.worker.proc.poll() is None,
                "sink alive": pipeline.sink.proc is not None and pipeline.sink.proc.poll() is None,
                "no agent crashed": not crashes,
                "0 released": report.count("released") == 0,
                "0 without a trace": report.count("no trace") == 0,
                "0 with several traces": all(len(trs) <= 1 for trs in report.traces),
                "every class as expected": not report.failures(),
                "the sink kept writing (sentinel decided and in ClickHouse)":
                    [tr.source for tr in sentinel_traces] == ["verdict"],
            }
            echo("")
            for name, ok in checks.items():
                echo(f"  [{'ok' if ok else 'FAIL'}] {name}")
            if crashes:
                echo(f"  agent crashes ({len(crashes)}), first: {crashes[0]}")
            if missing:
                echo(f"  {missing} messages still without a trace after {timeout:.0f}s")
            echo(f"  logs: {pipeline.worker.log_path}, {pipeline.sink.log_path}")
            return all(checks.values())
        finally:
            pipeline.stop()

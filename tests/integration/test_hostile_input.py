"""Hostile input against the real pipeline (issue 9): nothing dies, nothing is lost, nothing ships.

A generator (``streams/tools/hostile.py``) builds ~1,500 messages of every class
the attacker found: unreadable and wrong-schema messages on every input topic,
signatures that are garbage or make the verifier raise, validly signed orders
with impossible quantities and line numbers, forged receipt times, another
supplier's orders, replays, a reused order id, 120 months in one batch, a ~1 MB
message, a CMS with 700 look-alike intermediates, an oversize document, and
shipments that do not fit the table; normal orders are mixed in. They go to a
pipeline of their own (own broker, as in tests/integration/test_two_workers.py: the
session pipeline's tests count its feed exactly on the shared topic names),
followed by one normal "sentinel" order.

Then: the worker and the sink are alive and no agent crashed; every message has
exactly one trace in ClickHouse (a rejection, a verdict, a parked order or a dead
letter naming its offset); no hostile order is released (verdict or
``som.release``); the sentinel is decided and written (the sink kept writing);
and each class got its specific outcome (replay -> DUPLICATE_ORDER_NUMBER, forged
receipt -> ORDER_EXPIRED, other supplier -> WRONG_SUPPLIER, ...), one test per class.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from streams.tools.broker import free_port
from streams.tools.feed import PreparedFeed, prepare_feed, publish, publish_reference_data
from streams.tools.hostile import (
    DECIDED, KINDS, HostileContext, HostileReport, SentMessage, Trace, collect_report, collect_traces, generate,
    publish_hostile, sentinel_order, untraced,
)
from connectors.kafka.io import Publisher
from streams.core.config import Settings
from streams.tools.hostile_soak import agent_crashes
from streams.tools.processes import Pipeline as Processes
from connectors.clickhouse.query import run_query
from tests.conftest import RUNTIMES, running_broker

HOSTILE_COUNT = 1500
SEED = 9
#: How long every message may take to get its trace once all are published (a fixed pipeline needs ~20 s).
TRACE_DEADLINE_S = 150.0


@dataclass
class HostileRun:
    settings: Settings
    processes: Processes
    feed: PreparedFeed
    sent: list[SentMessage]
    report: HostileReport
    sentinel: SentMessage
    sentinel_traces: list[Trace]
    untraced_at_deadline: int


def _sql(settings: Settings, query: str) -> list[list[Any]]:
    return run_query(settings, query)[1]


def _wait_decided(settings: Settings, n: int, processes: Processes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    decided = 0
    while time.monotonic() < deadline:
        decided = int(_sql(settings, "SELECT (SELECT count() FROM verdicts FINAL) + "
                                     "(SELECT count() FROM rejections FINAL)")[0][0])
        if decided >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"the normal feed was not decided ({decided} of {n})\n{processes.tail()}")


@pytest.fixture(scope="module", params=RUNTIMES)
def hostile(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRun]:
    with running_broker(tmp_path_factory.mktemp(f"kafka-hostile-{request.param}")) as broker:
        data = Path(tmp_path_factory.mktemp("hostile"))
        settings = Settings.from_env().with_(
            kafka_bootstrap=broker.bootstrap, data_dir=data, pki_dir=data / "pki", clickhouse_url="",
            web_port=free_port(), sink_port=free_port(), app_id=f"csos-hostile-{uuid.uuid4().hex[:6]}",
            runtime=request.param)
        feed = prepare_feed(settings, registrants=10, seed=31, days=30, bad_counts={}, suspicious_counts={})
        publish_reference_data(settings, Publisher(broker.bootstrap))
        ctx = HostileContext.from_feed(feed)
        messages = generate(ctx, SEED, HOSTILE_COUNT)
        processes = Processes(settings)
        # Our own DEA number: an order addressed to another supplier is refused (issue 9's CSOS_SUPPLIER_DEA).
        processes.worker.extra_env["CSOS_SUPPLIER_DEA"] = ctx.supplier.dea_number
        processes.start()
        try:
            publish(feed.messages, Publisher(broker.bootstrap))  # history first, as a real registrant has
            _wait_decided(settings, len(feed.messages), processes)
            sent = publish_hostile(broker.bootstrap, messages)
            sentinel = publish_hostile(broker.bootstrap, [sentinel_order(ctx, SEED)])[0]
            everything = [*sent, sentinel]

            def query(sql: str) -> list[list[Any]]:
                return _sql(settings, sql)

            deadline = time.monotonic() + TRACE_DEADLINE_S
            missing = untraced(query, everything)
            while missing and time.monotonic() < deadline:
                time.sleep(1.0)
                missing = untraced(query, everything)
            report = collect_report(query, broker.bootstrap, sent)
            yield HostileRun(settings, processes, feed, sent, report, sentinel,
                             collect_traces(query, [sentinel])[0], missing)
        finally:
            processes.stop()


def _summary(run: HostileRun) -> str:
    return f"{run.report.render()}\n{run.processes.tail()}"


def test_no_worker_or_sink_dies_and_no_agent_crashes(hostile: HostileRun) -> None:
    worker, sink = hostile.processes.worker, hostile.processes.sink
    assert worker.proc is not None and worker.proc.poll() is None, f"the worker exited\n{worker.tail()}"
    assert sink.proc is not None and sink.proc.poll() is None, f"the sink exited\n{sink.tail()}"
    crashes = agent_crashes(worker)
    assert not crashes, f"a Faust agent crashed on hostile input: {crashes[:3]}\n{worker.tail(80)}"
    assert (worker.health() or {}).get("counts"), "the worker no longer answers /health"
    assert (worker.health() or {}).get("event_loop") == "uvloop", "the worker is not on its default event loop"
    assert (worker.health() or {}).get("runtime") == hostile.settings.runtime, "the worker runs another runtime"
    assert (sink.health() or {}).get("status") == "ok", "the sink no longer answers /health"


def test_the_sink_keeps_writing_after_hostile_input(hostile: HostileRun) -> None:
    """A normal order published after every hostile one is decided and visible in ClickHouse."""
    assert [tr.source for tr in hostile.sentinel_traces] == ["verdict"], (
        f"sentinel order {hostile.sentinel.message.order_id}: {hostile.sentinel_traces}\n{_summary(hostile)}")


def test_every_hostile_message_has_exactly_one_trace(hostile: HostileRun) -> None:
    report = hostile.report
    assert len(report.sent) == HOSTILE_COUNT
    untraced_n = report.count("no trace")
    multiple = sum(1 for trs in report.traces if len(trs) > 1)
    assert (untraced_n, multiple) == (0, 0), (
        f"{untraced_n} of {len(report.sent)} messages without a trace, {multiple} with several\n{_summary(hostile)}")


def test_no_hostile_order_is_released(hostile: HostileRun) -> None:
    report = hostile.report
    released = report.count("released")
    assert released == 0, f"{released} hostile orders released (verdict RELEASE or som.release)\n{_summary(hostile)}"
    carriers = [r for r in report.rows if r.expected == DECIDED]
    assert carriers and all(r.traced == r.sent for r in carriers), "the normal and original orders were not decided"


#: Every kind that appears in the run: the generator's classes and the legitimate orders attacks ride on.
ALL_KINDS = sorted(set(KINDS) | {"replay_original", "reused_order_id_first"})


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_each_hostile_class_gets_its_expected_outcome(hostile: HostileRun, kind: str) -> None:
    rows = {r.kind: r for r in hostile.report.rows}
    assert kind in rows, f"no message of kind {kind} was generated"
    row = rows[kind]
    assert row.failing == 0, (
        f"{kind} (expected {row.expected}): {row.failing} of {row.sent} wrong; e.g. {row.examples}; "
        f"traced {row.traced}, released {row.released}, dead-lettered {row.dead_lettered}, "
        f"rejected {row.rejected}, held {row.held}, parked {row.parked}")

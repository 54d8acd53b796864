"""A second worker joins: every order decided once, every case opened and escalated once.

The first worker decides the whole feed and opens every case; then a second
worker joins the group and takes over half the partitions while the
due-diligence clocks are still running. The first worker's tables still hold
the cases it handed over (and Faust keeps standby copies), so a case agent
that escalated every lapsed case it could see would escalate some twice;
only the worker that actively owns a case's partition may. Runs its own
small pipeline on a broker of its own: a second consumer group on the session
broker would re-read (and re-decide) every order of the session's pipeline on
the shared topics.
"""
from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.tools.broker import LocalBroker, free_port
from streams.tools.feed import prepare_feed, publish, publish_reference_data, replay_settings
from connectors.kafka.io import Publisher
from streams.core.config import Settings
from streams.tools.chaos import wait_sink_caught_up
from streams.tools.processes import sink_process, worker_process
from connectors.clickhouse.query import run_query
from tests.conftest import RUNTIMES, running_broker

DUE_SECONDS = 60.0


@pytest.fixture(scope="module", params=RUNTIMES)
def own_broker(request, tmp_path_factory) -> Iterator[tuple[LocalBroker, str]]:
    """A fresh broker per runtime: the other runtime's group would otherwise find the first one's orders."""
    with running_broker(tmp_path_factory.mktemp(f"kafka-two-{request.param}")) as b:
        yield b, request.param


@pytest.fixture(scope="module")
def two_workers(own_broker, tmp_path_factory):
    broker, runtime = own_broker
    data = Path(tmp_path_factory.mktemp("two-workers"))
    settings = Settings.from_env().with_(
        kafka_bootstrap=broker.bootstrap, data_dir=data, pki_dir=data / "pki", clickhouse_url="",
        web_port=free_port(), sink_port=free_port(), app_id=f"csos-two-{uuid.uuid4().hex[:6]}",
        due_diligence_days=DUE_SECONDS / 86400, case_clock_seconds=1.0, runtime=runtime,
    )
    feed = prepare_feed(settings, registrants=16, seed=23, days=90, bad_counts={},
                        suspicious_counts={"size_spike": 6, "family_shift": 3})
    settings = replay_settings(settings, feed)
    publish_reference_data(settings, Publisher(settings.kafka_bootstrap))
    sink = sink_process(settings)
    a = worker_process(settings)
    b = worker_process(settings.with_(web_port=free_port(), data_dir=data / "b"))
    sink.start()
    started = []
    try:
        a.start()
        started.append(a)
        publish(feed.messages, Publisher(settings.kafka_bootstrap))
        wait_decided(settings, len(feed.messages), a)
        b.start()  # the group rebalances while every case's clock is still running
        started.append(b)
        yield settings, feed, (a, b)
    finally:
        for w in started:
            w.stop()
        sink.stop()


def clock_runs(worker) -> int:
    """How often the worker's case clock has run (its /health), -1 if it does not answer."""
    return ((worker.health() or {}).get("counts", {}).get("cases") or {}).get("clock_runs", -1)


def sql(settings: Settings, query: str) -> list:
    return run_query(settings, query)[1]


def wait_decided(settings: Settings, n: int, worker, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    decided = 0
    while time.monotonic() < deadline:
        decided = int(sql(settings, "SELECT (SELECT count() FROM verdicts FINAL) + "
                                    "(SELECT count() FROM rejections FINAL)")[0][0])
        if decided >= n:
            return
        time.sleep(1)
    raise AssertionError(f"{decided} of {n} decided\n{worker.tail()}")


def test_orders_and_cases_are_each_handled_once_across_two_workers(two_workers) -> None:
    settings, feed, workers = two_workers
    logs = "\n".join(w.tail() for w in workers)
    decided = int(sql(settings, "SELECT (SELECT count() FROM verdicts FINAL) + (SELECT count() FROM rejections FINAL)")
                  [0][0])
    assert decided == len(feed.messages), "an order was decided twice or lost in the rebalance"

    held = {r[0] for r in sql(settings, "SELECT order_id FROM verdicts FINAL WHERE verdict = 'HOLD'")}
    assert len(held) >= 6
    # every held order's clock lapses; wait for each case's escalation, then a while longer for duplicates
    deadline = time.monotonic() + DUE_SECONDS + 90
    while time.monotonic() < deadline:
        escalated = {r[0] for r in sql(settings, "SELECT DISTINCT order_id FROM case_events WHERE kind = 'ESCALATED'")}
        if escalated >= held:
            break
        time.sleep(1)
    # A duplicate would come from a later run of a worker's clock: two more runs on each, then the sink caught up
    # with everything they published.
    targets = [clock_runs(w) + 2 for w in workers]
    assert min(targets) >= 2, "a worker did not answer on /health"

    def clocks_ran() -> bool:
        return all(clock_runs(w) >= target for w, target in zip(workers, targets))

    deadline = time.monotonic() + 60
    while not clocks_ran() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert clocks_ran(), "a worker's case clock stopped"
    wait_sink_caught_up(settings)
    events = Counter((r[0], r[1]) for r in sql(settings, "SELECT order_id, kind FROM case_events FINAL"))
    assert {oid for oid, kind in events if kind == "OPENED"} == held
    assert {oid: events[(oid, "OPENED")] for oid in held} == {oid: 1 for oid in held}, logs
    assert {oid: events[(oid, "ESCALATED")] for oid in held} == {oid: 1 for oid in held}, logs
    audits = Counter(r[0] for r in sql(settings, "SELECT order_id FROM audit_events WHERE action = 'case.escalated'"))
    assert {oid: audits[oid] for oid in held} == {oid: 1 for oid in held}
    # and both workers escalated some: the second one took over partitions with open cases
    assert [(w.health() or {}).get("runtime") for w in workers] == [settings.runtime] * 2
    escalations = [(w.health() or {}).get("counts", {}).get("cases", {}).get("escalated", 0) for w in workers]
    assert all(e > 0 for e in escalations) and sum(escalations) == len(held), escalations

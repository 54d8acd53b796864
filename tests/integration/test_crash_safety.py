"""kill -9 of a busy worker changes no order's outcome, and the worker (or a survivor) resumes within seconds.

Issue 10: a worker SIGKILLed while busy gave thousands of orders a second,
contradicting outcome (released and rejected as a duplicate of itself, held
and released) and learned redelivered orders twice; a restarted worker sat
idle for a minute. Here a pipeline of its own (its own broker: a second
consumer group on the session broker would re-decide the session's orders)
streams a feed of ~2,300 signed orders: first one worker, SIGKILLed five
times, each time after its own progress since its restart (its /health
counters, never a sleep), restarted under the same id; then two workers, one
of them killed for good mid-stream and brought back later. After each phase
every order is checked across the output topics and ClickHouse
(``streams.tools.chaos.check_outcomes``): one outcome each, no contradicting
verdicts or hold/release messages, ClickHouse FINAL equal to the topics,
``csos summary`` equal to the feed, the audit chain intact, and the same holds
as an unfaulted run (the monitor replayed offline over the verified orders).
The soak outside CI is ``csos chaos --orders 10000 --kills 10``.
"""
from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.tools.broker import LocalBroker, free_port
from streams.tools.chaos import (Restart, Takeover, check_outcomes, decided, kill_for_good, kill_while_busy, problems,
                              render, wait_decided, wait_sink_caught_up, worker_settings)
from streams.tools.feed import PreparedFeed, prepare_feed, publish, publish_reference_data, replay_settings
from connectors.kafka.io import Publisher
from streams.core.config import Settings
from streams.tools.processes import ChildProcess, sink_process, worker_process
from tests.conftest import RUNTIMES, running_broker

KILLS = 5
#: CI machines are slow and shared: generous against the issue's bar (10 s restart, 15 s takeover),
#: yet far below the 55-62 s a worker waited for its old session before static membership.
RESTART_LIMIT_S = 25.0
TAKEOVER_LIMIT_S = 30.0


@dataclass
class CrashPipeline:
    settings: Settings
    feed: PreparedFeed
    sink: ChildProcess
    a: ChildProcess
    b: ChildProcess

    def ids(self, n: int) -> list[str]:
        return [m.sim.sim_id for m in self.feed.messages[:n]]

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.tail()}" for name, p in (("a", self.a), ("b", self.b), ("sink", self.sink)))


@pytest.fixture(scope="module", params=RUNTIMES)
def crash_pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashPipeline]:
    data = Path(tmp_path_factory.mktemp(f"crash-{request.param}"))
    with running_broker(data / "kafka") as broker:  # type: LocalBroker
        settings = Settings.from_env().with_(
            kafka_bootstrap=broker.bootstrap, data_dir=data, pki_dir=data / "pki", clickhouse_url="",
            web_port=free_port(), sink_port=free_port(), app_id=f"csos-crash-{uuid.uuid4().hex[:6]}",
            # Small batches: many batch boundaries, so a kill lands with outputs written and offsets not
            # yet committed (with 2,000 the whole backlog is one batch and most kills hit an idle moment).
            batch_size=50, runtime=request.param)
        feed = prepare_feed(settings, registrants=40, seed=31, days=220, bad_counts={"tampered": 4},
                            suspicious_counts={"size_spike": 12, "frequency_burst": 12, "family_shift": 4})
        settings = replay_settings(settings, feed)
        publish_reference_data(settings, Publisher(settings.kafka_bootstrap))
        p = CrashPipeline(settings, feed, sink_process(settings),
                          worker_process(worker_settings(settings, "a")), worker_process(worker_settings(settings, "b")))
        p.sink.start()
        try:
            p.a.start()
            assert (p.a.health() or {}).get("runtime") == settings.runtime, "the worker runs another runtime"
            yield p
        finally:
            for proc in (p.a, p.b, p.sink):
                proc.stop()


@pytest.fixture(scope="module")
def one_worker_killed(crash_pipeline: CrashPipeline) -> tuple[int, list[Restart]]:
    """Phase 1: 60 % of the feed through worker a, SIGKILLed while busy KILLS times."""
    p = crash_pipeline
    n = len(p.feed.messages) * 6 // 10
    publish(p.feed.messages[:n], Publisher(p.settings.kafka_bootstrap))
    step = 2 * n // (KILLS + 2)  # progress counts an order at verify and again at the monitor
    restarts = kill_while_busy(p.a, "a", KILLS, step, lambda: decided(p.settings) >= n, random.Random(31))
    wait_decided(p.settings, n, 240, strict=False)  # an order never decided is counted (no_outcome), not raised
    return n, restarts


@pytest.fixture(scope="module")
def second_worker_killed(crash_pipeline: CrashPipeline, one_worker_killed) -> Takeover:
    """Phase 2: worker b joins; half the rest of the feed; a killed for good while busy, then the other half
    (so its partitions have work for b to take over); a restarted at the end."""
    p = crash_pipeline
    n = len(p.feed.messages)
    p.b.start()
    rest = p.feed.messages[one_worker_killed[0]:]
    half = len(rest) // 2
    publish(rest[:half], Publisher(p.settings.kafka_bootstrap))
    published = one_worker_killed[0] + half
    # The second half goes out right after the kill: the dead worker's partitions then have work waiting.
    # "Done" is what was published so far: had b taken most of the first half, a waiting for 50 more orders
    # against the whole feed would wait out the timeout (a CI failure once), not be killed idle.
    takeover = kill_for_good(p.a, "a", p.settings, 50, lambda: decided(p.settings) >= published,
                             more=lambda: publish(rest[half:], Publisher(p.settings.kafka_bootstrap)))
    wait_decided(p.settings, n, 240, strict=False)
    p.a.start()  # rejoins under its id; the survivors hand its partitions back
    return takeover


def _checked(p: CrashPipeline, n: int) -> dict[str, int]:
    wait_sink_caught_up(p.settings)  # the sink's last batch (audit events follow the outputs)
    return check_outcomes(p.settings, p.feed, p.ids(n))


def test_a_worker_killed_repeatedly_while_busy_changes_no_outcome(crash_pipeline, one_worker_killed) -> None:
    p = crash_pipeline
    n, restarts = one_worker_killed
    counts = _checked(p, n)
    report = render(counts, restarts, [])
    print(report)
    assert len(restarts) >= KILLS - 1, f"the worker was idle before {KILLS} kills could land\n{report}"
    assert problems(counts) == {}, f"{report}\n{p.logs()}"
    assert counts["held_total"] > 0  # the feed's suspicious orders exercise the monitor


def test_a_restarted_worker_resumes_within_seconds(crash_pipeline, one_worker_killed) -> None:
    _, restarts = one_worker_killed
    timed = [r.restart_to_first for r in restarts if r.restart_to_first is not None]
    assert timed, "no restart found work left to do"
    assert max(timed) < RESTART_LIMIT_S, render({}, restarts, [])


def test_two_workers_one_killed_changes_no_outcome_and_the_other_takes_over(crash_pipeline,
                                                                             second_worker_killed) -> None:
    p = crash_pipeline
    counts = _checked(p, len(p.feed.messages))
    report = render(counts, [], [second_worker_killed])
    print(report)
    assert problems(counts) == {}, f"{report}\n{p.logs()}"
    assert second_worker_killed.seconds is not None and second_worker_killed.seconds < TAKEOVER_LIMIT_S, report

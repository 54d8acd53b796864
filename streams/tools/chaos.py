"""Crash soak (issue 10): SIGKILL a busy worker again and again, then count every topic and table.

A kill -9 must change no order's outcome. This module runs a pipeline of its
own (sink and workers as child processes, ``streams.tools.processes``), streams a
simulated feed, kills a worker each time it has made some progress since its
restart (read from its ``/health`` counters, never after a fixed sleep),
restarts it, and when every order is decided checks each order id across the
output topics and ClickHouse (:func:`check_outcomes`). ``csos chaos`` is the
long soak; ``tests/integration/test_crash_safety.py`` the short one in the suite.

The oracle for the monitor (how many orders an unfaulted run holds): the
monitor's decisions depend only on each registrant's own orders in order, so
replaying the verified orders through ``Monitor`` offline
(``streams.tools.evaluation.run_policy``, learning only from released orders, as
the agent does) gives the verdicts a run without faults gives. An order
learned twice after a redelivery shifts the baselines and shows up as a
different hold set. Verification is checked against the feed's ground truth.
"""
from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.kafka import catalogue as t
from streams.core.avro_codec import default_codec
from streams.core.config import Settings
from streams.tools.processes import ChildProcess, sink_process, worker_process
from connectors.clickhouse.query import open_reader, run_query

from streams.tools.broker import free_port, running_broker
from streams.tools.feed import PreparedFeed
from connectors.kafka.io import consume_all
from connectors.kafka.security import client_config

#: Counters on /health that are not orders handled.
_NOT_PROGRESS = {"batches"}


def progress(health: dict[str, Any] | None) -> int:
    """Orders this worker process has handled since it started (verify + monitor), from its /health."""
    counts = (health or {}).get("counts") or {}
    return sum(v for stage in ("verify", "monitor") for k, v in (counts.get(stage) or {}).items()
               if k not in _NOT_PROGRESS and isinstance(v, int))


@dataclass
class Restart:
    """One kill and restart of a worker, timed (``time.monotonic`` seconds)."""

    worker: str
    killed_at: float
    started_at: float
    ready_at: float
    first_progress_at: float | None  # None: nothing left to process when it came back

    @property
    def restart_to_first(self) -> float | None:
        """From starting the new process to its first handled order (the issue's bar: under 10 s)."""
        return None if self.first_progress_at is None else self.first_progress_at - self.started_at

    @property
    def kill_to_first(self) -> float | None:
        return None if self.first_progress_at is None else self.first_progress_at - self.killed_at


@dataclass
class Takeover:
    """A worker killed for good: how long until the survivors resumed each of its lagging partitions."""

    worker: str
    partitions: list[int]
    seconds: float | None  # None: it had no lagging partition to take over, or they never resumed


def worker_settings(settings: Settings, name: str) -> Settings:
    """A worker of its own name (static member id), HTTP port and local directory, for a pipeline of several."""
    return settings.with_(worker_id=f"{settings.app_id}-{name}", web_port=free_port(),
                          data_dir=settings.data_dir / f"worker-{name}")


def sigkill(worker: ChildProcess) -> float:
    """kill -9 the worker (its whole process group); returns when it is gone."""
    assert worker.proc is not None and worker.proc.poll() is None, "worker is not running"
    killed_at = time.monotonic()
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(30)
    return killed_at


def wait_progress(worker: ChildProcess, at_least: int, done: Callable[[], bool], timeout: float) -> bool:
    """Wait until ``worker`` handled ``at_least`` orders since it started; False if ``done()`` came first."""
    deadline = time.monotonic() + timeout
    next_done_check = 0.0
    while time.monotonic() < deadline:
        if progress(worker.health()) >= at_least:
            return True
        if time.monotonic() >= next_done_check:
            if done():
                return False
            next_done_check = time.monotonic() + 1.0
        if worker.proc is not None and worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.proc.returncode}:\n{worker.tail()}")
        time.sleep(0.1)
    raise TimeoutError(f"worker handled fewer than {at_least} orders in {timeout:.0f}s:\n{worker.tail()}")


def restart(worker: ChildProcess, name: str, killed_at: float, done: Callable[[], bool],
            timeout: float = 120.0) -> Restart:
    """Start the killed worker again under the same id; time its first handled order."""
    started = time.monotonic()
    worker.start(timeout=timeout)
    ready = time.monotonic()
    first = time.monotonic() if wait_progress(worker, 1, done, timeout) else None
    return Restart(name, killed_at, started, ready, first)


def kill_while_busy(worker: ChildProcess, name: str, kills: int, step: int, done: Callable[[], bool],
                    rng: random.Random, timeout: float = 180.0) -> list[Restart]:
    """Kill ``worker`` up to ``kills`` times, each after ``step`` +-50 % orders handled since its restart.

    Stops early when ``done()`` (every order decided): a kill of an idle
    worker tests nothing this soak is for.
    """
    restarts: list[Restart] = []
    for _ in range(kills):
        if not wait_progress(worker, rng.randint(max(1, step // 2), max(1, step * 3 // 2)), done, timeout):
            break
        restarts.append(restart(worker, name, sigkill(worker), done))
    return restarts


def group_partitions(settings: Settings, instance_id: str, topic: str = t.RECEIVED) -> list[int]:
    """The partitions of ``topic`` the member with static id ``instance_id`` holds in the worker group."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, **client_config()})
    group = admin.describe_consumer_groups([settings.app_id])[settings.app_id].result(timeout=30)
    return sorted(tp.partition for m in group.members if m.group_instance_id == instance_id
                  for tp in m.assignment.topic_partitions if tp.topic == topic)


def _shared(settings: Settings, instance_id: str) -> bool:
    """Whether the group is stable with several members, each (``instance_id`` among them) holding partitions."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, **client_config()})
    group = admin.describe_consumer_groups([settings.app_id])[settings.app_id].result(timeout=30)
    holding = {m.group_instance_id for m in group.members
               if any(tp.topic == t.RECEIVED for tp in m.assignment.topic_partitions)}
    return str(group.state).endswith("STABLE") and len(group.members) > 1 and \
        instance_id in holding and len(holding) == len(group.members)


def committed_and_ends(settings: Settings, partitions: list[int],
                       topic: str = t.RECEIVED) -> dict[int, tuple[int, int]]:
    """Per partition: the worker group's committed offset and the log end offset."""
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.app_id,
                  "enable.auto.commit": False, **client_config()})
    try:
        committed = c.committed([TopicPartition(topic, p) for p in partitions], timeout=30)
        return {tp.partition: (tp.offset, c.get_watermark_offsets(TopicPartition(topic, tp.partition),
                                                                  timeout=30)[1]) for tp in committed}
    finally:
        c.close()


def kill_for_good(worker: ChildProcess, name: str, settings: Settings, at_least: int, done: Callable[[], bool],
                  timeout: float = 120.0, more: Callable[[], None] | None = None) -> Takeover:
    """Kill a busy worker of several and time until the others commit progress on each of its lagging partitions.

    Waits first until the worker holds partitions in a group where every member
    holds some (a rebalance still in flight would be timed too), then until
    it handled ``at_least`` more orders. ``more`` (publishing the rest of a
    feed) runs right after the kill, so that the dead worker's partitions have
    work waiting even when it had caught up with everything before it died.
    ``done`` must mean "every order published so far is decided", not the
    whole feed: ``more`` is published only after the kill, so a worker left
    idle (the others took the rest) is then killed idle instead of waited on
    until ``timeout`` raises.
    """
    me = worker.settings.group_instance_id(worker.settings.web_port)
    if me is None:  # dynamic members (CSOS_STATIC_MEMBERSHIP=0): no id names the owner; kill, time nothing
        wait_progress(worker, progress(worker.health()) + at_least, done, timeout)
        sigkill(worker)
        return Takeover(name, [], None)
    deadline = time.monotonic() + timeout
    while not _shared(settings, me):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the group never settled with {me} and the others each holding partitions")
        time.sleep(0.5)
    wait_progress(worker, progress(worker.health()) + at_least, done, timeout)
    mine = group_partitions(settings, me)
    killed_at = sigkill(worker)
    if more is not None:
        more()
    before = committed_and_ends(settings, mine)
    lagging = [p for p, (offset, end) in before.items() if offset < end]
    if not lagging:
        return Takeover(name, mine, None)
    deadline = killed_at + timeout
    while time.monotonic() < deadline:
        now = committed_and_ends(settings, lagging)
        if all(now[p][0] > before[p][0] for p in lagging):
            return Takeover(name, lagging, time.monotonic() - killed_at)
        time.sleep(0.2)
    return Takeover(name, lagging, None)


# --------------------------------------------------------------------------- waiting and checking
DECIDED_SQL = ("SELECT uniqExact(order_id) FROM (SELECT order_id FROM verdicts UNION ALL "
               "SELECT order_id FROM rejections UNION ALL SELECT order_id FROM pending_orders)")


def decided(settings: Settings, attempts: int = 20) -> int:
    """Orders with any outcome in ClickHouse (verdict, rejection or parked).

    Retried: on a loaded machine the sink's /health may miss its one-second
    deadline, and ``run_query`` then tries the store the sink holds locked.
    """
    for attempt in range(attempts):
        try:
            return int(run_query(settings, DECIDED_SQL)[1][0][0])
        except Exception:  # noqa: BLE001 - transient: sink busy
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def wait_decided(settings: Settings, n: int, timeout: float, logs: Callable[[], str] = str, *,
                 strict: bool = True) -> bool:
    """Wait until ``n`` orders are decided; on timeout raise, or with ``strict=False`` return False.

    Non-strict callers go on to :func:`check_outcomes`, which counts the
    undecided orders (``no_outcome``) with everything else.
    """
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        got = decided(settings)
        if got >= n:
            return True
        time.sleep(0.5)
    if strict:
        raise TimeoutError(f"{got} of {n} orders decided within {timeout:.0f}s\n{logs()}")
    return False


def sink_lag(settings: Settings) -> int:
    """Records on the topics the ClickHouse sink reads that its group has not committed yet (0: caught up)."""
    from confluent_kafka import ConsumerGroupTopicPartitions

    from streams.pipeline.sink_service import EXPECTED

    group = f"{settings.app_id}-clickhouse-sink"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, **client_config()})
    listed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result(timeout=30)
    committed = {(tp.topic, tp.partition): tp.offset for tp in listed.topic_partitions}
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
                  **client_config()})
    try:
        lag = 0
        for topic, meta in c.list_topics(timeout=30).topics.items():
            if topic not in EXPECTED:
                continue
            for p in meta.partitions:
                low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
                done = committed.get((topic, p), -1)
                lag += high - (done if done >= 0 else low)
        return lag
    finally:
        c.close()


def wait_sink_caught_up(settings: Settings, timeout: float = 120.0) -> None:
    """Wait until the sink has committed every record on its topics, twice in a row (the workers are idle).

    Twice: a worker's last audit events may still be on their way when the
    first check finds the sink caught up with what was there.
    """
    deadline = time.monotonic() + timeout
    clean = 0
    while time.monotonic() < deadline:
        clean = clean + 1 if sink_lag(settings) == 0 else 0
        if clean >= 2:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the ClickHouse sink still has {sink_lag(settings)} records to write after {timeout:.0f}s")


OUTPUT_TOPICS = (t.VERIFIED, t.REJECTED, t.PENDING, t.VERDICTS, t.HOLD, t.RELEASE)


def read_outputs(settings: Settings, idle_seconds: float = 3.0) -> dict[str, list[dict[str, Any]]]:
    """Every record on the output topics, decoded, per topic in log order."""
    codec = default_codec()
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in OUTPUT_TOPICS}
    for m in consume_all(settings.kafka_bootstrap, list(OUTPUT_TOPICS), idle_seconds=idle_seconds, timeout=300):
        out[m.topic()].append(codec.decode(m.value())[1])
    return out


def _version(rec: dict[str, Any]) -> Any:
    """The record's decision version when the schema has one (issue 10); else None: compare on order id alone."""
    return rec.get("decision_version")


def _two_ways(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> set[str]:
    """Order ids found in both lists with the same decision version (or on both at all, without versions)."""
    seen = {(r["order_id"], _version(r)) for r in a}
    return {r["order_id"] for r in b if (r["order_id"], _version(r)) in seen}


def check_outcomes(settings: Settings, feed: PreparedFeed, order_ids: list[str],
                   outputs: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, int]:
    """Count every kind of wrong outcome for ``order_ids`` (a prefix of the feed); each must be 0.

    Keys ending in ``_total`` (and ``orders``) are sizes, not problems; see :data:`SIZES`.
    """
    from streams.tools.evaluation import NoReview, run_policy
    from streams.monitoring.monitor import Monitor
    from streams.apps.summary import fetch_summary

    outputs = outputs if outputs is not None else read_outputs(settings)
    ids = set(order_ids)
    sims = {m.sim.sim_id: m.sim for m in feed.messages}
    per: dict[str, dict[str, list[dict[str, Any]]]] = {name: defaultdict(list) for name in OUTPUT_TOPICS}
    for name, records in outputs.items():
        for r in records:
            per[name][r["order_id"]].append(r)
    verified, rejected, pending = per[t.VERIFIED], per[t.REJECTED], per[t.PENDING]
    verdicts = per[t.VERDICTS]
    c: Counter[str] = Counter(orders=len(ids))
    for oid in ids:
        is_verified, is_rejected = oid in verified, oid in rejected
        c["no_outcome"] += not (is_verified or is_rejected or oid in pending)
        c["verified_and_rejected"] += is_verified and is_rejected
        c["rejected_for_two_reasons"] += len({r["reason_code"] for r in rejected.get(oid, [])}) > 1
        c["verified_without_verdict"] += is_verified and oid not in verdicts
        c["verified_more_than_once"] += len(verified.get(oid, [])) > 1  # a duplicate, allowed: counted only
        expected = sims[oid].expected_outcome
        if expected.startswith("REJECT:"):
            c["outcome_not_as_fed"] += not is_rejected or is_verified or \
                {r["reason_code"] for r in rejected[oid]} != {expected.split(":", 1)[1]}
        else:
            c["outcome_not_as_fed"] += not is_verified or is_rejected
    by_version: dict[tuple[str, Any], set[str]] = defaultdict(set)
    for oid, rs in verdicts.items():
        for r in rs:
            by_version[(oid, _version(r))].add(r["verdict"])
    c["hold_and_release_verdicts"] = len({oid for (oid, _), v in by_version.items() if oid in ids and len(v) > 1})
    c["on_hold_and_release_topics"] = len(_two_ways(outputs[t.HOLD], outputs[t.RELEASE]) & ids)
    # the unfaulted reference: the monitor replayed offline over the verified orders
    first_verified = [rs[0] for oid, rs in verified.items() if oid in ids]
    # No analyst decides during the run, so none in the reference either: open cases stay open (issue 11).
    reference = {d["order_id"] for d in run_policy(first_verified, Monitor.from_env(), reviewer=NoReview())
                 if d["held"]}
    first_verdict = {oid: rs[0]["verdict"] for oid, rs in verdicts.items() if oid in ids}
    held = {oid for oid, v in first_verdict.items() if v == "HOLD"}
    c["held_total"], c["reference_held_total"] = len(held), len(reference)
    c["held_not_as_reference"] = len(held ^ reference)
    c["hold_topic_not_as_verdicts"] = len(({r["order_id"] for r in outputs[t.HOLD]} & ids) ^ held)
    c.update(_clickhouse_mismatches(settings, ids, verified, rejected, first_verdict))
    s = fetch_summary(settings)
    n_reject = sum(sims[oid].expected_outcome.startswith("REJECT:") for oid in ids)
    c["summary_received_off_by"] = abs(s.received - len(ids))
    c["summary_verified_off_by"] = abs(s.verified - (len(ids) - n_reject))
    c["summary_rejected_off_by"] = abs(s.rejected - n_reject)
    c["summary_held_off_by"] = abs(s.held - len(reference))
    c["summary_conflicting"] = s.conflicting
    c["audit_chain_problems"] = _audit_problems(settings)
    return dict(c)


#: Counters that are sizes or allowed duplicates, not problems.
SIZES = frozenset({"orders", "held_total", "reference_held_total", "verified_more_than_once"})


def problems(counts: dict[str, int]) -> dict[str, int]:
    """The non-zero problem counters of :func:`check_outcomes`."""
    return {k: v for k, v in counts.items() if k not in SIZES and v}


def _clickhouse_mismatches(settings: Settings, ids: set[str], verified: dict, rejected: dict,
                           first_verdict: dict[str, str]) -> dict[str, int]:
    """ClickHouse (FINAL) against the topics: the same order ids, reasons and verdicts."""
    def rows(sql: str) -> list[list[Any]]:
        return run_query(settings, sql)[1]

    ch_verified = {r[0] for r in rows("SELECT DISTINCT order_id FROM order_lines FINAL")} & ids
    ch_rejected = {r[0]: r[1] for r in rows("SELECT order_id, reason_code FROM rejections FINAL")
                   if r[0] in ids}
    ch_verdicts = {r[0]: r[1] for r in rows("SELECT order_id, verdict FROM verdicts FINAL") if r[0] in ids}
    topic_rejected = {oid: rs[-1]["reason_code"] for oid, rs in rejected.items() if oid in ids}
    return {
        "clickhouse_verified_not_as_topic": len(ch_verified ^ (set(verified) & ids)),
        "clickhouse_rejected_not_as_topic": len(set(ch_rejected.items()) ^ set(topic_rejected.items())),
        "clickhouse_verdict_not_as_first": sum(ch_verdicts.get(oid) != v for oid, v in first_verdict.items())
        + len(set(ch_verdicts) - set(first_verdict)),
    }


def _audit_problems(settings: Settings) -> int:
    from connectors.clickhouse.audit_chain import KeyRing, verify_store

    with open_reader(settings) as read:
        report = verify_store(lambda sql: read(sql)[1], keys=KeyRing.from_settings(settings))
    found = sum(len(c.problems) for c in report.chains)
    return found or (0 if report.ok else 1)  # not ok without a listed problem (e.g. unsealed rows): one


def render(counts: dict[str, int], restarts: list[Restart], takeovers: list[Takeover]) -> str:
    """The counts table and the recovery times, for the soak's output and a failing test's message."""
    lines = ["check                                 count", "------------------------------------  -----"]
    lines += [f"{k:<36}  {v:>5}{'' if k in SIZES or not v else '  <-- must be 0'}" for k, v in counts.items()]
    for r in restarts:
        lines.append(f"restart of {r.worker}: kill->ready {r.ready_at - r.killed_at:5.1f} s, start->first order "
                     + (f"{r.restart_to_first:5.1f} s" if r.restart_to_first is not None else "  (idle)"))
    for tk in takeovers:
        lines.append(f"takeover of {tk.worker}'s partitions {tk.partitions}: "
                     + (f"{tk.seconds:.1f} s" if tk.seconds is not None else "not measured (nothing lagging)"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the soak (csos chaos)
@dataclass
class SoakResult:
    counts: dict[str, int]
    restarts: list[Restart] = field(default_factory=list)
    takeovers: list[Takeover] = field(default_factory=list)


def soak(data_dir: Path, *, orders: int, kills: int, seed: int = 5, registrants: int = 40,
         say: Callable[[str], None] = print) -> SoakResult:
    """Kill one busy worker ``kills`` times over the first 70 % of the feed, then one of two over the rest."""
    import uuid

    from streams.tools.feed import prepare_feed, publish, publish_reference_data, replay_settings
    from connectors.kafka.io import Publisher

    with running_broker(data_dir / "kafka") as broker:
        settings = Settings.from_env().with_(
            kafka_bootstrap=broker.bootstrap, data_dir=data_dir, pki_dir=data_dir / "pki", clickhouse_url="",
            web_port=free_port(), sink_port=free_port(), app_id=f"csos-chaos-{uuid.uuid4().hex[:6]}")
        registrants = max(registrants, orders // 50)
        days = max(30, round(orders / (0.28 * registrants)))  # the simulator: ~0.28 orders per registrant-day
        say(f"preparing about {orders} signed orders ...")
        feed = prepare_feed(settings, registrants=registrants, seed=seed, days=days, bad_counts={"tampered": 5},
                            suspicious_counts={"size_spike": 10, "frequency_burst": 10})
        settings = replay_settings(settings, feed)
        publish_reference_data(settings, Publisher(settings.kafka_bootstrap))
        first = feed.messages[: len(feed.messages) * 7 // 10]
        rest = feed.messages[len(first):]
        sink = sink_process(settings)
        a = worker_process(worker_settings(settings, "a"))
        b = worker_process(worker_settings(settings, "b"))
        rng = random.Random(seed)
        sink.start()
        try:
            a.start()
            say(f"{len(feed.messages)} orders; phase 1: one worker, {kills} kills over {len(first)} orders")
            publish(first, Publisher(settings.kafka_bootstrap))
            done1 = lambda: decided(settings) >= len(first)  # noqa: E731
            restarts = kill_while_busy(a, "a", kills, max(20, 2 * len(first) // (kills + 2)), done1, rng)
            wait_decided(settings, len(first), 600, a.tail, strict=False)
            say(f"phase 2: two workers, one killed, over {len(rest)} orders")
            b.start()
            half = len(rest) // 2
            publish(rest[:half], Publisher(settings.kafka_bootstrap))
            published = len(first) + half
            takeover = kill_for_good(a, "a", settings, max(20, half // 4),
                                     lambda: decided(settings) >= published,
                                     more=lambda: publish(rest[half:], Publisher(settings.kafka_bootstrap)))
            a.start()  # back under its id: rejoins at once
            wait_decided(settings, len(feed.messages), 600, b.tail, strict=False)
            wait_sink_caught_up(settings)  # the sink's last audit batch
            counts = check_outcomes(settings, feed, [m.sim.sim_id for m in feed.messages])
            return SoakResult(counts, restarts, [takeover])
        finally:
            for w in (a, b):
                w.stop()
            sink.stop()

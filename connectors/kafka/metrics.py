"""Prometheus metrics of the worker, the sink and the review page: every definition in one place.

Why one module: the names are an interface (alert rules in ``deploy/prometheus/alerts.yml`` and the
operators' Grafana dashboard use them; ``tests/e2e/test_metrics.py`` checks they exist), so they are
declared once here and the processes only count.

How outcomes are counted without touching the agents' logic: every message an agent sends goes
through an :class:`connectors.kafka.emit.Emitter`, which calls :func:`observe_published` with the messages
once the broker has them (a buffered emitter after ``publish_pending``, an immediate one as it
sends). Only the outcome topics are counted (verdicts, rejections, dead letters, case events), from
the records they were encoded from when the emitter has them (not decoded again); the rest are
skipped at the cost of a set lookup. A redelivered input whose recorded outputs are sent
again after a crash counts again: the counters count deliveries, the ClickHouse tables count orders.

Each process has its own registry (the default one); ``exposition`` renders it for ``GET /metrics``
after running the process's scrape-time refreshers (consumer lag, CRL freshness, open cases).
"""
from __future__ import annotations

import io
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping

import fastavro
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest,
                               start_http_server)

from connectors.kafka import catalogue as t
from streams.core.avro_codec import HEADER_LEN

log = logging.getLogger(__name__)

#: received -> verdict or rejection, in seconds: from well under a second (live) to minutes (a backlog).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
#: Messages per sink batch (CSOS_SINK_BATCH_SIZE caps it; 5,000 by default).
BATCH_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
INSERT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# ---------------------------------------------------------------- the worker (and any emitter)
ORDERS = Counter("csos_orders", "Orders decided, by outcome: released or held (monitor verdict), rejected "
                 "(verification).", ["outcome"])
HOLDS = Counter("csos_holds", "Held orders by detector that fired (an order held by two detectors counts "
                "once for each).", ["detector"])
REJECTIONS = Counter("csos_rejections", "Rejected orders by reason code.", ["reason"])
DEAD_LETTERS = Counter("csos_dead_letters", "Messages dead-lettered, by stage, source topic and reason "
                       "class (the reason's text before its first colon).", ["stage", "topic", "reason"])
DECISION_LATENCY = Histogram("csos_order_decision_seconds", "Seconds from an order's receipt to its verdict "
                             "or rejection.", ["outcome"], buckets=LATENCY_BUCKETS)
CASE_EVENTS = Counter("csos_case_events", "Due-diligence case events by kind (OPENED, ESCALATED, RELEASED, "
                      "REPORTED, ...).", ["kind"])
CONSUMER_LAG = Gauge("csos_consumer_lag_messages", "Messages on a partition not yet committed by the group "
                     "(high watermark - committed offset).", ["group", "topic", "partition"])
GC_PAUSE = Histogram("csos_gc_pause_seconds", "Seconds the worker stood still in one garbage collection, by "
                     "generation (0 young .. 2 full; CSOS_GC_YOUNG, CSOS_GC_FREEZE).", ["generation"],
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
CRL_REMAINING = Gauge("csos_crl_seconds_until_next_update", "Seconds until the nextUpdate of each issuer's CRL "
                      "in force (negative: stale, its orders are parked).", ["issuer"])

# ---------------------------------------------------------------- the sink
SINK_BATCH = Histogram("csos_sink_batch_messages", "Messages per batch the sink read.", buckets=BATCH_BUCKETS)
SINK_INSERT = Histogram("csos_sink_insert_seconds", "Seconds to write one batch into ClickHouse (the "
                        "successful attempt).", buckets=INSERT_BUCKETS)
SINK_ROWS = Counter("csos_sink_rows_written", "Rows the sink wrote, by table.", ["table"])
SINK_REPLAYS = Counter("csos_sink_batches_replayed", "Batches a sink was killed in the middle of, found on start "
                       "or assignment: written again exactly (replayed) or not (not_replayable: split between "
                       "sinks, or its messages gone).", ["outcome"])
for _replay in ("replayed", "not_replayable"):  # at 0 from the start, so that an alert sees the first one
    SINK_REPLAYS.labels(_replay)
SINK_LAST_WRITE = Gauge("csos_sink_last_write_timestamp_seconds", "Unix time of the sink's last successful "
                        "write.")

# ---------------------------------------------------------------- the review page
OPEN_CASES = Gauge("csos_cases_open", "Held orders whose case is open.")
OPEN_CASES_PAST_DUE = Gauge("csos_cases_open_past_due", "Open cases past the due-diligence clock (escalated "
                            "or about to be).")

for _outcome in ("released", "held", "rejected"):  # present at 0 from the start: rate() and alerts see them
    ORDERS.labels(_outcome)
    DECISION_LATENCY.labels(_outcome)

#: The topics whose messages are counted (decided orders, dead letters, case events).
OUTCOME_TOPICS = frozenset({t.VERDICTS, t.REJECTED, t.DLQ, t.CASES})
_REASON_CLASS = re.compile(r"^[A-Za-z_][A-Za-z_ .\-]{0,47}$")


def reason_class(reason: str) -> str:
    """A dead letter's reason reduced to a bounded label: its text before the first colon, else ``other``.

    Reasons quote exceptions and inputs; a label must not (every distinct value is a new time series).
    """
    head = reason.split(":", 1)[0].strip()
    return head if _REASON_CLASS.match(head) else "other"


def _seconds(start: Any, end: Any) -> float | None:
    if isinstance(start, datetime) and isinstance(end, datetime):
        return max(0.0, (end - start).total_seconds())
    return None


def _count(topic: str, rec: Mapping[str, Any]) -> None:
    if topic == t.VERDICTS:
        outcome = "held" if rec["verdict"] == "HOLD" else "released"
        ORDERS.labels(outcome).inc()
        if outcome == "held":
            for detector in sorted({r["detector"] for r in rec["reasons"] if r["fired"] and r.get("enforced", True)}):
                HOLDS.labels(detector).inc()
        latency = _seconds(rec.get("received_at"), rec.get("decided_at"))
    elif topic == t.REJECTED:
        outcome = "rejected"
        ORDERS.labels(outcome).inc()
        REJECTIONS.labels(rec["reason_code"]).inc()
        latency = _seconds(rec.get("received_at"), rec.get("rejected_at"))
    elif topic == t.DLQ:
        DEAD_LETTERS.labels(rec["stage"], rec["source_topic"], reason_class(rec["reason"])).inc()
        return
    else:
        CASE_EVENTS.labels(rec["kind"]).inc()
        return
    if latency is not None:
        DECISION_LATENCY.labels(outcome).observe(latency)


def _read_own(codec: Any, value: bytes) -> dict[str, Any]:
    """A message this process just encoded, read back with its writer schema only.

    Half the cost of ``AvroCodec.decode`` (no schema resolution, no range checks): those guard
    against foreign input, and these bytes are our own.
    """
    writer = codec.writer_of(value)
    return fastavro.schemaless_reader(io.BytesIO(memoryview(value)[HEADER_LEN:]), writer.parsed, None)


def observe_published(messages: Iterable[tuple[str, bytes | None, bytes]], codec: Any,
                      records: Mapping[int, Mapping[str, Any]] | None = None) -> None:
    """Count the outcomes among messages the broker accepted. Never raises: metrics must not stop a stage.

    ``records`` maps ``id(message)`` to the record its bytes were encoded from, when the sender still has
    it (an ``Emitter`` keeps those of outcome topics): counted from it, the message is not decoded again
    on the hot path. Others (re-published recorded outputs) are read back from their bytes.
    """
    for message in messages:
        topic = message[0]
        if topic not in OUTCOME_TOPICS:
            continue
        try:
            rec = records.get(id(message)) if records else None
            _count(topic, rec if rec is not None else _read_own(codec, message[2]))
        except Exception:  # noqa: BLE001 - a counting bug is logged, the pipeline goes on
            log.exception("metrics: could not count a message on %s", topic)


_lag_series: dict[str, set[tuple[str, str]]] = {}


def set_lag(group: str, lags: Iterable[tuple[str, int, int]]) -> None:
    """Replace ``group``'s lag series with (topic, partition, lag): partitions no longer assigned disappear."""
    now = {(topic, str(partition)): lag for topic, partition, lag in lags}
    for gone in _lag_series.get(group, set()) - set(now):
        try:
            CONSUMER_LAG.remove(group, *gone)
        except KeyError:
            pass
    for (topic, partition), lag in now.items():
        CONSUMER_LAG.labels(group, topic, partition).set(max(0, lag))
    _lag_series[group] = set(now)


def set_crl_next_updates(next_updates: Mapping[str, datetime], now: datetime | None = None) -> None:
    """Seconds until each issuer's nextUpdate (a removed issuer's series disappears)."""
    now = now or datetime.now(timezone.utc)
    CRL_REMAINING.clear()
    for issuer, at in next_updates.items():
        CRL_REMAINING.labels(issuer).set((at - now).total_seconds())


_refreshers: list[Callable[[], None]] = []


def set_refreshers(*refreshers: Callable[[], None]) -> None:
    """What this process updates just before each scrape (lag, CRL freshness, open cases)."""
    _refreshers[:] = refreshers


def _refresh() -> None:
    for refresh in list(_refreshers):
        try:
            refresh()
        except Exception:  # noqa: BLE001 - the other metrics are still worth serving
            log.exception("metrics: refresher %s failed", getattr(refresh, "__name__", refresh))


class _Refreshing:
    """The default registry, refreshed first: what the extra listener of ``CSOS_METRICS_ADDR`` serves."""

    def collect(self) -> Iterator[Any]:
        _refresh()
        yield from REGISTRY.collect()

    def restricted_registry(self, names: Iterable[str]) -> Any:
        _refresh()
        return REGISTRY.restricted_registry(names)


def exposition() -> tuple[bytes, str]:
    """(body, content type) of ``GET /metrics``, after this process's refreshers ran (a failing one is logged)."""
    _refresh()
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def serve_extra(addr: str) -> None:
    """Also serve the metrics alone on ``host:port`` (``CSOS_METRICS_ADDR``), e.g. ``0.0.0.0:9464`` in a container.

    Why: the worker's and the sink's own ports listen on 127.0.0.1 only (the sink's also refuses
    any other Host header), so a Prometheus in another container or host could not scrape them.
    This listener serves nothing but ``/metrics``. Empty: nothing more is served.
    """
    if not addr:
        return
    host, _, port = addr.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"CSOS_METRICS_ADDR={addr!r}: give host:port, e.g. 0.0.0.0:9464")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=_Refreshing())  # type: ignore[arg-type]
    log.warning("metrics on http://%s/metrics", addr)


class Every:
    """Call ``fn`` at most once per ``seconds`` (the sink refreshes its lag from its consume loop)."""

    def __init__(self, seconds: float, fn: Callable[[], None]) -> None:
        self.seconds, self.fn, self.last = seconds, fn, float("-inf")

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - lag is informative; the sink goes on
                log.exception("metrics: %s failed", self.fn)


def observe_sink_write(written: Mapping[str, int] | None, seconds: float) -> None:
    """One successful batch write: its duration, its rows per table, and the time (for "sink not writing")."""
    SINK_INSERT.observe(seconds)
    for table, rows in (written or {}).items():
        SINK_ROWS.labels(table).inc(rows)
    SINK_LAST_WRITE.set_to_current_time()


# ---------------------------------------------------------------- scrape-time refreshers, per process
def faust_lag(app: Any, group: str, topics: frozenset[str]) -> Callable[[], None]:
    """The worker's lag on its input partitions: aiokafka's high watermark minus Faust's committed offset.

    Both are what the consumer already knows (no request to the broker per scrape); a partition
    not fetched or committed yet has no series until it is.
    """
    def refresh() -> None:
        consumer = app.consumer
        committed = getattr(consumer, "_committed_offset", {})  # noqa: SLF001 - Faust has no accessor
        lags = []
        for tp in list(consumer.assignment()):
            if tp.topic not in topics:
                continue  # changelogs and standby replicas are Faust's, not inputs
            try:
                high, done = consumer.highwater(tp), committed.get(tp)
            except Exception:  # noqa: BLE001 - revoked between assignment() and here
                continue
            if high is not None and done is not None:
                lags.append((tp.topic, tp.partition, high - done))
        set_lag(group, lags)
    return refresh


def confluent_lag(consumer: Any, group: str) -> Callable[[], None]:
    """The sink's lag: the cached high watermark (updated by every fetch) minus the consumer's position."""
    def refresh() -> None:
        assigned = consumer.assignment()
        lags = []
        for tp in consumer.position(assigned) if assigned else []:
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and tp.offset >= 0:
                lags.append((tp.topic, tp.partition, high - tp.offset))
        set_lag(group, lags)
    return refresh


def crl_freshness(verifier_of: Callable[[], Any]) -> Callable[[], None]:
    """``csos_crl_seconds_until_next_update`` from the worker's verifier (none before the agents start)."""
    def refresh() -> None:
        verifier = verifier_of()
        if verifier is not None:
            set_crl_next_updates(verifier.crl_next_updates())
    return refresh


def open_cases(held_cases: Callable[[], list[Any]]) -> Callable[[], None]:
    """``csos_cases_open`` and ``csos_cases_open_past_due`` from the review page's held-case list."""
    def refresh() -> None:
        now = datetime.now(timezone.utc)
        cases = held_cases()
        OPEN_CASES.set(len(cases))
        OPEN_CASES_PAST_DUE.set(sum(1 for c in cases if c.overdue(now)))
    return refresh

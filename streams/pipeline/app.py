"""The Faust application: topics, the state table and the agents, wired from settings.

One of the worker's two runtimes (``CSOS_RUNTIME=faust``, the default); the
other, ``streams.pipeline.kafka_worker``, runs the same processors
(``streams.pipeline.wiring``) over the same changelog topics on one
confluent-kafka consumer.

Transport (Faust/aiokafka in, confluent-kafka out), serialization (Avro
single-object, ``streams.core.avro_codec``) and processing (the processors in
``streams.pipeline.agents``) are kept apart, as in quix-streams and bytewax: Faust
hands raw bytes to a processor, which decodes, decides and emits. Each event
becomes an ``InputMessage`` and goes to the processor through the interface
written in ``streams.pipeline.processor``.

Delivery is at-least-once, outcomes are exactly-once per order id. Each
agent takes a batch of what is ready (``streams.pipeline.batching.take_ready``) and, holding its lock
(timers that touch the same state wait):

1. handles every event: state changes in its cache, outputs *buffered* as
   encoded bytes (``Emitter(buffered=True)``), and per order id the decision
   and those exact bytes recorded in the same state (``streams.pipeline.outcomes``);
2. writes the changed state to its table and waits until the broker has
   acknowledged every changelog record (``DurableTable.write_durable``);
3. publishes the buffered outputs and waits for their delivery;
4. lets Faust acknowledge the events; it commits the offsets ~1 s later.

What a kill -9 at each point leaves, and what the restarted worker does
with the batch Kafka delivers again:

* during 1, or during 2 before the changelog is written: nothing of the
  batch anywhere; it is decided afresh (as the first time);
* after 2, before or during 3: the state (decisions and recorded outputs) is
  durable, the outputs are missing or partly out; each redelivered order
  finds its record and re-publishes the recorded bytes: no output lost, at
  worst a duplicate of the same message, never a second judgement;
* after 3, before the commit: the same, re-published duplicates;
* an upstream duplicate (the verify agent re-published an order after its
  own crash, so the monitor reads it at a new offset) finds the order id's
  record (kept ``CSOS_DEDUP_DAYS``) and is audited, not judged or learned again.

The reverse order (outputs first, then state) was the old one: a crash
between them re-judged orders whose outputs were already out (a verified
order then rejected as a replay of itself, an order learned twice).

Timers (re-verification of parked orders, the due-diligence clock) have no
input offset to redeliver their work, so they publish first and write state
second: a crash between them repeats the step (a duplicate of the same
outcome), it never loses one. Recorded outputs are pruned once the group's
committed offset passes their input (refreshed every few seconds).
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

import faust
from aiokafka.errors import UnknownTopicOrPartitionError
from faust.types import TP

from connectors.kafka.io import Publisher
from connectors.kafka.security import faust_app_kwargs
from connectors.kafka.topics import replication_factor

from connectors.kafka import catalogue as t
from streams.pipeline.agents.cases import STAGE as CASE_STAGE
from streams.pipeline.agents.cases import key_partition
from streams.pipeline.processor import InputMessage, Processor, broker_time
from streams.pipeline.agents.monitor import STAGE as MONITOR_STAGE
from streams.pipeline.agents.verify import STAGE as VERIFY_STAGE
from streams.pipeline.agents.verify import VerifyProcessor
from streams.core.config import Settings
from connectors.kafka.metrics import crl_freshness, exposition, faust_lag, set_refreshers
from streams.pipeline.batching import take_ready
from streams.pipeline.faust_tuning import gapless_inputs, set_fetch_max_wait
from streams.pipeline.heap import freeze_startup_heap
from streams.pipeline.table_state import DurableTable
from streams.pipeline.wiring import TABLES, build_processors, require_supplier_dea  # noqa: F401 - re-exported
from streams.core import native

log = logging.getLogger(__name__)

VERIFY_TABLE, STATE_TABLE, CASE_TABLE = TABLES["verify"], TABLES["monitor"], TABLES["cases"]


def _raw_topic(app: faust.App, *names: str) -> Any:
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


#: aiokafka's ``timestamp_type`` of a record stamped by the broker (topic ``message.timestamp.type=LogAppendTime``).
LOG_APPEND_TIME = 1


def input_message(event: Any) -> InputMessage:
    """A Faust event as the processors take it: where it was, its bytes and the broker's append time."""
    m = event.message
    return InputMessage(m.topic, m.partition, m.offset, m.key, m.value, appended_at=_appended_at(event))


def _appended_at(event: Any) -> datetime:
    """When the broker took the message in (``streams.pipeline.processor.broker_time``)."""
    m = event.message
    return broker_time(m.topic, m.timestamp if m.timestamp_type == LOG_APPEND_TIME else None)

#: Events an agent decides between two turns of the event loop for the other agents.
YIELD_EVERY = 16
#: A batch slower than this is logged with where its time went (barrier, decide, state write, publish).
SLOW_BATCH_SECONDS = 0.5
#: How often the agents learn the group's committed offsets (to prune outputs recorded for redelivery).
COMMITTED_REFRESH_SECONDS = 2.0


def committed_offsets(app: faust.App) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the offset this worker's group committed (the next one to read), as Faust knows it.

    Faust keeps it after every successful commit and reads it from the
    broker on each assignment (``Consumer._committed_offset``, no public
    accessor); an input below it will not be delivered again.
    """
    known = getattr(app.consumer, "_committed_offset", {})  # noqa: SLF001
    return {(tp.topic, tp.partition): off for tp, off in list(known.items()) if off is not None}


async def settle_timer_step(proc: Processor, table: DurableTable) -> None:
    """After a step that no input offset will repeat (a timer): publish its outputs, then write its state."""
    proc.state.flush()
    if proc.emitter.pending:
        await proc.emitter.publish_pending()
    if table.unsent:
        await table.write_durable()


def handle_event(proc: Processor, event: Any) -> None:
    """Give one event an outcome: the processor's, or a dead letter (``unhandled: ...``, audited) if it raised.

    Raises only when even the dead letter cannot be written; the batch is
    then not acknowledged and is delivered again.
    """
    message = input_message(event)
    try:
        proc.handle(message)
    except Exception as exc:  # noqa: BLE001 - one event must not stop the others
        log.exception("%s agent: unhandled error on %s[%d]@%d", proc.stage, message.topic, message.partition,
                      message.offset)
        proc.unhandled(message, exc)


async def decide_batch(proc: Processor, table: DurableTable, events: list[Any],
                       slow_seconds: float = SLOW_BATCH_SECONDS) -> None:
    """One batch, durable state first: decide every event, write the state and wait for the broker, then publish.

    The caller holds the agent's lock and lets Faust acknowledge the events
    only after this returns; see the module docstring for each crash point.
    """
    marks = [time.monotonic()]
    waited = _first_waited(events)
    if isinstance(proc, VerifyProcessor):  # freshness barrier: off the loop, which keeps the group's heartbeats
        await asyncio.get_running_loop().run_in_executor(None, proc.reference_barrier)
    proc.begin_batch()  # counts the batch; the verify agent takes in reference data here: a timer step, settled as one
    await settle_timer_step(proc, table)
    marks.append(time.monotonic())
    for i, event in enumerate(events, 1):
        handle_event(proc, event)
        if i % YIELD_EVERY == 0:
            # Let the other agents' I/O (state acks, fetches, deliveries) and the heartbeats run: deciding a
            # large batch on a starved CPU held the event loop for seconds and stalled every other agent's
            # waits. Only this agent's lock is held; its state is touched by nothing else meanwhile.
            await asyncio.sleep(0)
    proc.end_batch()  # changed state into the table's store
    marks.append(time.monotonic())
    await table.write_durable()  # ... and on the broker
    marks.append(time.monotonic())
    await proc.emitter.publish_pending()  # then the outputs that state records
    marks.append(time.monotonic())
    if marks[-1] - marks[0] > slow_seconds:
        log.info("%s agent: slow batch of %d events (the first waited %.3f s since its timestamp): %s", proc.stage,
                 len(events), waited, ", ".join(f"{name} {b - a:.3f} s" for name, a, b in
                                                zip(("barrier", "decide", "state", "publish"), marks, marks[1:])))


def _first_waited(events: list[Any]) -> float:
    """Seconds between the batch's first event's Kafka timestamp and now: the fetch and queue wait it had."""
    stamp = getattr(events[0].message, "timestamp", None) if events else None
    return time.time() - stamp if stamp else float("nan")


def create_app(settings: Settings) -> faust.App:
    """Build the worker app. Heavy components (PKI, product master) load when the agents start.

    The ClickHouse sink is a separate process (``csos sink``,
    ``streams.pipeline.sink_service``) so that this one spends its core on
    verification and monitoring.
    """
    suppliers = require_supplier_dea(settings)
    set_fetch_max_wait(settings.fetch_max_wait_ms)
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=replication_factor(),
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_host="127.0.0.1",
        web_port=settings.web_port,
        datadir=str(settings.data_dir / "faust"),
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=8192,
        # Fast recovery (issue 10): a static member id, so a restarted worker takes its partitions straight
        # back (no wait for its old session to lapse), and a short session with frequent heartbeats, so a
        # dead worker's partitions move to the survivors within seconds. See README "Restarts and takeover".
        consumer_group_instance_id=settings.group_instance_id(settings.web_port),
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=settings.heartbeat_seconds,
        # Raw bytes everywhere: agents decode Avro themselves so that a bad
        # message becomes a dead letter instead of a Faust decode crash.
        key_serializer="raw",
        value_serializer="raw",
        **faust_app_kwargs(),  # SASL/TLS from KAFKA_SECURITY_PROTOCOL etc. (connectors.kafka.security)
    )
    # No input lost: a committed offset never passes a record no agent acknowledged, and a record lost inside
    # Faust's consumer (a restart or rebalance race) is read again. See streams.pipeline.faust_tuning.GaplessInputs.
    gapless_inputs(app)
    received = _raw_topic(app, t.RECEIVED)
    # Cleared orders are keyed by purchaser DEA like verified ones, so the monitor learns them in the same state.
    verified = _raw_topic(app, t.VERIFIED, t.CLEARED)
    # Holds and decisions are both keyed by order id: one case's events reach one worker, in order.
    case_inputs = _raw_topic(app, t.HOLD, t.DECISIONS)
    verify_table = app.Table(
        VERIFY_TABLE, default=None, key_type=bytes, value_type=bytes, partitions=settings.partitions,
        use_partitioner=True,  # keyed by purchaser DEA, like csos.orders.received (see the monitor's table)
    )
    state_table = app.Table(
        STATE_TABLE, default=None, key_type=bytes, value_type=bytes,
        partitions=settings.partitions,
        # Changelog writes go to the key's partition by murmur2, the same
        # partitioner every producer of csos.orders.verified uses, so state
        # and orders stay co-partitioned even when a batch spans partitions.
        use_partitioner=True,
    )
    case_table = app.Table(
        CASE_TABLE, default=None, key_type=bytes, value_type=bytes, partitions=settings.partitions,
        use_partitioner=True,  # keyed by order id like som.hold and som.decisions (murmur2)
    )
    parts: dict[str, Any] = {}
    def changelog_producer() -> Publisher:
        # One per table: its flush then vouches for its own records only (see DurableTable).
        return Publisher(settings.kafka_bootstrap)

    durable = {VERIFY_STAGE: DurableTable(verify_table, changelog_producer),
               MONITOR_STAGE: DurableTable(state_table, changelog_producer),
               CASE_STAGE: DurableTable(case_table, changelog_producer)}
    locks = {stage: asyncio.Lock() for stage in durable}  # an agent's batch or a timer step, never both at once

    def owns_case(order_id: str) -> bool:
        """Whether this worker actively owns the case (a standby replica must not escalate it too)."""
        try:
            return TP(t.HOLD, key_partition(order_id, settings.partitions)) in app.assignor.assigned_actives()
        except Exception:  # noqa: BLE001 - not assigned yet
            return False

    @app.task(on_leader=False)
    async def _ready() -> None:
        log.info("csos-som worker ready: broker=%s", settings.kafka_bootstrap)

    def components() -> dict[str, Any]:
        if not parts:
            publisher = Publisher(settings.kafka_bootstrap)
            parts["publisher"] = publisher
            parts.update(build_processors(
                settings, suppliers, {"verify": durable[VERIFY_STAGE], "monitor": durable[MONITOR_STAGE],
                                      "cases": durable[CASE_STAGE]},
                publisher, owns_case, trace_group=f"{settings.app_id}-reference-trace"))
        return parts

    async def changelog_ready(*tables: Any) -> None:
        """Wait until the producer's metadata knows each table's changelog topic.

        With ``use_partitioner`` Faust picks a changelog partition
        synchronously from the producer's cached metadata; a changelog topic
        created moments earlier (at the first start) may be missing from it,
        and aiokafka then fails with ``TypeError`` in ``_partition``. Waiting
        once (aiokafka refreshes metadata until the topic appears) closes
        that window before any write, from an agent or a timer.
        """
        producer = app.producer._ensure_producer()  # noqa: SLF001 - no public way to await topic metadata
        for table in tables:
            name = table.changelog_topic.get_topic_name()
            while True:  # Faust may still be declaring the topic at the first start
                try:
                    await producer.client._wait_on_metadata(name)  # noqa: SLF001
                    break
                except UnknownTopicOrPartitionError:
                    log.warning("changelog topic %s not in the cluster metadata yet; waiting", name)
        ready.update(tables)

    ready: set[Any] = set()

    async def process_batches(stream: Any, proc: Processor) -> None:
        """Take a batch, give each event an outcome, make the state durable, then publish; only then is it acked.

        The order of the steps and what a crash at each leaves are in the
        module docstring. A processor decides every input itself; should an
        exception escape it anyway, that one event is dead-lettered (reason
        ``unhandled: ...``, with an audit event) and the batch goes on. Only a
        failure to write even that, the state or the outputs stops the agent,
        before anything is acknowledged.
        """
        batches = (stream.take_events(settings.batch_size, within=settings.batch_seconds)
                   if settings.batch_seconds > 0 else take_ready(stream, settings.batch_size))
        async for events in batches:
            # The previous batch was acknowledged when this one was taken: commit it now, from the agent itself.
            # The 1 s commit timer alone falls seconds behind while a busy agent holds the event loop (measured:
            # a survivor's first commits on a dead worker's partitions 10 s after it had them). The commit's
            # round trip overlaps this batch's work: it covers only events acknowledged before it started.
            # (Not awaiting it, so that the next batch need not wait for it, was measured slower: README
            # Performance, "Latency per hop".)
            commit = asyncio.ensure_future(app.consumer.commit())
            try:
                async with locks[proc.stage]:
                    await decide_batch(proc, durable[proc.stage], events, settings.slow_batch_seconds)
            finally:
                await commit

    @app.agent(received)
    async def verify_agent(stream: Any) -> None:
        proc: VerifyProcessor = components()["verify"]
        await changelog_ready(verify_table)
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, proc.feed.wait_caught_up, 60.0):
            log.warning("reference data (CRLs, registrants) not read to the end within 60 s; orders that need "
                        "it are parked until it arrives")
        async with locks[VERIFY_STAGE]:
            proc.tick()
            await settle_timer_step(proc, durable[VERIFY_STAGE])
        if settings.gc_freeze:
            freeze_startup_heap("verify agent")
        await process_batches(stream, proc)

    @app.timer(interval=1.0)
    async def reference_data_tick() -> None:
        """Idle or busy, a fresh CRL or registration re-verifies parked orders within a second."""
        proc = parts.get("verify")
        if proc is not None and verify_table in ready:
            async with locks[VERIFY_STAGE]:
                proc.tick()
                await settle_timer_step(proc, durable[VERIFY_STAGE])

    @app.agent(verified)
    async def monitor_agent(stream: Any) -> None:
        await changelog_ready(state_table)
        proc = components()["monitor"]
        if settings.gc_freeze:
            freeze_startup_heap("monitor agent")
        await process_batches(stream, proc)

    @app.agent(case_inputs)
    async def case_agent(stream: Any) -> None:
        await changelog_ready(case_table)
        proc = components()["cases"]
        if settings.gc_freeze:
            freeze_startup_heap("case agent")
        await process_batches(stream, proc)

    @app.timer(interval=settings.case_clock_seconds)
    async def due_diligence_clock() -> None:
        """Escalate held orders whose due-diligence period lapsed, idle or busy."""
        proc = parts.get("cases")
        if proc is not None and case_table in ready:
            async with locks[CASE_STAGE]:
                proc.tick()
                await settle_timer_step(proc, durable[CASE_STAGE])

    @app.timer(interval=COMMITTED_REFRESH_SECONDS)
    async def committed_offsets_refresh() -> None:
        """Tell each agent which inputs are committed, so it forgets the outputs it kept for their redelivery."""
        try:
            offsets = committed_offsets(app)
        except Exception:  # noqa: BLE001 - not started yet: keep everything a little longer
            return
        for name in ("verify", "monitor", "cases"):
            if name in parts:
                parts[name].outcomes.set_committed(offsets)

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        counts = {name: getattr(p, "counts", None) for name, p in parts.items() if hasattr(p, "counts")}
        return web.json({"status": "ok", "counts": counts, "runtime": "faust",
                         "consumer": {"lost_record_repairs": getattr(app.consumer, "repairs", 0)},
                         # "uvloop" or "asyncio" (CSOS_EVENT_LOOP), the loop this worker really runs on
                         "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                         # "compiled" or "source": whether the hot modules run their mypyc build (streams.core.native)
                         "monitor_build": native.MODE,
                         "verification": {"supplier_dea": sorted(suppliers),
                                          "receipt_skew_seconds": settings.receipt_skew_seconds}})

    set_refreshers(faust_lag(app, settings.app_id, frozenset({t.RECEIVED, t.VERIFIED, t.CLEARED, t.HOLD, t.DECISIONS})),
                   crl_freshness(lambda: parts["verify"].verifier if "verify" in parts else None))

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        """Prometheus exposition (connectors.kafka.metrics; README "Metrics")."""
        body, content_type = exposition()
        return web.bytes(body, headers={"Content-Type": content_type})

    app.csos_components = components  # type: ignore[attr-defined]
    return app

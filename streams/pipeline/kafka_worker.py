"""The worker on a confluent-kafka consumer: the same processors and batch order as the Faust app, less framework.

``CSOS_RUNTIME=kafka`` (``csos worker --runtime kafka``) runs this instead of
``streams.pipeline.app``. Why: in ``csos bench --compare-bare`` the Faust
worker reached 0.58-0.61 of a plain consume -> decide -> produce loop's order
lines per CPU-second (README, Performance); its conductor, per-agent queues,
event objects and aiokafka's Python fetcher cost ~0.8 ms of CPU per order.

What stays the same (so the two runtimes are interchangeable on one cluster,
not at once): the processors (``streams.pipeline.wiring``), their tables'
changelog topics and records (``streams.pipeline.changelog_table``), the
consumer group (``CSOS_APP_ID``), the static member id, the topics, and each
batch's order (``streams.pipeline.app``):

1. every event handled (outputs buffered, outcomes recorded in the state);
2. the changed state written to the changelogs and flushed (on the broker);
3. the outputs published and flushed;
4. the input offsets committed (asynchronously, at most every
   ``COMMIT_EVERY_SECONDS`` while busy; synchronously on revocation and at a
   clean stop).

A crash at any point leaves what the Faust worker's crash leaves (see
``streams.pipeline.app``): at worst outputs re-published byte for byte.
Steps 2-4 of a batch run while the next batch is polled and decided
(``_complete``): the broker's round trips overlap the next batch's work; one
batch at most is completing, and the next starts completing only after it,
so the order above holds batch by batch.

What it does differently:

* **Batches**: it waits for the first ready message (at most until the next
  timer is due), then takes whatever else is ready, up to
  ``CSOS_BATCH_SIZE``: a slow stream is decided message by message, a busy
  one in large batches.
* **One consumer** reads all five input topics with the ``range`` assignor,
  which gives one member the same partition number of every topic: a
  registrant's verify state, its monitor state (verified and cleared orders)
  and an order's case (holds and decisions) each live on one worker.
* **Rebalances**: librdkafka calls ``on_revoke``/``on_assign`` inside the
  poll, i.e. between batches, never during one. On revocation the offsets
  of what was decided are committed synchronously; on assignment each newly
  owned partition's table is read back from its changelog before any of its
  input is decided (``streams.pipeline.changelog_table``). A partition kept
  across the rebalance keeps its table; one taken away is forgotten. No
  standby replicas: a takeover reads the changelog (compacted) instead.
* **Timers** (reference data every second, the due-diligence clock) run in
  the same loop between batches, publishing first and writing state second,
  as the Faust timers do.
* ``/health`` and ``/metrics`` are served on ``CSOS_WEB_PORT`` (127.0.0.1) by
  a small aiohttp server, with the Faust worker's fields.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from aiohttp import web
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from connectors.kafka import catalogue as t
from connectors.kafka.changelog import changelog_spec, read_to_end
from connectors.kafka.emit import Outputs, publish_outputs
from connectors.kafka.io import Publisher
from connectors.kafka.metrics import confluent_lag, crl_freshness, exposition, set_refreshers
from connectors.kafka.security import client_config
from connectors.kafka.topics import ensure_topics
from streams.core import native
from streams.core.config import Settings
from streams.pipeline.agents.cases import key_partition
from streams.pipeline.changelog_table import ChangelogTable
from streams.pipeline.heap import freeze_startup_heap
from streams.pipeline.processor import InputMessage, Processor, broker_time
from streams.pipeline.wiring import PARTS, build_processors, changelog_topic, require_supplier_dea

log = logging.getLogger(__name__)

#: Which processor takes which input topic (as the Faust agents do).
ROUTES = {t.RECEIVED: "verify", t.VERIFIED: "monitor", t.CLEARED: "monitor", t.HOLD: "cases", t.DECISIONS: "cases"}
#: librdkafka's timestamp type of a broker-stamped record (``message.timestamp.type=LogAppendTime``).
LOG_APPEND_TIME = 2
#: Offsets are committed at most this often while busy (and at once when idle, on revocation and at a stop):
#: a commit per batch of one or two orders was a request the broker spent CPU on 100 times a second at
#: 150 orders/s. What a crash then delivers again is answered from the outcome records (no second judgement).
COMMIT_EVERY_SECONDS = 0.5
#: How long a revocation waits for the batch in progress to be durable, published and committed.
REVOKE_WAIT_SECONDS = 60.0


def appended_at(msg: Any) -> datetime:
    """When the broker took ``msg`` in (``streams.pipeline.processor.broker_time``)."""
    kind, ms = msg.timestamp()
    return broker_time(msg.topic(), ms / 1000.0 if kind == LOG_APPEND_TIME and ms > 0 else None)


def consumer_config(settings: Settings) -> dict[str, Any]:
    """The input consumer: the worker's group, range assignment (co-partitioning), commits by hand."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.app_id,
        "partition.assignment.strategy": "range",
        "enable.auto.commit": False, "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": settings.fetch_max_wait_ms,
        "session.timeout.ms": int(settings.session_timeout_seconds * 1000),
        "heartbeat.interval.ms": int(settings.heartbeat_seconds * 1000),
        **client_config(),
    }
    member = settings.group_instance_id(settings.web_port)
    if member:
        conf["group.instance.id"] = member  # static membership: a restart takes its partitions straight back
    return conf


class KafkaWorker:
    """The worker's processors over one confluent-kafka consumer; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.suppliers = require_supplier_dea(settings)  # fail closed before anything connects
        bootstrap = settings.kafka_bootstrap
        topics = {part: changelog_topic(settings.app_id, part) for part in PARTS}
        ensure_topics(bootstrap, settings.partitions, [changelog_spec(name) for name in topics.values()])
        self.state_out = Publisher(bootstrap)  # the tables' records: one flush makes a batch's state durable
        self.out = Publisher(bootstrap)  # the processors' outputs, flushed after the state
        self.tables = {part: ChangelogTable(name, settings.partitions, self.state_out) for part, name in topics.items()}
        #: Input partitions this worker owns, per topic; the case processor asks it whose cases to escalate.
        self.assigned: dict[str, set[int]] = {topic: set() for topic in ROUTES}
        #: Table partitions loaded, per processor; those revoked wait in ``_released`` for the next assignment.
        self.restored: dict[str, set[int]] = {part: set() for part in PARTS}
        self._released: dict[str, set[int]] = {part: set() for part in PARTS}
        #: The next offset to commit per input partition: past the last event whose batch was completed.
        self.done: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, int], int] = {}  # confirmed by the broker
        self._asked: dict[tuple[str, int], int] = {}  # the last offset asked for, per partition
        self.procs: dict[str, Processor] = build_processors(  # type: ignore[assignment]
            settings, self.suppliers, self.tables, self.out, self.owns_case,  # type: ignore[arg-type]
            trace_group=f"{settings.app_id}-reference-trace")
        self.consumer = Consumer({**consumer_config(settings), "on_commit": self._on_commit},
                                 logger=logging.getLogger("connectors.kafka.librdkafka"))
        self.poller = ThreadPoolExecutor(1, thread_name_prefix="csos-poll")  # poll and rebalance callbacks
        self._inflight: asyncio.Future[None] | None = None  # the last decided batch still completing
        self._next_commit = 0.0  # when a completed batch's offsets are committed next (monotonic)
        self._idle = threading.Event()  # set when no batch is completing
        self._idle.set()
        self.stopping = False
        self.ready = False
        self.rebalances = 0

    # ------------------------------------------------------------------ ownership and rebalances
    def owns_case(self, order_id: str) -> bool:
        """Whether this worker owns ``order_id``'s case now (only the owner may escalate it)."""
        return key_partition(order_id, self.settings.partitions) in self.assigned[t.HOLD]

    def _by_part(self, partitions: list[TopicPartition]) -> dict[str, set[int]]:
        parts: dict[str, set[int]] = {part: set() for part in PARTS}
        for tp in partitions:
            if tp.topic in ROUTES:
                parts[ROUTES[tp.topic]].add(tp.partition)
        return parts

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Load each newly owned partition's table before any of its input is read; forget those that moved.

        Only input topics are taken: a static member that rejoins under the
        id a Faust worker had may be handed that worker's last assignment
        back, changelog partitions included, until the group rebalances.
        """
        self.rebalances += 1
        foreign = [tp for tp in partitions if tp.topic not in ROUTES]
        if foreign:
            partitions = [tp for tp in partitions if tp.topic in ROUTES]
            log.warning("assigned %d partitions of topics this worker does not read (%s); not consuming them",
                        len(foreign), ", ".join(sorted({tp.topic for tp in foreign})))
        for tp in partitions:
            self.assigned[tp.topic].add(tp.partition)
        read = self._reader()
        for part, wanted in self._by_part(partitions).items():
            table = self.tables[part]
            kept = self._released[part] & wanted  # revoked and handed back: no one else owned it in between
            moved = self._released[part] - wanted
            if moved:
                table.drop(moved)
            self._released[part].clear()
            new = wanted - self.restored[part] - kept
            if new:
                started = time.monotonic()
                keys = table.restore(new, read)
                log.info("%s table: partitions %s restored from %s (%d keys, %.2f s)", part, sorted(new),
                         table.topic, keys, time.monotonic() - started)
            self.restored[part] = set(wanted)
        if foreign:
            consumer.assign(partitions)  # instead of the automatic assign of everything handed over
        self.ready = True

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what was decided on the revoked partitions; keep their tables until the next assignment.

        Called inside the poll, between two batches, but the last decided
        batch may still be on its way (``_complete``, on the event loop, which
        this thread leaves free): wait for it, so that its offsets are
        committed here and none of its state or outputs follows the handover.
        """
        if not self._idle.wait(REVOKE_WAIT_SECONDS):
            log.error("the batch in progress did not complete within %.0f s of a revocation; its inputs will be "
                      "decided again by the next owner", REVOKE_WAIT_SECONDS)
        self._commit([tp for tp in partitions if (tp.topic, tp.partition) in self.done], sync=True)
        self._release(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions lost without a revocation (session expired): others may own them already; forget them now."""
        log.warning("lost partitions %s (this worker's session expired)",
                    ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))
        self._release(partitions)
        for part, gone in self._by_part(partitions).items():
            self.tables[part].drop(gone)
            self.restored[part] -= gone
            self._released[part] -= gone

    def _release(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned.get(tp.topic, set()).discard(tp.partition)
            self.done.pop((tp.topic, tp.partition), None)
            self._asked.pop((tp.topic, tp.partition), None)
        for part, gone in self._by_part(partitions).items():
            self._released[part] |= gone & self.restored[part]
            self.restored[part] -= gone

    def _reader(self) -> Any:
        def read(topic: str, partitions: Any) -> Any:
            return read_to_end(self.settings.kafka_bootstrap, topic, partitions, group=self.settings.app_id)
        return read

    def _commit(self, partitions: list[TopicPartition] | None = None, *, sync: bool = False) -> None:
        """Commit the decided offsets (of ``partitions``, else all) not committed yet.

        Only a commit the broker confirmed counts (``_on_commit``): the
        processors forget the outputs they keep for a redelivery only once
        their input is committed, and an optimistic count would forget them
        for an input that a failed commit leaves to be delivered again.
        """
        keys = [(tp.topic, tp.partition) for tp in partitions] if partitions is not None else list(self.done)
        offsets = [TopicPartition(topic, part, self.done[(topic, part)]) for topic, part in keys
                   if self.done.get((topic, part), -1) != self._asked.get((topic, part))]
        if not offsets:
            return
        self._next_commit = time.monotonic() + COMMIT_EVERY_SECONDS
        try:
            result = self.consumer.commit(offsets=offsets, asynchronous=not sync)
        except KafkaException as exc:  # e.g. no longer a member: the next owner reads these again (outcomes kept)
            log.warning("commit of %d offsets failed: %s", len(offsets), exc)
            return
        for tp in offsets:
            self._asked[(tp.topic, tp.partition)] = tp.offset
        if sync and result:
            self._on_commit(None, result)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The broker's answer to a commit: what it confirmed is committed; a failed one is asked again later."""
        if err is not None:
            log.warning("offset commit failed: %s", err)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if tp.error is None and tp.offset >= 0 and err is None:
                self.committed[key] = max(tp.offset, self.committed.get(key, -1))
            else:
                self._asked.pop(key, None)
        for proc in self.procs.values():
            proc.outcomes.set_committed(self.committed)

    # ------------------------------------------------------------------ the loop
    def _take(self, timeout: float) -> list[Any]:
        """The first ready message (waiting at most ``timeout``), then whatever else is ready, up to a batch."""
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        msgs = [first, *self.consumer.consume(num_messages=self.settings.batch_size - 1, timeout=0)]
        # A rebalance inside these calls may have revoked a partition whose messages were already taken:
        # those are the next owner's to decide (their offsets are not committed here).
        assigned = self.assigned
        return [m for m in msgs if m.error() is not None or m.partition() in assigned.get(m.topic(), ())]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        verify = self.procs["verify"]
        if not await loop.run_in_executor(None, verify.feed.wait_caught_up, 60.0):  # type: ignore[attr-defined]
            log.warning("reference data (CRLs, registrants) not read to the end within 60 s; orders that need "
                        "it are parked until it arrives")
        self.consumer.subscribe(list(ROUTES), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        if self.settings.gc_freeze:
            freeze_startup_heap("kafka worker")
        timers = {"verify": (1.0, 0.0), "cases": (self.settings.case_clock_seconds, 0.0)}
        while not self.stopping:
            now = time.monotonic()
            for part, (every, last) in list(timers.items()):
                if now - last >= every:
                    timers[part] = (every, now)
                    self.procs[part].tick()  # type: ignore[attr-defined]
                    await self._settle_timer(part)
            wait = min(last + every for every, last in timers.values()) - time.monotonic()
            msgs = await loop.run_in_executor(self.poller, self._take, max(0.0, min(wait, 0.2)))
            if self._inflight is not None and self._inflight.done():
                self._inflight.result()  # a batch that could not be made durable or published stops the worker
            if msgs:
                await self._batch(msgs)
            elif self._inflight is None or self._inflight.done():
                self._commit()  # idle: what is decided and delivered is committed now
        if self._inflight is not None:
            await self._inflight
        await loop.run_in_executor(self.poller, self._close)

    def _close(self) -> None:
        self._commit(sync=True)
        self.consumer.close()  # a static member stays in the group until its session lapses: a restart resumes

    async def _settle_timer(self, part: str) -> None:
        """After a timer step (no input to redeliver it): publish its outputs, then write its state.

        Its outputs follow those of the batch still completing, if any (a
        parked order's re-verification after the order's own "pending").
        """
        proc = self.procs[part]
        proc.state.flush()
        if proc.emitter.pending:
            if self._inflight is not None:
                await self._inflight
            await proc.emitter.publish_pending()
        await self.tables[part].write_durable()

    async def _batch(self, msgs: list[Any]) -> None:
        started = time.monotonic()
        by_part: dict[str, list[InputMessage]] = {}
        last: dict[tuple[str, int], int] = {}
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() == KafkaError.INCONSISTENT_GROUP_PROTOCOL:
                    log.warning("the group %s still has members of another runtime (a Faust worker's session); "
                                "joining once they have left or their sessions lapsed", self.settings.app_id)
                else:
                    log.warning("consumer: %s", err)
                continue
            topic = m.topic()
            by_part.setdefault(ROUTES[topic], []).append(  # only the verify agent judges a receipt time
                InputMessage(topic, m.partition(), m.offset(), m.key(), m.value(),
                             appended_at=appended_at(m) if topic == t.RECEIVED else None))
            last[(topic, m.partition())] = m.offset()
        for part in PARTS:
            inputs = by_part.get(part)
            if not inputs:
                continue
            proc = self.procs[part]
            if part == "verify":  # freshness barrier: off the loop (heartbeats are librdkafka's own thread)
                await asyncio.get_running_loop().run_in_executor(None, proc.reference_barrier)  # type: ignore[attr-defined]
            proc.begin_batch()  # the verify agent takes in reference data here: a timer step, settled as one
            await self._settle_timer(part)
            for message in inputs:
                try:
                    proc.handle(message)
                except Exception as exc:  # noqa: BLE001 - one event must not stop the others
                    log.exception("%s: unhandled error on %s[%d]@%d", part, message.topic, message.partition,
                                  message.offset)
                    proc.unhandled(message, exc)
            proc.end_batch()
        for part in by_part:
            self.tables[part].send()  # the state records to the producer; ``_complete`` waits for them
        outputs = [self.procs[part].emitter.take_pending() for part in PARTS if part in by_part]
        if self._inflight is not None:  # at most one batch completing: under load the next one grows instead
            await self._inflight
        self._idle.clear()
        self._inflight = asyncio.ensure_future(self._complete(outputs, last, started, len(msgs)))

    async def _complete(self, outputs: list[Outputs], last: dict[tuple[str, int], int], started: float,
                        events: int) -> None:
        """Steps 2-4 of a decided batch: its state durable, then its outputs, then its offsets.

        Runs while the next batch is polled and decided, so that the round
        trips to the broker overlap the next batch's work instead of adding to
        its wait. The next batch starts completing only once this one has
        (``_batch`` awaits it), and a revocation waits for it (``_on_revoke``):
        a crash at any point leaves what the module docstring says, batch by
        batch. Should a step fail, the worker stops (``run``): nothing of this
        batch or a later one is acknowledged.
        """
        try:
            await self.state_out.flush_async()  # 2. the state durable (this batch's records and any before)
            await publish_outputs(*outputs)  # 3. then the outputs it records
            for (topic, partition), offset in last.items():
                if partition in self.assigned.get(topic, ()):  # lost meanwhile: the new owner reads it again
                    self.done[(topic, partition)] = offset + 1
            if time.monotonic() >= self._next_commit:  # 4. then the inputs (``COMMIT_EVERY_SECONDS``)
                self._commit()
        finally:
            if asyncio.current_task() is self._inflight:
                self._idle.set()
        took = time.monotonic() - started
        if took > self.settings.slow_batch_seconds:
            log.info("slow batch of %d events: %.3f s from its poll to its commit", events, took)

    # ------------------------------------------------------------------ /health and /metrics
    def health(self) -> dict[str, Any]:
        """What ``GET /health`` answers: the Faust worker's fields, plus this runtime's own."""
        counts = {name: proc.counts for name, proc in self.procs.items()} if self.ready else {}
        return {"status": "ok", "counts": counts, "runtime": "kafka",
                "consumer": {"lost_record_repairs": 0, "rebalances": self.rebalances,
                             "assigned": {topic: sorted(p) for topic, p in self.assigned.items() if p}},
                "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                "monitor_build": native.MODE,
                "verification": {"supplier_dea": sorted(self.suppliers),
                                 "receipt_skew_seconds": self.settings.receipt_skew_seconds}}

    async def serve(self) -> web.AppRunner:
        async def health(request: web.Request) -> web.Response:
            return web.json_response(self.health())

        async def metrics(request: web.Request) -> web.Response:
            body, content_type = exposition()
            return web.Response(body=body, headers={"Content-Type": content_type})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.settings.web_port).start()
        set_refreshers(confluent_lag(self.consumer, self.settings.app_id),
                       crl_freshness(lambda: getattr(self.procs["verify"], "verifier", None)))
        return runner


async def _main(settings: Settings) -> None:
    worker = KafkaWorker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(worker, "stopping", True))
    runner = await worker.serve()
    log.info("csos-som worker ready (kafka runtime): broker=%s", settings.kafka_bootstrap)
    try:
        await worker.run()
    finally:
        await runner.cleanup()


def run_kafka_worker(settings: Settings) -> None:
    """Run the worker on the confluent-kafka runtime until SIGTERM or SIGINT (then commit and leave)."""
    asyncio.run(_main(settings))

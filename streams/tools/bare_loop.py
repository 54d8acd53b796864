"""The worker's work without Faust: one confluent-kafka consume -> verify -> monitor -> produce loop.

A yardstick for ``csos bench --compare-bare``, not a worker to deploy: it
measures what the Faust pipeline costs beyond the work itself. The work is
the same: the same processors (``streams.pipeline.agents``: verify, monitor,
cases), the same reference feed and freshness barrier, the same topics
between the stages, and the same state semantics per batch:

1. every event handled (outputs buffered, outcomes recorded in the state);
2. the changed state written to a compacted changelog topic and flushed
   (durable) *before*
3. the outputs are published and flushed; then
4. the input offsets are committed.

What it leaves out is what Faust adds: the conductor and per-agent queues,
the stream and event objects, the aiokafka consumer and changelog producer,
the table machinery and standby replicas, rebalancing and recovery. It takes
every partition of one consumer group and never recovers state (a restart
starts empty), so it must not run against a real deployment.

Run as ``python -m streams.tools.bare_loop`` with the worker's environment;
it writes its counts to ``$CSOS_DATA_DIR/bare-status.json`` every 0.2 s.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, MutableMapping

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.kafka import catalogue as t
from connectors.kafka.emit import Emitter
from connectors.kafka.io import Publisher
from connectors.kafka.security import client_config
from connectors.sources.reference_data import ReferenceFeed, RegistrantDirectory, trace_group_config
from streams.core.config import Settings
from streams.pipeline.agents.cases import CaseProcessor
from streams.pipeline.agents.monitor import MonitorProcessor
from streams.pipeline.agents.verify import VerifyProcessor
from streams.pipeline.app import require_supplier_dea
from streams.pipeline.event_loop import use_event_loop
from streams.pipeline.outcomes import OutcomeBook
from streams.pipeline.processor import InputMessage, Processor

log = logging.getLogger(__name__)

#: Which processor takes which input topic (as the Faust agents do).
ROUTES = {t.RECEIVED: "verify", t.VERIFIED: "monitor", t.CLEARED: "monitor", t.HOLD: "cases", t.DECISIONS: "cases"}
STATUS_FILE = "bare-status.json"


class ChangelogTable(MutableMapping[bytes, bytes]):
    """A dict whose changes go to a compacted topic at ``write_durable`` (flushed: on the broker when it returns)."""

    def __init__(self, publisher: Publisher, topic: str) -> None:
        self.publisher = publisher
        self.topic = topic
        self.data: dict[bytes, bytes] = {}
        self._unsent: dict[bytes, bytes | None] = {}

    def __getitem__(self, key: bytes) -> bytes:
        return self.data[key]

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.data[key] = value
        self._unsent[key] = value

    def __delitem__(self, key: bytes) -> None:
        del self.data[key]
        self._unsent[key] = None

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def send(self) -> int:
        """Produce every changed key's record (the caller flushes the shared publisher)."""
        unsent, self._unsent = self._unsent, {}
        for key, value in unsent.items():
            self.publisher.publish(self.topic, key, value)  # type: ignore[arg-type] - None: a tombstone
        return len(unsent)


def _create_changelogs(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, **client_config()})
    futures = admin.create_topics([NewTopic(n, partitions, 1, config={"cleanup.policy": "compact"}) for n in names])
    for name, fut in futures.items():
        try:
            fut.result(30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def _appended_at(msg: Any) -> datetime | None:
    kind, ms = msg.timestamp()
    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc) if kind == 2 and ms > 0 else None  # LogAppendTime


class BareLoop:
    """The three processors over one consumer; see the module docstring for the order of a batch."""

    def __init__(self, settings: Settings) -> None:
        from streams.domain.products import ProductMaster
        from streams.monitoring.monitor import Monitor
        from streams.verification import Verifier

        self.settings = settings
        bootstrap = settings.kafka_bootstrap
        suppliers = require_supplier_dea(settings)
        self.out = Publisher(bootstrap)
        self.state_out = Publisher(bootstrap)
        names = {s: f"{settings.app_id}-bare-{s}-changelog" for s in ("verify", "monitor", "cases")}
        _create_changelogs(bootstrap, list(names.values()), settings.partitions)
        self.tables = {s: ChangelogTable(self.state_out, n) for s, n in names.items()}
        book = lambda: OutcomeBook(timedelta(days=settings.dedup_days))  # noqa: E731
        products = ProductMaster.load(settings.products_path)
        self.feed = ReferenceFeed(bootstrap, emitter=Emitter(Publisher(bootstrap), "reference-feed"),
                                  trace_group=f"{settings.app_id}-bare-reference-trace",
                                  trace_config=trace_group_config(settings))
        self.feed.start()
        self.procs: dict[str, Processor] = {
            "verify": VerifyProcessor(
                Verifier.from_pki_dir(settings.pki_dir, products), products,
                Emitter(self.out, "verify-agent", buffered=True), self.tables["verify"],
                RegistrantDirectory() if settings.require_registration else None, self.feed, suppliers=suppliers,
                receipt_skew=timedelta(seconds=settings.receipt_skew_seconds), outcomes=book(),
                barrier_seconds=settings.reference_barrier_seconds),
            "monitor": MonitorProcessor(Monitor.from_env(), self.tables["monitor"],
                                        Emitter(self.out, "monitor-agent", buffered=True), outcomes=book()),
            "cases": CaseProcessor(self.tables["cases"], Emitter(self.out, "case-agent", buffered=True),
                                   due_days=settings.due_diligence_days, reporting_dea=settings.reporting_dea,
                                   retention_days=settings.case_retention_days, outcomes=book()),
        }
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"{settings.app_id}-bare",
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
            "fetch.wait.max.ms": settings.fetch_max_wait_ms, **client_config(),
        })
        self.consumer.subscribe(list(ROUTES))
        self.committed: dict[tuple[str, int], int] = {}
        self.stopping = False

    def decided(self) -> int:
        """Orders given an outcome: rejected or dead-lettered by verification, released or held by the monitor."""
        v, m = self.procs["verify"].counts, self.procs["monitor"].counts
        return v["rejected"] + v["dead_lettered"] + m["released"] + m["held"]

    async def run(self, status: Path) -> None:
        if not self.feed.wait_caught_up(60.0):
            log.warning("reference data not read to the end within 60 s")
        ticks = {"verify": 0.0, "cases": 0.0}
        next_status = 0.0
        while not self.stopping:
            msgs = self.consumer.consume(num_messages=self.settings.batch_size, timeout=0.1)
            now = time.monotonic()
            for stage, every in (("verify", 1.0), ("cases", self.settings.case_clock_seconds)):
                if now - ticks[stage] >= every:  # the worker's timers: reference data, the due-diligence clock
                    ticks[stage] = now
                    self.procs[stage].tick()  # type: ignore[attr-defined]
                    await self._settle_timer(stage)
            if msgs:
                await self._batch(msgs)
            if now >= next_status:
                next_status = now + 0.2
                status.write_text(json.dumps({"ready": True, "decided": self.decided(),
                                              "counts": {s: p.counts for s, p in self.procs.items()}}))

    async def _settle_timer(self, stage: str) -> None:
        """A timer step: outputs first, then state (as ``streams.pipeline.app.settle_timer_step``)."""
        proc = self.procs[stage]
        proc.state.flush()
        await proc.emitter.publish_pending()
        if self.tables[stage].send():
            self.state_out.flush()

    async def _batch(self, msgs: list[Any]) -> None:
        by_stage: dict[str, list[InputMessage]] = {}
        last: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(m.error())
            by_stage.setdefault(ROUTES[m.topic()], []).append(
                InputMessage(m.topic(), m.partition(), m.offset(), m.key(), m.value(), appended_at=_appended_at(m)))
            last[(m.topic(), m.partition())] = m.offset()
        for stage, inputs in by_stage.items():
            proc = self.procs[stage]
            if stage == "verify":
                proc.reference_barrier()  # type: ignore[attr-defined]
            proc.begin_batch()
            await self._settle_timer(stage)
            for message in inputs:
                try:
                    proc.handle(message)
                except Exception as exc:  # noqa: BLE001 - as the worker: one event must not stop the others
                    proc.unhandled(message, exc)
            proc.end_batch()
        if sum(table.send() for table in self.tables.values()):
            self.state_out.flush()  # 2. state durable
        for stage in by_stage:
            await self.procs[stage].emitter.publish_pending()  # 3. then the outputs it records
        offsets = [TopicPartition(topic, part, off + 1) for (topic, part), off in last.items()]
        self.consumer.commit(offsets=offsets, asynchronous=True)  # 4. then the inputs
        self.committed.update({(o.topic, o.partition): o.offset for o in offsets})
        for proc in self.procs.values():
            proc.outcomes.set_committed(self.committed)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    settings = Settings.from_env()
    use_event_loop(settings.event_loop)  # the worker's loop, so that the comparison is of the framework alone
    status = settings.data_dir / STATUS_FILE
    status.unlink(missing_ok=True)
    loop = BareLoop(settings)

    def stop(*_: Any) -> None:
        loop.stopping = True
    signal.signal(signal.SIGTERM, stop)
    try:
        asyncio.run(loop.run(status))
    finally:
        loop.consumer.close()
        os._exit(0)  # the reference feed's thread is a daemon of no further use


if __name__ == "__main__":
    main()

"""The Faust application: topics, the state table and the agents, wired from settings.

Transport (Faust/aiokafka in, confluent-kafka out), serialization (Avro
single-object, ``streams.avro_codec``) and processing (the processors in
``streams.agents``) are kept apart, as in quix-streams and bytewax: Faust
hands raw bytes to a processor, which decodes, decides and emits.

Delivery is at-least-once. Each agent takes a batch of events
(``take_events``), processes it, and flushes the producer before the batch is
acknowledged, so an output is never lost; a crash may repeat a batch, and
every consumer (ClickHouse sink, warehouse) is idempotent on order id.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
import faust.web

from connectors.clickhouse_sink import ClickHouseSink, apply_ddl, open_client, to_json_rows
from connectors.kafka_io import Publisher
from connectors.topics import replication_factor

from . import topic_names as t
from .agents.monitor import MonitorProcessor
from .agents.sink import SinkProcessor
from .agents.verify import VerifyProcessor
from .config import Settings
from .emit import Emitter

log = logging.getLogger(__name__)

STATE_TABLE = "som-registrant-state"


def _raw_topic(app: faust.App, *names: str) -> Any:
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


def _event_tuple(event: Any) -> tuple[str, int, int, bytes | None, bytes]:
    m = event.message
    return m.topic, m.partition, m.offset, m.key, m.value


def create_app(settings: Settings, *, run_sink: bool = True) -> faust.App:
    """Build the worker app. Heavy components (PKI, product master, ClickHouse) load on start."""
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
        # Raw bytes everywhere: agents decode Avro themselves so that a bad
        # message becomes a dead letter instead of a Faust decode crash.
        key_serializer="raw",
        value_serializer="raw",
    )
    received = _raw_topic(app, t.RECEIVED)
    verified = _raw_topic(app, t.VERIFIED)
    sink_topics = _raw_topic(app, *t.SINK_TOPICS)
    state_table = app.Table(
        STATE_TABLE, default=None, key_type=bytes, value_type=bytes,
        partitions=settings.partitions,
        # Changelog writes go to the key's partition by murmur2, the same
        # partitioner every producer of csos.orders.verified uses, so state
        # and orders stay co-partitioned even when a batch spans partitions.
        use_partitioner=True,
    )
    parts: dict[str, Any] = {}

    @app.task(on_leader=False)
    async def _ready() -> None:
        log.info("csos-som worker ready: broker=%s clickhouse=%s", settings.kafka_bootstrap,
                 settings.effective_clickhouse_url if run_sink else "(sink disabled)")

    def components() -> dict[str, Any]:
        if not parts:
            from .monitoring.monitor import Monitor
            from .products import ProductMaster
            from .verification import Verifier

            products = ProductMaster.load(settings.products_path)
            publisher = Publisher(settings.kafka_bootstrap)
            parts["publisher"] = publisher
            parts["verify"] = VerifyProcessor(Verifier.from_pki_dir(settings.pki_dir, products), products,
                                              Emitter(publisher, "verify-agent"))
            parts["monitor"] = MonitorProcessor(Monitor.from_env(), state_table, Emitter(publisher, "monitor-agent"))
            if run_sink:
                client = open_client(settings)
                apply_ddl(client)
                parts["sink"] = SinkProcessor(ClickHouseSink(client), Emitter(publisher, "sink-agent"))
        return parts

    @app.agent(received)
    async def verify_agent(stream: Any) -> None:
        proc: VerifyProcessor = components()["verify"]
        async for events in stream.take_events(settings.batch_size, within=settings.batch_seconds):
            for event in events:
                proc.handle(*_event_tuple(event))
            await proc.emitter.flush()

    @app.agent(verified)
    async def monitor_agent(stream: Any) -> None:
        proc: MonitorProcessor = components()["monitor"]
        async for events in stream.take_events(settings.batch_size, within=settings.batch_seconds):
            for event in events:
                proc.handle(*_event_tuple(event))
            proc.flush_state()
            await proc.emitter.flush()

    if run_sink:
        @app.agent(sink_topics)
        async def sink_agent(stream: Any) -> None:
            proc: SinkProcessor = components()["sink"]
            loop = asyncio.get_running_loop()
            async for events in stream.take_events(settings.sink_batch_size, within=settings.sink_batch_seconds):
                records = proc.decode_batch([_event_tuple(e) for e in events])
                await proc.emitter.flush()
                delay = 0.5
                while True:  # ClickHouse down must not lose rows: retry the same batch (same dedup token)
                    try:
                        await loop.run_in_executor(proc.executor, proc.write, records)
                        break
                    except Exception as exc:  # noqa: BLE001
                        log.warning("ClickHouse insert failed, retrying in %.1fs: %s", delay, exc)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 30.0)

        @app.page("/sql")
        class SqlView(faust.web.View):
            """Read-only SQL for analysts while this process owns the embedded store."""

            async def get(self, request: Any) -> Any:
                return await self._run(request.query.get("q", ""))

            async def post(self, request: Any) -> Any:
                return await self._run(request.query.get("q") or await request.text())

            async def _run(self, sql: str) -> Any:
                if not sql.strip():
                    return self.json({"error": "pass the query as ?q= or as the request body"}, status=400)
                proc: SinkProcessor = components()["sink"]
                loop = asyncio.get_running_loop()
                try:
                    columns, rows = await loop.run_in_executor(proc.executor, proc.query, sql)
                except Exception as exc:  # noqa: BLE001
                    return self.json({"error": str(exc).strip().splitlines()[0][:500]}, status=400)
                return self.bytes(to_json_rows(columns, rows).encode(), content_type="application/json")

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        counts = {name: getattr(p, "counts", None) for name, p in parts.items() if hasattr(p, "counts")}
        if "sink" in parts:
            counts["sink"] = dict(parts["sink"].sink.rows_written)
        return web.json({"status": "ok", "counts": counts})

    app.csos_components = components  # type: ignore[attr-defined]
    return app

"""The ClickHouse sink as its own process: topics -> batched, idempotent inserts.

Why a separate process and not a Faust agent in the worker: the sink reads
five topics (every order's audit trail among them), about five messages per
order, and inserting into the embedded engine costs CPU too. In its own
process, with confluent-kafka's batch consumer, it leaves the worker's core
to verification and monitoring (the GIL would otherwise serialize them).

At-least-once: offsets are committed only after the batch is in ClickHouse;
an insert that failed for an outage (connection, timeout, server unavailable)
is retried with the same deduplication token and back-off, and nothing is
acknowledged meanwhile. No input can stop the sink: a message whose values its
columns cannot hold is dead-lettered before any insert, and a batch that
ClickHouse refuses for its data is bisected until the messages it refuses are
isolated and dead-lettered; the rest is written (``ClickHouseSink.write``).

The embedded engine admits one process per data directory, so this process
also serves read-only SQL on 127.0.0.1 (``POST /sql`` with a bearer token, see
:func:`serve_http`) for ``csos sql`` and the demo while it runs.
"""
from __future__ import annotations

import gc
import hmac
import json
import logging
import os
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from confluent_kafka import Consumer, KafkaError

from connectors.kafka import catalogue as t

from streams.core.avro_codec import AvroCodec, DecodeError, default_codec
from streams.core.config import Settings
from connectors.kafka.emit import Emitter, dead_letter_id
from connectors.kafka import metrics
from connectors.clickhouse.query import sink_token_path

from connectors.clickhouse.audit_chain import sink_key
from connectors.clickhouse.progress import Extent, extent_of
from connectors.clickhouse.rows import checked_rows
from connectors.clickhouse.sink import ClickHouseSink, SourceRecord, to_json_rows
from connectors.clickhouse.client import apply_ddl, open_client, run_readonly_query
from connectors.clickhouse.column_types import RowRejected
from connectors.kafka.io import Publisher
from connectors.kafka.ranges import RangeUnavailable, read_ranges
from connectors.kafka.security import client_config

log = logging.getLogger(__name__)
STAGE = "sink"

#: The topics the sink stores and the Avro record each carries: the catalogue's ``sunk`` topics.
EXPECTED = t.sunk_topics()
#: Topics whose undecodable messages the sink logs and skips instead of dead-lettering: the dead-letter
#: topic itself, the received topic, whose unreadable messages the verify agent already dead-letters
#: (their bytes are then in ``dead_letters``), and the CRL topic, whose unreadable messages the workers'
#: reference feed traces once; a second dead letter would count them twice.
NOT_DEAD_LETTERED = frozenset({t.DLQ, t.RECEIVED, t.CRL})


def read_record(codec: AvroCodec, value: bytes | None, expect: str | None) -> tuple[str, dict[str, Any]]:
    """(schema name, record) of one message, as ``AvroCodec.decode`` reads it but without its range check.

    Why: the range check (over the whole record, when fastavro had to read it)
    is not needed here: every value the sink stores is checked against its
    ClickHouse column's type before insert (``checked_rows``: 2^40 in a
    ``UInt32`` is dead-lettered naming the column), and values it does not
    store cannot harm it. The record is read by the schema's generated reader
    (``streams.core.avro_read``), which reads the sink's messages in about
    two thirds of fastavro's time, with the same values.
    """
    return codec.decode(value, expect, range_check=False)  # type: ignore[arg-type]


def static_member(instance_id: str | None) -> dict[str, str]:
    """librdkafka's ``group.instance.id`` when static membership is on (issue 10), else nothing."""
    return {"group.instance.id": instance_id} if instance_id else {}



#: Bytes the sink's fetch waits for at the broker (or CSOS_SINK_BATCH_SECONDS, whichever comes first).
SINK_FETCH_MIN_BYTES = 1 << 20


def sink_fetch_config(settings: Settings) -> dict[str, int]:
    """librdkafka fetch settings that let the broker gather a batch instead of answering every new record.

    Why: with librdkafka's defaults (``fetch.min.bytes`` 1) the broker answers
    the sink's fetch as soon as any of its ~40 partitions gets a record, so at
    30 orders/s the sink sent ~60 fetches a second, a quarter of all
    requests the broker served (``streams.tools.broker_requests``, issue 14).
    The sink writes ClickHouse in windows of ``sink_batch_seconds`` anyway, so
    the broker may hold the fetch that long (or until 1 MiB is waiting): rows
    reach ClickHouse at most one window later; a busy stream still fills
    fetches at once.
    """
    return {"fetch.min.bytes": SINK_FETCH_MIN_BYTES,
            "fetch.wait.max.ms": max(1, int(settings.sink_batch_seconds * 1000))}

class SinkService:
    def __init__(self, settings: Settings, codec: AvroCodec | None = None) -> None:
        self.settings = settings
        self.codec = codec or default_codec()
        self.audit_key = sink_key(settings)  # a malformed CSOS_AUDIT_KEY stops the sink before it writes anything
        self.client = open_client(settings)
        apply_ddl(self.client)
        self.sink = ClickHouseSink(self.client, self.audit_key)
        self.lock = threading.Lock()  # one thread at a time in the ClickHouse client
        self.reader = open_client(settings, readonly=True)  # analysts' session, separate and read-only
        self.reader_lock = threading.Lock()
        self.emitter = Emitter(Publisher(settings.kafka_bootstrap), "clickhouse-sink")
        self.group = f"{settings.app_id}-clickhouse-sink"
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": self.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            **sink_fetch_config(settings),
            # Fast recovery (issue 10): a restarted sink rejoins under the same static id and gets its
            # partitions back at once; a dead one's move to another sink after the session timeout.
            **static_member(settings.group_instance_id(settings.sink_port)),
            "session.timeout.ms": int(settings.session_timeout_seconds * 1000),
            "heartbeat.interval.ms": int(settings.heartbeat_seconds * 1000),
            **client_config(),
        }, logger=logging.getLogger("streams.pipeline.sink_service.librdkafka"))
        self.stopping = threading.Event()
        self.dead_lettered = 0
        self.batches = 0
        #: Batches written again exactly after a sink died in their middle (``replay_open_batches``).
        self.replayed_batches = 0
        #: The partitions this sink was last assigned, and whether a replay is due since.
        self.assigned: set[tuple[str, int]] = set()
        self.replay_due = False

    def decode(self, messages: list[Any]) -> list[SourceRecord]:
        records = []
        for m in messages:
            topic, value = m.topic(), m.value()
            try:
                name, rec = read_record(self.codec, value, EXPECTED.get(topic))
            except DecodeError as exc:
                if topic == t.RECEIVED:
                    log.warning("not archived: undecodable message on %s[%d]@%d (the verify agent "
                                "dead-letters it): %s", topic, m.partition(), m.offset(), exc)
                elif topic in NOT_DEAD_LETTERED:  # never dead-letter the dead-letter topic into itself
                    log.error("undecodable message on %s[%d]@%d: %s", topic, m.partition(), m.offset(), exc)
                else:
                    self.dead_lettered += 1
                    self.emitter.dead_letter(STAGE, topic, m.partition(), m.offset(), m.key(), value or b"",
                                             f"sink cannot decode: {exc}",
                                             dead_letter_id=dead_letter_id(topic, m.partition(), m.offset()))
                continue
            try:  # a record the tables cannot take must not block the batch behind it forever
                rows = checked_rows(name, rec)  # mapped once: archiving parses each order's CMS
            except RowRejected as exc:  # a value its column cannot hold: name the column and the value
                self.refuse(SourceRecord(topic, m.partition(), m.offset(), name, rec, None, m.key(), value or b""),
                            f"sink cannot write {name}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001
                self.refuse(SourceRecord(topic, m.partition(), m.offset(), name, rec, None, m.key(), value or b""),
                            f"sink cannot map {name} to rows: {exc.__class__.__name__}: {exc}")
                continue
            records.append(SourceRecord(topic, m.partition(), m.offset(), name, rec, rows, m.key(), value or b""))
        return records

    def refuse(self, record: SourceRecord, reason: str) -> None:
        """Dead-letter a message the tables cannot take (the emitter audits it too).

        A dead letter the sink itself wrote about the dead-letter topic is only
        logged: dead-lettering it again could go on forever (it stays on the topic).
        """
        if record.topic == t.DLQ and record.record.get("source_topic") == t.DLQ:
            log.error("dead letter %s[%d]@%d not stored, not dead-lettered again: %s",
                      record.topic, record.partition, record.offset, reason)
            return
        self.dead_lettered += 1
        self.emitter.dead_letter(STAGE, record.topic, record.partition, record.offset, record.key,
                                 record.payload, reason,  # the same id if a replayed batch refuses it again
                                 dead_letter_id=dead_letter_id(record.topic, record.partition, record.offset))

    def write(self, records: list[SourceRecord], extent: Extent | None = None) -> None:
        """Write a batch; retry outages with back-off; dead-letter what ClickHouse refuses for its data.

        ``extent``: the offsets the batch was read from (``ClickHouseSink.write``)."""
        refused: set[tuple[str, int, int]] = set()

        def reject(record: SourceRecord, exc: Exception) -> None:
            where = (record.topic, record.partition, record.offset)
            if where not in refused:  # an outage mid-batch repeats the bisection: one dead letter each
                first_line = (str(exc).strip().splitlines() or [""])[0]
                self.refuse(record, f"ClickHouse refused {record.schema}: {exc.__class__.__name__}: "
                                    f"{first_line[:1000]}")
                refused.add(where)  # only once sent: a dead letter that failed is sent on the retry

        delay = 0.5
        while not self.stopping.is_set():
            try:
                with self.lock:
                    started = time.monotonic()
                    written = self.sink.write(records, reject=reject, extent=extent)
                metrics.observe_sink_write(written, time.monotonic() - started)
                return
            except Exception as exc:  # noqa: BLE001 - ClickHouse down: keep the batch, retry
                log.warning("ClickHouse insert failed, retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise RuntimeError("stopped before the batch was written; it will be re-read")

    def handle_batch(self, messages: list[Any]) -> None:
        """Store a batch of messages (each dead-lettered instead if it cannot be): all done when it returns.

        Python's cyclic garbage collector is paused meanwhile: a batch holds some hundred thousand decoded
        objects, and the collections their allocation triggers walked them all again and again (10-20 % of
        the sink's CPU in ``csos bench-sink``); they hold no reference cycles, so reference counting frees them.
        """
        paused = gc.isenabled()
        gc.disable()
        try:
            # Stored before a crash but not committed: not decoded, archived or dead-lettered again.
            fresh = [m for m in messages if m.offset() > self.sink.progress.stored_offset(m.topic(), m.partition())]
            records = self.decode(fresh)
            self.emitter.publisher.flush()  # dead letters durable before their offsets are committed
            if fresh:
                # The offsets as fetched, dead-lettered ones included: what a replay reads back and decodes again.
                self.write(records, extent_of((m.topic(), m.partition(), m.offset()) for m in fresh))
                self.emitter.publisher.flush()  # and those of rows ClickHouse refused
        finally:
            if paused:
                gc.enable()

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Partitions (re)assigned: re-read what is stored, and drop progress a re-created topic left behind
        (``SinkProgress.drop_beyond``), so that none of its messages is skipped as stored."""
        self.sink.forget()
        for tp in partitions:
            try:
                _low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            except Exception as exc:  # noqa: BLE001 - broker slow: keep the progress (at worst a re-read later)
                log.warning("end offset of %s[%d] unknown (%s); its stored progress is kept", tp.topic,
                            tp.partition, exc)
                continue
            self.sink.progress.drop_beyond(tp.topic, tp.partition, high)
        self.assigned = {(tp.topic, tp.partition) for tp in partitions}
        self.replay_due = True  # in the loop, before any message of the new assignment is written

    def replay_open_batches(self) -> int:
        """Write again, exactly, each batch a sink died in the middle of; return how many.

        A batch is recorded before its first insert (``sink_batches``) and
        marked stored after its last (``sink_progress``). One begun and not
        stored was cut short: some tables have its rows, others not. Its offsets
        are read back from Kafka and written as the same batch, so every insert
        repeats its deduplication token and the copies are dropped, in the
        tables and in the dashboards' aggregates alike. Only a batch whose
        partitions are all this sink's is replayed (one sink writes a partition
        at a time), and one with none of them is another sink's to replay; one
        that cannot be (split between sinks, or its messages gone) is logged and
        counted, and its messages are stored as Kafka delivers them:
        nothing is lost, the aggregates may count what was written before the
        crash twice.
        """
        replayed = 0
        for batch in self.sink.progress.open_batches():
            if not set(batch.extent) & self.assigned:
                continue  # none of its partitions is this sink's: the sink given them replays it
            if not batch.complete or not set(batch.extent) <= self.assigned:
                log.warning("batch %s was cut short, but %s: it is not replayed here", batch.batch_id,
                            "a later batch overwrote part of its record" if not batch.complete
                            else "not all of its partitions are assigned to this sink")
                metrics.SINK_REPLAYS.labels("not_replayable").inc()
                continue
            try:
                messages = self.read_back(batch.extent)
            except RangeUnavailable as exc:
                log.error("batch %s was cut short and cannot be read back (%s): its messages are stored as "
                          "Kafka delivers them; the dashboards' aggregates may count some twice", batch.batch_id, exc)
                metrics.SINK_REPLAYS.labels("not_replayable").inc()
                continue
            log.warning("batch %s was cut short by a crash: writing its %d messages again", batch.batch_id,
                        len(messages))
            self.handle_batch(messages)
            metrics.SINK_REPLAYS.labels("replayed").inc()
            replayed += 1
        self.replayed_batches += replayed
        return replayed

    def read_back(self, extent: Extent) -> list[Any]:
        """The messages of ``extent``, read from Kafka (``connectors.kafka.ranges``)."""
        return read_ranges(self.settings.kafka_bootstrap, extent, group=self.group, stop=self.stopping)

    def run(self) -> None:
        # Another sink may have written a partition while it owned it: re-read the chain heads and stored offsets.
        self.consumer.subscribe(list(EXPECTED), on_assign=self._on_assign)
        lag = metrics.Every(1.0, metrics.confluent_lag(self.consumer, self.group))
        try:
            while not self.stopping.is_set():
                messages = self.consumer.consume(self.settings.sink_batch_size, self.settings.sink_batch_seconds)
                lag()  # in this thread: the consumer's position, at most once a second
                if self.replay_due:  # partitions (re)assigned during that consume: a cut-short batch goes first
                    self.replay_due = False
                    self.replay_open_batches()
                good = []
                for m in messages:
                    if m.error():
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", m.error())
                        continue
                    good.append(m)
                if not good:
                    continue
                metrics.SINK_BATCH.observe(len(good))
                self.handle_batch(good)
                self.consumer.commit(asynchronous=False)
                self.batches += 1
        finally:
            self.consumer.close()

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        with self.reader_lock:
            return run_readonly_query(self.reader, sql)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "rows_written": dict(self.sink.rows_written), "batches": self.batches,
                "dead_lettered": self.dead_lettered, "replayed_batches": self.replayed_batches}


#: Largest /sql request body accepted: far above any real query, far below what would hurt the sink.
MAX_SQL_BODY = 1_000_000


def ensure_sink_token(settings: Settings) -> str:
    """The bearer token that /sql requires: ``CSOS_SQL_TOKEN``, else a fresh random one per start.

    A generated token is written to ``$CSOS_DATA_DIR/sink-token`` with mode 0600 (created so, then
    renamed into place, so no reader ever sees a partial or world-readable file): ``csos sql`` run by
    the same OS user reads it there; other local users and web pages cannot. A token given in the
    environment is not copied to disk, and a stale generated file is removed so that clients are not
    misled by it.
    """
    path = sink_token_path(settings)
    if settings.sql_token:
        path.unlink(missing_ok=True)
        return settings.sql_token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def serve_http(service: Any, port: int, token: str) -> ThreadingHTTPServer:
    """Read-only SQL (``POST /sql``, bearer token) and health on 127.0.0.1 while this process owns the store.

    ``service`` needs ``query(sql)`` and ``health()``. Why each check: the token keeps other local
    users and processes out; the Host check stops DNS rebinding (a web page whose name resolves to
    127.0.0.1 would otherwise be same-origin with this port); the Origin check and POST-only stop a
    browser page from sending queries (GET CSRF); the body limit and the engine's limits stop one
    request from exhausting the sink. The SQL itself is then checked by ``run_readonly_query``.
    """
    if not token:
        raise ValueError("the /sql endpoint needs a token")
    expected_auth = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # seconds a client may take to send its request (a stalled one holds a thread)

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: access logs go to debug
            log.debug(fmt, *args)

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, {"error": message}, headers)

        def _local_origin_refusal(self) -> str | None:
            """Why this request is not from a local client of this port (None if it is)."""
            bound = self.server.server_address[1]
            local = {f"127.0.0.1:{bound}", f"localhost:{bound}"}
            host = (self.headers.get("Host") or "").strip().lower()
            if host not in local:
                return f"Host {host or '(none)'!r} refused: use http://127.0.0.1:{bound}"
            origin = self.headers.get("Origin")
            if origin is not None and origin.strip().lower() not in {f"http://{h}" for h in local}:
                return f"cross-origin request from {origin!r} refused"
            return None

        def _authorized(self) -> bool:
            given = (self.headers.get("Authorization") or "").strip().encode()
            return hmac.compare_digest(given, expected_auth)

        def do_GET(self) -> None:  # noqa: N802
            refusal = self._local_origin_refusal()
            path = urlparse(self.path).path
            if refusal:
                self._error(403, refusal)
            elif path == "/health":
                self._send(200, service.health())
            elif path == "/metrics":  # Prometheus (connectors.kafka.metrics); the Host check above applies
                body, content_type = metrics.exposition()
                self._send(200, body, content_type=content_type)
            elif path == "/sql":
                self._error(405, "POST the query as the request body (with Authorization: Bearer <token>)",
                            {"Allow": "POST"})
            else:
                self._error(404, "not found")

        def do_POST(self) -> None:  # noqa: N802
            refusal = self._local_origin_refusal()
            if refusal:
                self._error(403, refusal)
            elif urlparse(self.path).path != "/sql":
                self._error(404, "not found")
            elif not self._authorized():
                self._error(401, "missing or wrong token: send Authorization: Bearer <token> (CSOS_SQL_TOKEN, "
                                 "or the sink-token file in the data directory)", {"WWW-Authenticate": "Bearer"})
            else:
                self._sql()

        def _sql(self) -> None:
            if self.headers.get("Transfer-Encoding"):
                self._error(411, "send the query with a Content-Length, not chunked")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_SQL_BODY:
                self._error(413, f"the query must be at most {MAX_SQL_BODY} bytes")
                return
            sql = self.rfile.read(length).decode("utf-8", errors="replace")
            if not sql.strip():
                self._error(400, "send the query as the request body")
                return
            try:
                columns, rows = service.query(sql)
            except Exception as exc:  # noqa: BLE001 - refused or failed query: the client shows the reason
                self._error(400, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500])
                return
            self._send(200, to_json_rows(columns, rows).encode())

        def _method_not_allowed(self) -> None:
            self._error(405, "only GET /health and POST /sql", {"Allow": "GET, POST"})

        do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="sink-http", daemon=True).start()
    return server


def run_sink(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM."""
    import signal

    service = SinkService(settings)
    server = serve_http(service, settings.sink_port, ensure_sink_token(settings))
    metrics.set_refreshers()  # the sink's lag is refreshed from its consume loop (SinkService.run)
    metrics.serve_extra(settings.metrics_addr)
    signal.signal(signal.SIGTERM, lambda *_: service.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: service.stopping.set())
    log.warning("ClickHouse sink ready: %s, SQL on 127.0.0.1:%d, audit chain sealed with %s",
                settings.effective_clickhouse_url, settings.sink_port,
                f"HMAC-SHA256, key id {service.audit_key.key_id}" if service.audit_key else "SHA-256 (no CSOS_AUDIT_KEY)")
    try:
        service.run()
    finally:
        server.shutdown()
        service.client.close()

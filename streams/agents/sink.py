"""ClickHouse sink agent: decoded topic records -> batched, idempotent inserts."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from connectors.clickhouse_sink import ClickHouseSink, SourceRecord

from .. import topic_names as t
from ..avro_codec import AvroCodec, DecodeError, default_codec
from ..emit import Emitter

log = logging.getLogger(__name__)
STAGE = "sink"

EXPECTED = {
    t.VERIFIED: "csos.orders.VerifiedOrder",
    t.REJECTED: "csos.orders.Rejection",
    t.VERDICTS: "som.Verdict",
    t.AUDIT: "audit.AuditEvent",
    t.DLQ: "dlq.DeadLetter",
}


class SinkProcessor:
    """Owns the ClickHouse client and the one thread allowed to use it."""

    def __init__(self, sink: ClickHouseSink, emitter: Emitter, codec: AvroCodec | None = None) -> None:
        self.sink = sink
        self.emitter = emitter
        self.codec = codec or default_codec()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")

    def decode_batch(self, events: list[tuple[str, int, int, bytes | None, bytes]]) -> list[SourceRecord]:
        records = []
        for topic, partition, offset, key, value in events:
            expect = EXPECTED.get(topic)
            try:
                name, rec = self.codec.decode(value, expect=expect)
            except DecodeError as exc:
                if topic == t.DLQ:  # never dead-letter the dead-letter topic into itself
                    log.error("undecodable message on %s[%d]@%d: %s", topic, partition, offset, exc)
                else:
                    self.emitter.dead_letter(STAGE, topic, partition, offset, key, value, f"sink cannot decode: {exc}")
                continue
            records.append(SourceRecord(topic, partition, offset, name, rec))
        return records

    def write(self, records: list[SourceRecord]) -> dict[str, int]:
        return self.sink.write(records)

    def query(self, sql: str) -> Any:
        from connectors.clickhouse_sink import run_readonly_query
        return run_readonly_query(self.sink.client, sql)

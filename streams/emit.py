"""What agents write: typed outputs, audit events and dead letters.

Agents never build wire bytes themselves; they call an ``Emitter`` so that
every output is Avro with the right schema, every step leaves an audit event,
and nothing is acknowledged on input before its outputs are flushed.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from connectors.kafka_io import Publisher

from . import topic_names as t
from .avro_codec import AvroCodec, DecodeError, default_codec


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Emitter:
    def __init__(self, publisher: Publisher, actor: str, codec: AvroCodec | None = None) -> None:
        self.publisher = publisher
        self.actor = actor
        self.codec = codec or default_codec()

    def send(self, topic: str, schema: str, key: str | bytes | None, record: dict[str, Any]) -> None:
        self.publisher.publish(topic, key, self.codec.encode(schema, record))

    def audit(self, stage: str, action: str, outcome: str, *, order_id: str | None = None,
              purchaser_dea: str | None = None, detail: dict[str, Any] | None = None,
              at: datetime | None = None, actor: str | None = None) -> None:
        """Record one step; ``actor`` names the person who took it when it is not this service (an analyst)."""
        event = {
            "event_id": str(uuid.uuid4()),
            "occurred_at": at or utcnow(),
            "stage": stage,
            "action": action,
            "order_id": order_id,
            "purchaser_dea": purchaser_dea,
            "outcome": outcome,
            "detail": json.dumps(detail or {}, sort_keys=True, default=str),
            "actor": actor or self.actor,
        }
        self.send(t.AUDIT, "audit.AuditEvent", order_id or event["event_id"], event)

    def decode_or_dead_letter(self, stage: str, expect: str, topic: str, partition: int, offset: int,
                              key: bytes | None, value: bytes) -> dict[str, Any] | None:
        """The record, or None after dead-lettering a message that is not a readable ``expect``."""
        try:
            return self.codec.decode(value, expect=expect)[1]
        except DecodeError as exc:
            self.dead_letter(stage, topic, partition, offset, key, value,
                             f"undecodable {expect.rsplit('.', 1)[-1]}: {exc}")
            return None

    def dead_letter(self, stage: str, topic: str, partition: int, offset: int,
                    key: bytes | None, payload: bytes, reason: str, *, dead_letter_id: str | None = None,
                    failed_at: datetime | None = None) -> None:
        """Keep an unprocessable message whole, with its reason, and audit it.

        A caller that may meet the same message again (a re-read compacted topic) passes a
        ``dead_letter_id`` and ``failed_at`` derived from the message, so that a repeat
        collapses with the first in ClickHouse's ``dead_letters`` (ReplacingMergeTree).
        """
        dl_id = dead_letter_id or str(uuid.uuid4())
        self.send(t.DLQ, "dlq.DeadLetter", key, {
            "dead_letter_id": dl_id, "failed_at": failed_at or utcnow(), "stage": stage, "source_topic": topic,
            "source_partition": partition, "source_offset": offset, "key": key,
            "payload": bytes(payload or b""), "reason": reason,
        })
        self.audit(stage, "message.dead_lettered", "DEAD_LETTERED", detail={
            "dead_letter_id": dl_id, "source_topic": topic, "partition": partition, "offset": offset,
            "reason": reason,
        })

    async def flush(self) -> None:
        await self.publisher.flush_async()

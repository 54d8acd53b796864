"""What agents write: typed outputs, audit events and dead letters.

Agents never build wire bytes themselves; they call an ``Emitter`` so that
every output is Avro with the right schema, every step leaves an audit event,
and nothing is acknowledged on input before its outputs are flushed.

An emitter is *immediate* (each message goes to the producer at once: the
intake, review, sink and reference feed) or *buffered* (the stream agents):
a buffered emitter keeps a batch's messages as encoded bytes until
``publish_pending``, which the worker calls only once the state that
records them is durable (see ``streams.pipeline.app``). ``capture`` lets an agent
see the exact messages one order produced, to record them with its outcome.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Iterator

from connectors.kafka.io import MessageTooLarge, Publisher

from connectors.kafka import catalogue as t
from connectors.kafka.metrics import OUTCOME_TOPICS, observe_published
from streams.core import clock
from streams.core.avro_codec import AvroCodec, default_codec


#: Bytes of a message's payload a dead letter keeps. The producer refuses messages over 1,000,000 bytes
#: (librdkafka's ``message.max.bytes``); a dead letter adds the key, the reason and its own fields, so the
#: payload is cut well under that. The reason then says the original size and the whole payload's SHA-256.
MAX_DEAD_LETTER_PAYLOAD = 512 * 1024
#: Bytes of the original key kept (the key is also the dead letter's own message key).
MAX_DEAD_LETTER_KEY = 1024
#: Characters of the reason kept (reasons quote exceptions, which may quote the input).
MAX_DEAD_LETTER_REASON = 4000
#: What a buffered emitter refuses at once, as the producer would (librdkafka's default ``message.max.bytes``):
#: a message that can never be sent must fail while its order is handled, not when the batch is published.
MAX_MESSAGE_BYTES = 1_000_000

#: An audit event's ``detail`` as JSON: what ``json.dumps(detail, sort_keys=True, default=str)`` writes, made once
#: (``json.dumps`` with any option builds a new encoder per call, a sizeable share of an audit event's cost).
_DETAIL_JSON = json.JSONEncoder(sort_keys=True, default=str).encode

#: One message as produced: (topic, key bytes or None, value bytes).
Message = tuple[str, bytes | None, bytes]


def _cut(what: str, data: bytes, limit: int) -> tuple[bytes, str]:
    """(the first ``limit`` bytes, a note with the original size and SHA-256) or (data, "") if it fits."""
    if len(data) <= limit:
        return data, ""
    return data[:limit], (f" [{what} truncated to its first {limit} of {len(data)} bytes; SHA-256 of the whole "
                          f"{what}: {hashlib.sha256(data).hexdigest()}]")


class Emitter:
    def __init__(self, publisher: Publisher, actor: str, codec: AvroCodec | None = None, *,
                 buffered: bool = False) -> None:
        self.publisher = publisher
        self.actor = actor
        self.codec = codec or default_codec()
        self.buffered = buffered
        self.pending: list[Message] = []  # buffered mode: produced by ``publish_pending``
        #: id(pending message) -> the record it was encoded from, for outcome topics: counted by the metrics
        #: at delivery without decoding the bytes again (connectors.kafka.metrics.observe_published).
        self._records: dict[int, dict[str, Any]] = {}
        self._captures: list[list[Message]] = []

    def send(self, topic: str, schema: str, key: str | bytes | None, record: dict[str, Any]) -> None:
        """Encode ``record`` as ``schema`` and produce it; the catalogue says which record a topic carries, so a
        record of another schema on a catalogue topic is a programming error, raised before anything is sent."""
        expected = t.schema_of(topic)
        if expected is not None and schema != expected:
            raise ValueError(f"topic {topic} carries {expected} records (connectors.kafka.catalogue), not {schema}")
        self.publish(topic, key, self.codec.encode(schema, record), record=record)

    def publish(self, topic: str, key: str | bytes | None, value: bytes, *,
                record: dict[str, Any] | None = None) -> None:
        """Produce an already encoded message (now, or at ``publish_pending`` when buffered).

        ``record``: the record ``value`` was encoded from, if the caller has it; the metrics count an
        outcome from it instead of decoding the bytes again. It must not change once published.
        """
        key = key.encode() if isinstance(key, str) else key
        message = (topic, key, value)
        if self.buffered:
            if len(value) + len(key or b"") > MAX_MESSAGE_BYTES:
                raise MessageTooLarge(f"{topic}: message of {len(value)} bytes (key {len(key or b'')} bytes) "
                                      "exceeds the producer's size limit")
            self.pending.append(message)
            if record is not None and topic in OUTCOME_TOPICS:
                self._records[id(message)] = record
        else:
            self.publisher.publish(topic, key, value)
            # Prometheus counters (connectors.kafka.metrics)
            observe_published((message,), self.codec, {id(message): record} if record is not None else None)
        for captured in self._captures:
            captured.append(message)

    def republish(self, messages: Iterable[Message]) -> None:
        """Produce recorded messages again, byte for byte (a redelivered input repeats its outputs)."""
        for topic, key, value in messages:
            self.publish(topic, key, value)

    @contextmanager
    def capture(self) -> Iterator[list[Message]]:
        """Collect every message produced inside the block (nested captures each see them all)."""
        captured: list[Message] = []
        self._captures.append(captured)
        try:
            yield captured
        finally:
            self._captures.remove(captured)

    def discard(self, messages: list[Message]) -> int:
        """Take back buffered messages not yet published (an order whose handling failed halfway must not
        send half its outputs next to its error outcome); returns how many. Immediate mode: nothing to take."""
        if not self.buffered or not messages:
            return 0
        drop = {id(m) for m in messages}
        before = len(self.pending)
        self.pending = [m for m in self.pending if id(m) not in drop]
        for gone in drop:
            self._records.pop(gone, None)
        return before - len(self.pending)

    async def publish_pending(self) -> int:
        """Produce every buffered message and wait until the broker has them all; returns how many.

        The buffer is emptied only once they are delivered: should delivery
        fail, the caller's batch is not acknowledged and is handled again.
        """
        return await publish_pending(self)

    def take_pending(self) -> "Outputs":
        """Take the buffered messages out (to be published later by ``publish_outputs``); the buffer is empty after."""
        taken = Outputs(self, self.pending, self._records)
        self.pending, self._records = [], {}
        return taken

    def give_back(self, taken: "Outputs") -> None:
        """Put messages taken but not known to be delivered back in front of the buffer (still owed)."""
        self.pending = taken.messages + self.pending
        self._records = {**taken.records, **self._records}

    def audit(self, stage: str, action: str, outcome: str, *, order_id: str | None = None,
              purchaser_dea: str | None = None, detail: dict[str, Any] | None = None,
              at: datetime | None = None, actor: str | None = None) -> None:
        """Record one step; ``actor`` names the person who took it when it is not this service (an analyst)."""
        event = {
            "event_id": str(uuid.uuid4()),
            "occurred_at": at or clock.utcnow(),
            "stage": stage,
            "action": action,
            "order_id": order_id,
            "purchaser_dea": purchaser_dea,
            "outcome": outcome,
            "detail": _DETAIL_JSON(detail or {}),
            "actor": actor or self.actor,
        }
        self.send(t.AUDIT, "audit.AuditEvent", order_id or event["event_id"], event)

    def dead_letter(self, stage: str, topic: str, partition: int, offset: int,
                    key: bytes | None, payload: bytes, reason: str, *, dead_letter_id: str | None = None,
                    failed_at: datetime | None = None) -> None:
        """Keep an unprocessable message, with its reason, and audit it.

        A caller that may meet the same message again (a re-read compacted topic) passes a
        ``dead_letter_id`` and ``failed_at`` derived from the message, so that a repeat
        collapses with the first in ClickHouse's ``dead_letters`` (ReplacingMergeTree).

        The message is kept whole unless it would not fit in a Kafka message:
        then its first ``MAX_DEAD_LETTER_PAYLOAD`` bytes are kept and the reason
        gives the original size and the SHA-256 of the whole (a dead letter that
        cannot be sent would stop its stage on the same message forever). Should
        the producer still refuse it (a lower configured limit), it is sent with
        no payload: the reason, size and hash are never lost.
        """
        dl_id = dead_letter_id or str(uuid.uuid4())
        if len(reason) > MAX_DEAD_LETTER_REASON:
            reason = reason[:MAX_DEAD_LETTER_REASON] + f"... ({len(reason) - MAX_DEAD_LETTER_REASON} characters cut)"
        data, payload_note = _cut("payload", bytes(payload or b""), MAX_DEAD_LETTER_PAYLOAD)
        key = key.encode() if isinstance(key, str) else key
        key, key_note = _cut("key", bytes(key), MAX_DEAD_LETTER_KEY) if key is not None else (None, "")
        reason += payload_note + key_note
        record = {
            "dead_letter_id": dl_id, "failed_at": failed_at or clock.utcnow(), "stage": stage, "source_topic": topic,
            "source_partition": partition, "source_offset": offset, "key": key, "payload": data, "reason": reason,
        }
        try:
            self.send(t.DLQ, "dlq.DeadLetter", key, record)
        except MessageTooLarge:  # a producer limit under this margin: keep the reason, the size and the hash
            whole = bytes(payload or b"")
            reason += (f" [payload dropped, too large for the producer: {len(whole)} bytes, SHA-256 "
                       f"{hashlib.sha256(whole).hexdigest()}]")
            self.send(t.DLQ, "dlq.DeadLetter", key, dict(record, payload=b"", reason=reason))
        self.audit(stage, "message.dead_lettered", "DEAD_LETTERED", detail={
            "dead_letter_id": dl_id, "source_topic": topic, "partition": partition, "offset": offset,
            "reason": reason,
        })

    async def flush(self) -> None:
        """Wait until everything produced is delivered (buffered: publish what is pending first)."""
        if self.buffered:
            await self.publish_pending()
        else:
            await self.publisher.flush_async()


#: Namespace of the deterministic dead-letter ids (uuid5 of "topic/partition/offset").
DEAD_LETTER_NAMESPACE = uuid.UUID("6c1f6f5e-3b59-4c1b-9a55-2f0d3c7e8a41")


def dead_letter_id(topic: str, partition: int, offset: int) -> str:
    """The same id for the same message, whoever dead-letters it and however often: a stage that may meet a
    message again (a re-read compacted topic, a sink's replayed batch) passes it, so that the copies collapse
    in ClickHouse's ``dead_letters`` (ReplacingMergeTree on the source offset and the id)."""
    return str(uuid.uuid5(DEAD_LETTER_NAMESPACE, f"{topic}/{partition}/{offset}"))


@dataclass
class Outputs:
    """Messages taken from a buffered emitter (``Emitter.take_pending``): one batch's outputs, to publish later."""

    emitter: Emitter
    messages: list[Message]
    records: dict[int, dict[str, Any]] = field(default_factory=dict)  # for the metrics, as ``Emitter._records``


async def publish_outputs(*outputs: Outputs) -> int:
    """Produce ``outputs`` and wait once per publisher until the broker has them all; then count them (metrics).

    Why together: the confluent-kafka worker's processors share one producer,
    and each flush is a round trip the next batch waits for. Raises if
    producing or delivery fails: none of them is then known to be delivered.
    """
    for taken in outputs:
        publish = taken.emitter.publisher.publish
        for topic, key, value in taken.messages:
            publish(topic, key, value)
    for publisher in {id(o.emitter.publisher): o.emitter.publisher for o in outputs}.values():
        await publisher.flush_async()
    for taken in outputs:
        observe_published(taken.messages, taken.emitter.codec, taken.records)  # delivered: count the outcomes
    return sum(len(o.messages) for o in outputs)


async def publish_pending(*emitters: Emitter) -> int:
    """Publish the buffered messages of ``emitters`` (``publish_outputs``); should that fail, each keeps them."""
    taken = [e.take_pending() for e in emitters]
    try:
        return await publish_outputs(*taken)
    except BaseException:
        for out in taken:
            out.emitter.give_back(out)  # not known to be delivered: still owed
        raise

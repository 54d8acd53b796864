"""Kafka in memory, for tests of processors without a broker: a publisher, the messages it holds, a consumer.

``MemoryPublisher`` has the interface of :class:`connectors.kafka.io.Publisher` (``publish``, ``flush``,
``flush_async``, ``sent``), so an :class:`connectors.kafka.emit.Emitter` or a source writes to it as to
Kafka; it keeps every message (topic, partition, offset, key, value) in order, refuses a message over the
producer's size limit as librdkafka does, and can fail its flush like a worker killed before delivery.
``MemoryMessage`` reads like a ``confluent_kafka.Message`` (``topic()``, ``value()``, ...), the shape
the sink's and the agents' decoding reads; ``MemoryConsumer`` hands a publisher's messages to a consumer
loop. Keys are partitioned with Kafka's murmur2, as the real producers do, so per-key order holds.

Part of the Kafka package (not of tests/) so that every layer's tests can use it; production code never
imports it (it is only useful against code that takes a publisher).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from connectors.kafka.catalogue import AUDIT
from connectors.kafka.io import DeliveryFailed, MessageTooLarge, key_partition
from streams.core.avro_codec import AvroCodec, default_codec

#: librdkafka's default ``message.max.bytes`` (what the real producer refuses above).
PRODUCER_LIMIT = 1_000_000


@dataclass(frozen=True)
class MemoryMessage:
    """One message as a consumer reads it (the methods of ``confluent_kafka.Message`` that the code uses)."""

    topic_: str
    partition_: int
    offset_: int
    key_: bytes | None
    value_: bytes
    timestamp_ms: int | None = None

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes:
        return self.value_

    def error(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        """(TIMESTAMP_LOG_APPEND_TIME = 2, ms) when a time was given, else (TIMESTAMP_NOT_AVAILABLE = 0, -1)."""
        return (2, self.timestamp_ms) if self.timestamp_ms is not None else (0, -1)


def _key_bytes(key: bytes | str | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


def partition_for(key: bytes | None, partitions: int) -> int:
    """The partition a Kafka producer puts ``key`` on (Java-compatible murmur2); keyless: 0."""
    return 0 if key is None else key_partition(key, partitions)


class MemoryPublisher:
    """A :class:`~connectors.kafka.io.Publisher` in memory: what is published stays readable, in order.

    ``flush`` delivers what was published since the last flush (``delivered``); with ``fail_flush`` it raises
    :class:`DeliveryFailed` and drops those messages, like a producer that died before the broker acknowledged.
    """

    def __init__(self, *, partitions: int = 1, limit: int = PRODUCER_LIMIT, codec: AvroCodec | None = None,
                 fail_flush: bool = False) -> None:
        self.partitions, self.limit, self.fail_flush = partitions, limit, fail_flush
        self.codec = codec or default_codec()
        self.messages: list[MemoryMessage] = []  # everything published, in order
        self.delivered: list[MemoryMessage] = []  # what a flush acknowledged
        self._unflushed = 0
        self._next_offset: dict[tuple[str, int], int] = {}
        self.sent = 0
        self.flushes = 0

    def publish(self, topic: str, key: bytes | str | None, value: bytes) -> None:
        key = _key_bytes(key)
        if len(value or b"") + len(key or b"") > self.limit:
            raise MessageTooLarge(f"{topic}: message of {len(value or b'')} bytes (key {len(key or b'')} bytes) "
                                  "exceeds the producer's size limit")
        partition = partition_for(key, self.partitions)
        offset = self._next_offset.get((topic, partition), 0)
        self._next_offset[(topic, partition)] = offset + 1
        self.messages.append(MemoryMessage(topic, partition, offset, key, value))
        self._unflushed += 1
        self.sent += 1

    def flush(self, timeout: float = 60.0) -> None:
        pending, self._unflushed = self.messages[len(self.messages) - self._unflushed:], 0
        if self.fail_flush:
            del self.messages[len(self.messages) - len(pending):]
            raise DeliveryFailed(f"{len(pending)} messages not delivered (the test's producer failed)")
        self.delivered.extend(pending)
        self.flushes += 1

    async def flush_async(self, timeout: float = 60.0) -> None:
        self.flush(timeout)

    # -- reading back
    def on(self, topic: str) -> list[MemoryMessage]:
        """The messages published to ``topic``, in order."""
        return [m for m in self.messages if m.topic_ == topic]

    def records(self, topic: str) -> list[dict[str, Any]]:
        """The decoded Avro records published to ``topic``, in order."""
        return [self.codec.decode(m.value_)[1] for m in self.on(topic)]

    def keyed(self, topic: str) -> list[tuple[str | None, dict[str, Any]]]:
        """(key as text, decoded record) of every message on ``topic``."""
        return [(None if m.key_ is None else m.key_.decode(), self.codec.decode(m.value_)[1]) for m in self.on(topic)]

    def audits(self, action: str | None = None) -> list[dict[str, Any]]:
        """The audit events published (``audit.events``), only those of ``action`` when given."""
        return [r for r in self.records(AUDIT) if action is None or r["action"] == action]

    def take(self, topic: str) -> list[tuple[str | None, dict[str, Any]]]:
        """Like :meth:`keyed`, and forget those messages (a test reading a topic step by step)."""
        out = self.keyed(topic)
        self.messages = [m for m in self.messages if m.topic_ != topic]
        return out

    def topics(self) -> list[str]:
        """The topics written to, in order of first write."""
        return list(dict.fromkeys(m.topic_ for m in self.messages))


class MemoryConsumer:
    """Reads a publisher's messages on the subscribed topics, from the beginning, in publish order.

    ``consume`` returns what is new since the last call (up to ``num_messages``), as a consumer loop would;
    ``commit``/``close`` exist for code that calls them.
    """

    def __init__(self, publisher: MemoryPublisher, topics: Iterable[str] = ()) -> None:
        self.publisher = publisher
        self.subscribed: set[str] = set(topics)
        self._seen = 0

    def subscribe(self, topics: Iterable[str], **_callbacks: Any) -> None:
        self.subscribed = set(topics)

    def consume(self, num_messages: int = 1, timeout: float = 0.0) -> list[MemoryMessage]:
        out: list[MemoryMessage] = []
        while self._seen < len(self.publisher.messages) and len(out) < num_messages:
            m = self.publisher.messages[self._seen]
            self._seen += 1
            if m.topic_ in self.subscribed:
                out.append(m)
        return out

    def commit(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None

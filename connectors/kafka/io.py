"""Kafka producers and consumers built on confluent-kafka (librdkafka).

Everything the project writes goes through one ``Publisher``: idempotent,
``acks=all``, batched by librdkafka. Its partitioner is ``murmur2_random``,
the Java client's default, so that a key lands on the same partition whether
the simulator, a Faust table changelog (aiokafka, murmur2) or a Java producer
wrote it; co-partitioned tables depend on that.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from connectors.kafka.security import client_config
from streams.core.config import KafkaSettings
from streams.core.errors import CsosError

#: The producer settings that do not depend on the environment; ``producer_defaults`` adds the rest.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "partitioner": "murmur2_random",
    "linger.ms": 5,
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 500000,
    # Reports of failed deliveries only: a report is a Python call and a Message object per message (six or
    # more per order), and only failures are acted on (``Publisher.flush`` raises them).
    "delivery.report.only.error": True,
}


def key_partition(key: bytes | str, partitions: int) -> int:
    """The partition every producer here puts ``key`` on: Java-compatible murmur2 (``murmur2_random``, and
    aiokafka's for Faust's changelogs), so a worker can tell which keys belong to the partitions it owns."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return (murmur2(raw) & 0x7FFFFFFF) % partitions


def producer_defaults(kafka: KafkaSettings | None = None) -> dict[str, Any]:
    """Every producer's settings: ``PRODUCER_DEFAULTS`` and the compression of ``kafka`` (default: the
    environment's, ``KAFKA_COMPRESSION``, read now rather than when this module was imported)."""
    kafka = kafka or KafkaSettings.from_env()
    return dict(PRODUCER_DEFAULTS, **{"compression.type": kafka.compression})


class DeliveryFailed(CsosError, RuntimeError):
    """A message could not be written; the caller must not ack its input."""
    code = "KAFKA_DELIVERY"


class MessageTooLarge(DeliveryFailed):
    """The producer refused a message over its size limit (``message.max.bytes``, 1,000,000 by default).

    Raised at once by :meth:`Publisher.publish`: retrying the same message can
    never succeed, so the caller must make it smaller (dead letters are cut to
    fit, see ``connectors.kafka.emit``) or fail visibly.
    """
    code = "KAFKA_MESSAGE_TOO_LARGE"


class Publisher:
    """An idempotent producer that reports delivery failures instead of dropping them."""

    def __init__(self, bootstrap: str, **overrides: Any) -> None:
        conf = dict(producer_defaults(), **{"bootstrap.servers": bootstrap}, **client_config(), **overrides)
        # librdkafka's own log lines (e.g. transient "coordinator load in progress") go to logging.
        self._producer = Producer(conf, logger=logging.getLogger("connectors.kafka.io.librdkafka"))
        self._errors: list[str] = []
        self.sent = 0

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err.str()}")

    def publish(self, topic: str, key: bytes | str | None, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)  # queue full: let librdkafka drain, then retry
            except KafkaException as exc:
                if exc.args and exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise MessageTooLarge(f"{topic}: message of {len(value or b'')} bytes (key "
                                          f"{len(key or b'')} bytes) exceeds the producer's size limit") from None
                raise
        self._producer.poll(0)
        self.sent += 1

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything published so far is acknowledged by the broker."""
        remaining = self._producer.flush(timeout)
        if remaining:
            raise DeliveryFailed(f"{remaining} messages not delivered within {timeout}s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise DeliveryFailed("; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""))

    async def flush_async(self, timeout: float = 60.0) -> None:
        """Flush without blocking the event loop (Faust agents call this per batch)."""
        await asyncio.get_running_loop().run_in_executor(None, self.flush, timeout)


def consume_all(bootstrap: str, topics: list[str], *, group: str | None = None, idle_seconds: float = 2.0,
                until: Callable[[list[Any]], bool] | None = None, timeout: float = 120.0) -> list[Any]:
    """Read topics from the beginning until ``until(messages)`` is true or nothing new arrives.

    Used by tests, the demo summary and the benchmark to observe outputs as a
    downstream consumer (warehouse, ERP) would.
    """
    import time
    import uuid

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group or f"observer-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
        **client_config(),
    })
    consumer.subscribe(topics)
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(num_messages=5000, timeout=0.5)
            for m in batch:
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(m.error())
                messages.append(m)
            if batch:
                last_new = time.monotonic()
            if until is not None and until(messages):
                break
            if until is None and time.monotonic() - last_new > idle_seconds and messages:
                break
    finally:
        consumer.close()
    return messages

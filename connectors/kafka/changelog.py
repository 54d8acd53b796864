"""Compacted changelog topics read back to their end: how a worker restores a table partition it is given.

A table's changelog holds, per key, its latest value (or a tombstone). The
worker that takes over an input partition reads the same-numbered changelog
partition from its first record to the end it had *when the reading began*:
its previous owner stopped writing before the partition moved (a rebalance
revokes every partition before any is assigned again), so that end is the
table's last durable state. A record appended meanwhile could only come
from a zombie of the old owner; Kafka's group protocol, not this reader,
fences those.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from connectors.kafka.catalogue import TopicSpec
from connectors.kafka.security import client_config
from streams.core.errors import CsosError

#: Topic config of a changelog: compacted, as Faust creates its own.
CHANGELOG_CONFIG = {"cleanup.policy": "compact"}


def changelog_spec(name: str) -> TopicSpec:
    """The changelog topic ``name`` as ``connectors.kafka.topics.ensure_topics`` creates it."""
    return TopicSpec(name, config=CHANGELOG_CONFIG, doc="a worker table's changelog", key="the table key")


class RestoreTimeout(CsosError, TimeoutError):
    """The changelog could not be read to its end in time: the worker must not decide on a partial table."""
    code = "KAFKA_RESTORE"


def read_to_end(bootstrap: str, topic: str, partitions: Iterable[int], *, group: str,
                timeout: float = 300.0) -> Iterator[tuple[int, bytes, bytes | None]]:
    """Every record of ``topic``'s ``partitions`` up to their current end, as (partition, key, value or None).

    ``group`` is only the consumer's name (nothing is committed or joined):
    the worker's own group, which its ACLs already allow. Raises
    ``RestoreTimeout`` if the end is not reached within ``timeout`` seconds.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest",
                         # a fetch at the end returns at once: closing waits for the fetch in flight
                         "fetch.wait.max.ms": 10, **client_config()})
    try:
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            if high > low:
                ends[p] = high
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        while ends:
            if time.monotonic() > deadline:
                raise RestoreTimeout(f"{topic}: partitions {sorted(ends)} not read to their end in {timeout:.0f} s")
            for m in consumer.consume(num_messages=5000, timeout=0.1):
                p = m.partition()
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        if p in ends and m.offset() >= ends[p]:
                            del ends[p]
                        continue
                    raise KafkaException(m.error())
                if p not in ends:
                    continue
                if m.offset() < ends[p]:
                    yield p, m.key(), m.value()
                if m.offset() >= ends[p] - 1:
                    del ends[p]
    finally:
        consumer.close()

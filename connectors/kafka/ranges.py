"""Read exact offset ranges back from Kafka: how the sink re-forms a batch it was killed in the middle of.

The ClickHouse sink records each batch's offsets before writing it
(``sink_batches``); after a crash it must write exactly those messages again,
no more and no fewer, so that its inserts repeat their deduplication tokens.
Its group consumer cannot give it that (it delivers from the last commit
whatever has arrived since), so a second consumer, assigned the partitions
directly (nothing joined or committed), reads each range from its first
offset to its last.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from connectors.kafka.security import client_config
from streams.core.errors import CsosError


class RangeUnavailable(CsosError, LookupError):
    """A range cannot be read in full: its messages were deleted (retention), or it was not read in time."""
    code = "KAFKA_RANGE"


def read_ranges(bootstrap: str, ranges: Mapping[tuple[str, int], tuple[int, int]], *, group: str,
                timeout: float = 120.0, stop: Any = None) -> list[Any]:
    """Every message of each ``(topic, partition) -> (first, last)`` offset range, in offset order per partition.

    ``group`` is only the consumer's name (nothing is joined or committed): the
    caller's own group, which its ACLs already allow. Raises
    :class:`RangeUnavailable` when a range starts before its partition's first
    offset or ends at or past its end (it would come back short), or is not read
    within ``timeout`` seconds, or ``stop`` (an Event) is set meanwhile.
    """
    if not ranges:
        return []
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "error",
                         "fetch.wait.max.ms": 10, **client_config()})
    try:
        for (topic, partition), (first, last) in sorted(ranges.items()):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
            if first < low or last >= high:
                raise RangeUnavailable(f"{topic}[{partition}] offsets {first}-{last} cannot be read back: the "
                                       f"partition now holds {low}-{high - 1}")
        consumer.assign([TopicPartition(t, p, first) for (t, p), (first, _last) in sorted(ranges.items())])
        pending = dict(ranges)
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                raise RangeUnavailable(f"not read in {timeout:.0f} s: {sorted(pending)}")
            for m in consumer.consume(num_messages=5000, timeout=0.2):
                key = (m.topic(), m.partition())
                if m.error():
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(m.error())
                    if key in pending and m.offset() > pending[key][1]:  # the last one was not a message
                        del pending[key]
                    continue
                if key not in pending:
                    continue
                first, last = pending[key]
                if first <= m.offset() <= last:
                    messages.append(m)
                if m.offset() >= last:
                    del pending[key]
        return messages
    finally:
        consumer.close()

"""Exact offset ranges read back from the real broker: what a sink killed mid-batch replays (sink_batches).

A scratch topic on the session broker (the catalogue topics carry the session pipeline's traffic).
"""
from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from connectors.kafka.catalogue import TopicSpec
from connectors.kafka.ranges import RangeUnavailable, read_ranges
from connectors.kafka.topics import ensure_topics
from streams.tools.broker import LocalBroker

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def topic(broker: LocalBroker) -> str:
    """Two partitions of 20 messages each, value ``p<partition>-<offset>``."""
    name = f"scratch-ranges-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, specs=[TopicSpec(name, partitions=2)])
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all"})
    for partition in (0, 1):
        for offset in range(20):
            producer.produce(name, value=f"p{partition}-{offset}".encode(), partition=partition)
    assert producer.flush(30) == 0
    return name


def test_exactly_the_ranges_asked_for_are_read(broker: LocalBroker, topic: str) -> None:
    got = read_ranges(broker.bootstrap, {(topic, 0): (3, 9), (topic, 1): (0, 0)}, group=f"t-{uuid.uuid4()}")
    assert sorted((m.partition(), m.offset()) for m in got) == [(0, o) for o in range(3, 10)] + [(1, 0)]
    assert all(m.value() == f"p{m.partition()}-{m.offset()}".encode() for m in got)


def test_a_range_reaching_past_the_end_is_refused_not_returned_short(broker: LocalBroker, topic: str) -> None:
    with pytest.raises(RangeUnavailable, match="cannot be read back"):
        read_ranges(broker.bootstrap, {(topic, 0): (15, 25)}, group=f"t-{uuid.uuid4()}")


def test_no_range_reads_nothing(broker: LocalBroker) -> None:
    assert read_ranges(broker.bootstrap, {}, group="unused") == []

"""The local Kafka broker really starts, serves clients, and the topic catalogue applies.

Runs its own broker on free ports with a temporary data dir, so it neither
needs nor disturbs a developer's broker on 9092.
"""

from __future__ import annotations

import time
import uuid
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from streams.tools.broker import LocalBroker
from connectors.kafka.catalogue import CRL, RECEIVED, REGISTRANTS, TOPICS, TopicSpec
from connectors.kafka.topics import delete_topics, ensure_topics

pytestmark = pytest.mark.kafka


def test_broker_is_running(broker: LocalBroker) -> None:
    assert broker.is_running()
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert broker.server_log.exists()


def test_ensure_topics_creates_catalogue_idempotently(broker: LocalBroker) -> None:
    # The session fixture created the catalogue; a second run creates nothing and raises nothing.
    assert ensure_topics(broker.bootstrap) == []

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    md = admin.list_topics(timeout=10)
    for spec in TOPICS:
        assert len(md.topics[spec.name].partitions) == 4, spec.name


def test_compacted_topic_config(broker: LocalBroker) -> None:
    ensure_topics(broker.bootstrap)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    resources = [ConfigResource("topic", CRL), ConfigResource("topic", REGISTRANTS), ConfigResource("topic", RECEIVED)]
    configs = {res.name: fut.result(timeout=10) for res, fut in admin.describe_configs(resources).items()}
    assert configs[CRL]["cleanup.policy"].value == "compact"
    assert configs[REGISTRANTS]["cleanup.policy"].value == "compact"
    assert configs[RECEIVED]["cleanup.policy"].value == "delete"
    assert configs[RECEIVED]["retention.ms"].value == str(30 * 24 * 3600 * 1000)
    # Single broker: min.insync.replicas is left at the broker default.
    assert configs[RECEIVED]["min.insync.replicas"].value == "1"


def test_idempotent_produce_and_consume(broker: LocalBroker) -> None:
    # A scratch topic: the catalogue topics carry the session's pipeline traffic.
    topic = f"scratch-{uuid.uuid4().hex[:8]}"
    assert ensure_topics(broker.bootstrap, specs=[TopicSpec(topic, partitions=4)]) == [topic]
    key, value = b"DEA-AB1234563", f"order-{uuid.uuid4()}".encode()

    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all"}
    )
    delivered: list[tuple[int, int]] = []

    def on_delivery(err: object, msg: object) -> None:
        assert err is None, err
        delivered.append((msg.partition(), msg.offset()))  # type: ignore[attr-defined]

    producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert len(delivered) == 1

    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"test-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        got = None
        while got is None and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got = msg
        assert got is not None, "no message consumed within 60s"
        assert (got.key(), got.value()) == (key, value)
        assert (got.partition(), got.offset()) == delivered[0]
    finally:
        consumer.close()


def test_topic_creation_is_explicit_and_delete_works(broker: LocalBroker) -> None:
    # auto.create.topics.enable=false: producing to an unknown topic must not create it.
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": broker.bootstrap, "message.timeout.ms": 3000})
    errors: list[object] = []
    producer.produce(ghost, value=b"x", on_delivery=lambda err, msg: errors.append(err))
    producer.flush(10)
    assert errors and errors[0] is not None
    assert ghost not in admin.list_topics(timeout=10).topics

    spec = TopicSpec(f"scratch-{uuid.uuid4().hex[:8]}", partitions=2, config={"cleanup.policy": "compact"})
    assert ensure_topics(broker.bootstrap, specs=[spec]) == [spec.name]
    assert len(admin.list_topics(timeout=10).topics[spec.name].partitions) == 2
    assert delete_topics(broker.bootstrap, [spec.name, "never-existed"]) == [spec.name]


def test_a_refused_message_is_reported_by_the_publisher(broker: LocalBroker) -> None:
    """Delivery reports come only for failures (``delivery.report.only.error``): a message the broker
    refuses must still make ``Publisher.flush`` raise, and the ones it took must not."""
    from connectors.kafka.io import DeliveryFailed, Publisher

    topic = f"scratch-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, specs=[TopicSpec(topic, partitions=1, config={"max.message.bytes": "2000"})])
    publisher = Publisher(broker.bootstrap, **{"compression.type": "none"})
    publisher.publish(topic, b"k", b"small")
    publisher.flush(30)  # taken: no report, no error
    publisher.publish(topic, b"k", uuid.uuid4().bytes * 500)  # 8,000 bytes over the topic's 2,000
    with pytest.raises(DeliveryFailed, match=topic):
        publisher.flush(30)
    publisher.publish(topic, b"k", b"small again")
    publisher.flush(30)  # the failure was raised once, not carried over

"""A sink killed in the middle of a batch, against a real broker: restarted, every order counts once.

The sink runs in this process on a broker of its own (its topics are the
catalogue's, which the session pipeline counts exactly). Its ClickHouse client
kills it just before a batch's ``verdicts`` insert, once the batch's
``order_lines`` are stored: the consumer is closed without committing, as a
killed process leaves it. More orders arrive; a new sink on the same store
reads the cut-short batch back from Kafka, writes it again as the same batch,
then goes on. The dashboards' aggregates must count every order once (without
the replay, Kafka's re-delivery would form a different batch, and the lines
stored before the kill would be counted twice).
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.clickhouse.sink import ClickHouseSink
from connectors.kafka.io import Publisher
from streams.core.avro_codec import default_codec
from streams.core.config import Settings
from streams.pipeline.sink_service import SinkService
from streams.tools.broker import LocalBroker, free_port
from tests.conftest import running_broker
from tests.unit.test_dashboard_aggregates import dashboard_totals, expected, order_messages

pytestmark = pytest.mark.kafka
CODEC = default_codec()


class Killed(BaseException):
    """The process died: not an error the sink's retry loop catches."""


class DiesMidBatch:
    """A ClickHouse client that kills the sink before a ``verdicts`` insert that follows an ``order_lines`` one
    (so the batch is cut short with some of its tables written), once."""

    def __init__(self, client) -> None:
        self.client, self.lines_stored, self.died = client, False, False

    def insert(self, table, *args, **kwargs):
        if table == "verdicts" and self.lines_stored and not self.died:
            self.died = True
            raise Killed(table)
        result = self.client.insert(table, *args, **kwargs)
        self.lines_stored = self.lines_stored or table == "order_lines"
        return result

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory) -> Iterator[LocalBroker]:
    with running_broker(tmp_path_factory.mktemp("kafka-sink-crash")) as b:
        yield b


def publish_orders(publisher: Publisher, first: int, last: int) -> None:
    for i in range(first, last):
        for record in order_messages(i, offset=i):  # the offset is Kafka's: only the record is sent
            publisher.publish(record.topic, record.record["order_id"], CODEC.encode(record.schema, record.record))
    publisher.flush()


def start(service: SinkService) -> tuple[threading.Thread, list[BaseException]]:
    ended: list[BaseException] = []

    def run() -> None:
        try:
            service.run()
        except BaseException as exc:  # noqa: BLE001 - the test's kill, or a failure to report
            ended.append(exc)

    thread = threading.Thread(target=run, name="sink", daemon=True)
    thread.start()
    return thread, ended


def test_a_sink_killed_mid_batch_is_restarted_and_counts_every_order_once(own_broker: LocalBroker,
                                                                          tmp_path: Path) -> None:
    settings = Settings.from_env().with_(kafka_bootstrap=own_broker.bootstrap, data_dir=tmp_path, clickhouse_url="",
                                         sink_port=free_port(), app_id=f"csos-sink-crash-{uuid.uuid4().hex[:6]}")
    publisher = Publisher(settings.kafka_bootstrap)
    publish_orders(publisher, 0, 30)

    first = SinkService(settings)
    dying = DiesMidBatch(first.client)
    first.sink = ClickHouseSink(dying, first.audit_key)  # type: ignore[arg-type]
    thread, ended = start(first)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the sink was never killed: no batch wrote order_lines then verdicts"
    assert [type(e) for e in ended] == [Killed]
    cut_short = first.sink.progress.open_batches()
    assert len(cut_short) == 1, "the kill did not leave a batch begun and not stored"
    first.client.close()
    first.reader.close()

    publish_orders(publisher, 30, 40)
    second = SinkService(settings)
    thread, ended = start(second)
    try:
        deadline = time.monotonic() + 120
        while dashboard_totals(second.client) != expected(40) and time.monotonic() < deadline and not ended:
            time.sleep(0.2)  # polling a condition, bounded by the deadline
        assert not ended, ended
        assert dashboard_totals(second.client) == expected(40)
        assert second.replayed_batches == 1
        assert second.sink.progress.open_batches() == []
    finally:
        second.stopping.set()
        thread.join(timeout=60)

"""A sink killed in the middle of a batch writes exactly that batch again, and every order counts once.

The hazard: a batch is one insert per table. A sink that dies after some of them
has left those tables a copy of the batch's rows. Kafka re-delivers from the
last commit whatever has arrived since: a batch formed differently, so its
inserts carry other deduplication tokens, and the dashboards' aggregates
(which cannot collapse a copy as ``FINAL`` does) would count the rows written
before the crash twice. The sink records each batch's offsets before its first
insert (``sink_batches``); a restarted sink reads back exactly those offsets and
writes them as the same batch, whose inserts then repeat their tokens.

The embedded engine in a temporary directory, the sink's own write path, and
an in-memory Kafka log for the service (its reading back from a real broker is
in ``tests/integration/test_read_ranges.py``).
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from connectors.clickhouse.client import apply_ddl, open_client
from connectors.clickhouse.progress import Extent
from connectors.clickhouse.sink import ClickHouseSink, SourceRecord
from connectors.kafka import catalogue as t
from connectors.kafka.emit import Emitter
from connectors.kafka.testing import MemoryMessage, MemoryPublisher
from streams.core.avro_codec import default_codec
from streams.core.config import Settings
from streams.pipeline import sink_service
from tests.unit.test_dashboard_aggregates import dashboard_totals, expected, orders

CODEC = default_codec()


class Killed(BaseException):
    """The process died: not an error the sink's retry loop catches, so the batch is left as it was."""


class DiesBeforeInserting:
    """A ClickHouse client whose process dies just before its first insert into ``table``."""

    def __init__(self, client, table: str) -> None:
        self.client, self.table = client, table

    def insert(self, table, *args, **kwargs):
        if table == self.table:
            raise Killed(table)
        return self.client.insert(table, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture()
def client(tmp_path: Path):
    c = open_client(Settings().with_(data_dir=tmp_path))
    apply_ddl(c)
    yield c
    c.close()


def count(client, table: str) -> int:
    return int(client.query(f"SELECT count() FROM {table}").result_rows[0][0])


def test_a_batch_cut_short_is_written_again_exactly_and_counts_once(client):
    ClickHouseSink(client).write(orders(0, 4))  # an earlier batch, stored and committed
    cut = orders(4, 10)
    with pytest.raises(Killed):
        ClickHouseSink(DiesBeforeInserting(client, "verdicts")).write(cut)
    # Killed mid-batch: the six orders' lines are stored (and counted by the aggregates), their verdicts are not.
    assert dashboard_totals(client)["lines"] == 2 * 10 and dashboard_totals(client)["verdicts"] == 4

    restarted = ClickHouseSink(client)
    [batch] = restarted.progress.open_batches()
    assert batch.complete and batch.extent == {(t.VERIFIED, 0): (4, 9), (t.VERDICTS, 0): (4, 9)}
    restarted.write(list(reversed(cut)), extent=batch.extent)  # read back from Kafka: the order does not matter
    assert restarted.progress.open_batches() == []
    restarted.write(orders(4, 16))  # then Kafka's re-delivery from the last commit, and new orders
    assert dashboard_totals(client) == expected(16)
    assert count(client, "order_lines") == 32 and count(client, "verdicts") == 16


def test_a_batch_stored_in_full_is_not_open(client):
    sink = ClickHouseSink(client)
    sink.write(orders(0, 6))
    assert sink.progress.open_batches() == [] and ClickHouseSink(client).progress.open_batches() == []


def test_a_batch_killed_before_its_first_insert_is_replayed_harmlessly(client):
    with pytest.raises(Killed):
        ClickHouseSink(DiesBeforeInserting(client, "order_lines")).write(orders(0, 5))
    restarted = ClickHouseSink(client)
    [batch] = restarted.progress.open_batches()
    restarted.write(orders(0, 5), extent=batch.extent)
    assert dashboard_totals(client) == expected(5)


def test_a_re_created_topic_drops_the_batch_record_too(client):
    """A batch begun on a topic since deleted and re-created must not be read back from the new topic (its
    offsets now hold other messages, which the old tokens would make ClickHouse drop as copies)."""
    with pytest.raises(Killed):
        ClickHouseSink(DiesBeforeInserting(client, "verdicts")).write(orders(0, 10))
    restarted = ClickHouseSink(client)
    assert len(restarted.progress.open_batches()) == 1
    assert restarted.progress.drop_beyond(t.VERIFIED, 0, 3) is True  # the new topic ends at offset 3
    assert restarted.progress.drop_beyond(t.VERDICTS, 0, 3) is True
    assert restarted.progress.open_batches() == [] and ClickHouseSink(client).progress.open_batches() == []


# ---------------------------------------------------------------------------------------- the sink service
def as_messages(records: list[SourceRecord]) -> list[MemoryMessage]:
    return [MemoryMessage(r.topic, r.partition, r.offset, None, CODEC.encode(r.schema, r.record)) for r in records]


def service(store) -> sink_service.SinkService:
    """The sink service's batch handling over a real store, without a broker (its dead letters caught)."""
    svc = object.__new__(sink_service.SinkService)
    svc.codec, svc.dead_lettered, svc.lock, svc.stopping = CODEC, 0, threading.Lock(), threading.Event()
    svc.emitter = Emitter(MemoryPublisher(), "clickhouse-sink")
    svc.sink = ClickHouseSink(store)
    svc.replayed_batches, svc.assigned, svc.replay_due = 0, set(), False
    return svc


def test_the_service_replays_the_batch_it_was_killed_in_with_what_it_dead_lettered(client):
    log = as_messages(orders(0, 10))
    log.append(MemoryMessage(t.REJECTED, 0, 0, None, b"\x00not avro"))  # dead-lettered as it is decoded
    first = service(DiesBeforeInserting(client, "verdicts"))
    with pytest.raises(Killed):
        first.handle_batch(log)
    assert first.dead_lettered == 1

    restarted = service(client)
    restarted.assigned = {(t.VERIFIED, 0), (t.VERDICTS, 0), (t.REJECTED, 0)}
    read: list[Extent] = []

    def read_back(extent: Extent) -> list[MemoryMessage]:  # the in-memory Kafka log, in another order
        read.append(extent)
        return [m for m in reversed(log) if extent[(m.topic(), m.partition())][0] <= m.offset()
                <= extent[(m.topic(), m.partition())][1]]

    restarted.read_back = read_back
    assert restarted.replay_open_batches() == 1
    assert read == [{(t.VERIFIED, 0): (0, 9), (t.VERDICTS, 0): (0, 9), (t.REJECTED, 0): (0, 0)}]  # with it
    assert restarted.dead_lettered == 1  # decoded again as the same batch: dead-lettered again, under the same id,
    # so the two copies collapse into one row of ``dead_letters`` (one trace per message)
    ids = [r["dead_letter_id"] for svc in (first, restarted) for r in svc.emitter.publisher.records(t.DLQ)]
    assert len(ids) == 2 and ids[0] == ids[1]
    restarted.handle_batch(log + as_messages(orders(10, 12)))  # the group consumer's re-delivery, and more
    assert restarted.dead_lettered == 1  # the re-delivered copy is skipped: stored
    assert dashboard_totals(client) == expected(12)
    assert restarted.replay_open_batches() == 0


def not_replayable() -> float:
    return REGISTRY.get_sample_value("csos_sink_batches_replayed_total", {"outcome": "not_replayable"}) or 0.0


def test_the_service_leaves_a_batch_whose_partitions_another_sink_was_given(client):
    with pytest.raises(Killed):
        service(DiesBeforeInserting(client, "verdicts")).handle_batch(as_messages(orders(0, 4)))
    before = not_replayable()
    elsewhere = service(client)
    elsewhere.assigned = {(t.REJECTED, 0)}  # none of the batch's partitions: another sink's to replay, no alarm
    elsewhere.read_back = lambda extent: pytest.fail("read back a batch of another sink's partitions")
    assert elsewhere.replay_open_batches() == 0 and not_replayable() == before
    split = service(client)
    split.assigned = {(t.VERIFIED, 0)}  # a group of sinks split the batch's partitions: counted for the alert
    split.read_back = lambda extent: pytest.fail("read back a batch it does not own in full")
    assert split.replay_open_batches() == 0 and not_replayable() == before + 1

"""The worker's consumer never commits past an input record no agent acknowledged, and re-reads a lost one.

faust-streaming 0.15 loses input records in three ways (all seen in
``tests/integration/test_crash_safety.py`` after a kill -9: a restarted worker committed
past orders no agent ever saw): records thrown away with the agents' queues
at the end of a seek; a jump in offsets taken for a gap in the log and
acknowledged on the agents' behalf; a missing record at the head let through
by an off-by-one. ``streams.pipeline.faust_tuning.GaplessInputs`` closes each; here
Faust's own consumer runs with the Kafka client stubbed out (no broker), and
each test states what stock Faust would have committed.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import faust
from faust.types import TP
from faust.types.tuples import Message

from faust.transport.drivers import aiokafka as faust_driver

from streams.pipeline.faust_tuning import MAX_REFETCH, gapless_inputs

ORDERS = TP("csos.orders.received", 0)


def _consumer(committed: int | None = 74) -> tuple[Any, list[tuple[TP, int]], str]:
    """A worker consumer positioned at ``committed``; returns it, the seeks it makes, and a changelog topic."""
    app = faust.App(f"csos-test-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:9", store="memory://")
    table = app.Table("state", default=None)
    app.topics._acking_topics.add(ORDERS.topic)  # noqa: SLF001 - an agent's input, as the conductor marks it
    gapless_inputs(app)
    consumer = app.consumer
    seeks: list[tuple[TP, int]] = []

    async def _seek(tp: TP, offset: int) -> None:
        seeks.append((tp, offset))

    consumer._seek = _seek  # noqa: SLF001 - the Kafka client's seek
    consumer.assignment = lambda: {ORDERS}
    if committed is not None:
        consumer._committed_offset[ORDERS] = committed  # noqa: SLF001 - as perform_seek leaves it
    return consumer, seeks, table.changelog_topic.get_topic_name()


def _message(offset: int, tp: TP = ORDERS) -> Message:
    return Message(tp.topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None, tp=tp)


def _deliver(consumer: Any, offsets: range, acked: set[int]) -> list[Message]:
    """Fetch records and hand them to the agents; acknowledge those in ``acked``; return them (still held)."""
    kept = []
    for offset in offsets:
        message = _message(offset)
        consumer.note_fetched(ORDERS, message)
        consumer.track_message(message)
        if offset in acked:
            consumer.ack(message)
        kept.append(message)
    return kept


def test_acknowledged_records_without_a_hole_are_committed() -> None:
    consumer, _, _ = _consumer(74)
    _deliver(consumer, range(74, 81), set(range(74, 81)))
    assert consumer._new_offset(ORDERS) == 81  # noqa: SLF001


def test_a_missing_record_at_the_head_stops_the_commit() -> None:
    # Stock Faust commits 77 here: ``min(acked) - committed > 1`` lets exactly one missing record through.
    consumer, _, _ = _consumer(74)
    _deliver(consumer, range(75, 77), {75, 76})
    assert consumer._new_offset(ORDERS) is None  # noqa: SLF001


def test_with_nothing_committed_the_first_record_delivered_is_the_head() -> None:
    # Stock Faust does not check the head of a partition with no committed offset: it would commit 5.
    consumer, _, _ = _consumer(None)
    _deliver(consumer, range(0, 5), {3, 4})
    assert consumer._new_offset(ORDERS) is None  # noqa: SLF001


def test_a_jump_in_offsets_is_not_acknowledged_as_a_gap_for_an_input_topic() -> None:
    consumer, _, changelog = _consumer(74)
    asyncio.run(consumer._add_gap(ORDERS, 75, 90))  # noqa: SLF001 - what the fetch loop calls on a jump
    _deliver(consumer, [74, *range(91, 95)], {74, *range(91, 95)})  # type: ignore[arg-type]
    assert consumer._new_offset(ORDERS) == 75  # noqa: SLF001 - stock Faust: 95, past 16 unread orders
    # Changelogs are compacted: their gaps are real and keep Faust's handling.
    log_tp = TP(changelog, 0)
    consumer._committed_offset[log_tp] = 10  # noqa: SLF001
    asyncio.run(consumer._add_gap(log_tp, 11, 20))  # noqa: SLF001
    assert consumer._gap[log_tp]  # noqa: SLF001


def test_a_record_lost_inside_the_consumer_is_read_again_from_its_offset() -> None:
    async def run() -> None:
        consumer, seeks, _ = _consumer(74)
        # 74-76 were queued and thrown away (no reference left, never acknowledged); 77-80 were processed.
        for offset in range(74, 77):
            consumer.note_fetched(ORDERS, _message(offset))
        kept = _deliver(consumer, range(77, 81), set(range(77, 81)))
        assert consumer.lost_offsets() == {ORDERS: 74}
        await consumer._repair_lost()  # noqa: SLF001 - first sight: could be a commit in progress
        assert seeks == []
        await consumer._repair_lost()  # noqa: SLF001 - seen again: repaired
        assert seeks == [(ORDERS, 74)]
        assert consumer._read_offset[ORDERS] == 74  # noqa: SLF001 - the fetch loop hands 74 on again
        assert consumer.repairs == 1
        del kept

    asyncio.run(run())


def test_records_still_with_an_agent_are_not_lost() -> None:
    async def run() -> None:
        consumer, seeks, _ = _consumer(74)
        in_flight = _deliver(consumer, range(74, 80), set(range(77, 80)))  # 74-76 still in the agent's batch
        assert consumer.lost_offsets() == {}
        await consumer._repair_lost()  # noqa: SLF001
        await consumer._repair_lost()  # noqa: SLF001
        assert seeks == []
        assert consumer._new_offset(ORDERS) is None  # noqa: SLF001 - not acknowledged yet: nothing to commit
        for message in in_flight[:3]:
            consumer.ack(message)
        assert consumer._new_offset(ORDERS) == 80  # noqa: SLF001

    asyncio.run(run())


def _fetch(consumer: Any, monkeypatch: Any, offsets: list[int]) -> list[int]:
    """One fetch round returning records at ``offsets``; the offsets the consumer hands on to Faust's loop."""
    batch = [(ORDERS, _message(o)) for o in offsets]

    async def fetched(self: Any, timeout: float) -> Any:
        for item in batch:
            yield item

    monkeypatch.setattr(faust_driver.Consumer, "getmany", fetched)

    async def collect() -> list[int]:
        return [m.offset async for _, m in consumer.getmany(1.0)]

    return asyncio.run(collect())


def test_a_fetch_that_skips_offsets_is_not_handed_on_and_the_partition_is_fetched_again(monkeypatch) -> None:
    # Stock Faust hands 90 on, processes it before 76-89 (out of order) and acknowledges 76-89 as a "gap".
    consumer, seeks, _ = _consumer(74)
    consumer._expected[ORDERS] = 74  # noqa: SLF001 - as perform_seek leaves it
    assert _fetch(consumer, monkeypatch, [74, 75, 90, 91]) == [74, 75]
    assert seeks == [(ORDERS, 76)]
    assert _fetch(consumer, monkeypatch, [76, 77, 78]) == [76, 77, 78]


def test_records_gone_from_the_log_are_skipped_after_repeated_fetches(monkeypatch) -> None:
    consumer, seeks, _ = _consumer(74)
    consumer._expected[ORDERS] = 74  # noqa: SLF001 - committed 74, but retention deleted up to 100
    for _ in range(MAX_REFETCH):
        assert _fetch(consumer, monkeypatch, [100, 101]) == []
    assert _fetch(consumer, monkeypatch, [100, 101]) == [100, 101]
    assert len(seeks) == MAX_REFETCH
    for offset in (100, 101):
        consumer.ack(_message(offset))
    assert consumer._new_offset(ORDERS) == 102  # noqa: SLF001 - commits go on from what the log still has


class _Client:
    """The consumer's Kafka client thread, as a rebalance leaves it: positioned past records Faust threw away.

    ``buffered`` holds records fetched for each partition; ``fetch`` behaves
    as aiokafka's ``fetched_records``, which takes an empty set of partitions
    for "every partition". ``seek_to_committed`` is aiokafka's: it seeks only
    partitions with a committed offset above 0.
    """

    def __init__(self, committed: dict[TP, int | None]) -> None:
        self.committed = committed
        self.buffered: dict[TP, list[int]] = {}
        self.drained: list[TP] = []
        self.rewound: list[tuple[str, int]] = []
        self.during_fetch: Any = lambda: None

    async def seek_to_committed(self) -> dict[TP, int | None]:
        return dict(self.committed)

    async def seek_to_beginning(self, *partitions: Any) -> None:
        self.rewound += [(tp.topic, tp.partition) for tp in partitions]

    async def getmany(self, active_partitions: set[TP] | None, timeout: float) -> dict[TP, list[int]]:
        self.during_fetch()  # the client waits for records; the worker's loop runs meanwhile
        out = {tp: offsets for tp, offsets in self.buffered.items() if not active_partitions or tp in active_partitions}
        self.drained += list(out)
        return out


def test_an_input_partition_with_nothing_committed_is_read_again_from_its_start_after_a_seek() -> None:
    # Stock Faust leaves it where the client had read to: records fetched and thrown away during a rebalance (two
    # workers, before any commit) were never read again, and the monitor agent waited for them forever.
    async def run() -> None:
        consumer, _, changelog = _consumer(None)
        committed = TP("csos.orders.received", 1)
        consumer.assignment = lambda: {ORDERS, committed, TP(changelog, 0)}
        consumer._thread = _Client({ORDERS: None, committed: 12, TP(changelog, 0): None})  # noqa: SLF001
        await consumer.perform_seek()
        assert consumer._thread.rewound == [(ORDERS.topic, ORDERS.partition)]  # noqa: SLF001
        assert consumer._read_offset[ORDERS] is None  # noqa: SLF001 - the fetch loop takes offset 0 again
        assert consumer._expected == {committed: 12}  # noqa: SLF001

    asyncio.run(run())


def test_a_fetch_asks_the_client_for_the_partitions_active_when_it_began() -> None:
    # Stock Faust passes its live set: emptied by the rebalance while the client waited, it meant "every partition",
    # and the paused input partition's records were returned, moved past and thrown away as inactive.
    async def run() -> None:
        consumer, _, changelog = _consumer(None)
        restoring = TP(changelog, 0)
        consumer._thread = client = _Client({})  # noqa: SLF001
        client.buffered = {restoring: [0, 1], ORDERS: [0, 1, 2]}
        live = {restoring}
        client.during_fetch = live.clear  # recovery read the changelog: it pauses it, inputs not resumed yet
        records = await consumer._getmany(active_partitions=live, timeout=1.0)  # noqa: SLF001
        assert client.drained == [restoring] and list(records) == [restoring]

    asyncio.run(run())

"""A restarted worker reads every input from its committed offset: nothing fetched during recovery is lost.

At the end of table recovery Faust seeks the agents' input partitions back
to the committed offsets and then empties the agents' queues, while its
fetcher keeps running. Unpatched, records fetched in between were queued,
marked read and thrown away, and Faust then acknowledged them as a "gap":
after a kill -9 the crash test found ~70 orders per partition that no agent
ever saw (``tests/integration/test_crash_safety.py``). The worker's consumer
(``streams.pipeline.faust_tuning.InputsHeldWhileSeeking``) holds the inputs in the
Kafka client from the seek until Faust resumes the flow, after the queues
are emptied. Here the consumer is Faust's own, with the Kafka client (which
runs in Faust's consumer thread) replaced by a stand-in: no broker.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import faust
from aiokafka.structs import TopicPartition
from faust.types import TP

from streams.pipeline.faust_tuning import hold_inputs_while_seeking

ORDERS = "csos.orders.received"
COMMITTED = {0: 74, 1: 12}


class FakeClient:
    """aiokafka's consumer as far as the seek and pause/resume go: what is paused, and when."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.paused: set[TopicPartition] = set()
        self.paused_during_seek: set[TopicPartition] | None = None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        assert all(isinstance(tp, TopicPartition) for tp in tps)
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        assert all(isinstance(tp, TopicPartition) for tp in tps)
        self.paused.difference_update(tps)


def _worker_consumer(during_seek: Any = None) -> tuple[Any, FakeClient, faust.App, TopicPartition]:
    app = faust.App(f"csos-test-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:9", store="memory://")
    table = app.Table("state", default=None)
    hold_inputs_while_seeking(app)
    consumer = app.consumer
    changelog = TopicPartition(table.changelog_topic.get_topic_name(), 0)
    client = FakeClient({TopicPartition(ORDERS, 0), TopicPartition(ORDERS, 1), changelog})
    thread = consumer._thread  # noqa: SLF001 - the Kafka client lives in Faust's consumer thread

    async def call_thread(fun: Any, *args: Any) -> Any:
        return fun(*args)

    async def seek_to_committed() -> dict[TP, int]:
        client.paused_during_seek = set(client.paused)
        if during_seek is not None:
            during_seek(consumer)
        return {TP(ORDERS, p): off for p, off in COMMITTED.items()}

    thread._ensure_consumer = lambda: client  # noqa: SLF001
    thread.call_thread = call_thread
    thread.seek_to_committed = seek_to_committed
    return consumer, client, app, changelog


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_inputs_stay_held_from_the_seek_until_the_queues_are_emptied_and_the_flow_resumes() -> None:
    async def run() -> None:
        consumer, client, app, changelog = _worker_consumer()
        inputs = {TopicPartition(ORDERS, 0), TopicPartition(ORDERS, 1)}
        # Faust's end of recovery: resume the inputs, seek them, empty the queues, resume the flow.
        consumer.resume_partitions({TP(ORDERS, 0), TP(ORDERS, 1)})
        await consumer.perform_seek()
        assert client.paused_during_seek == inputs, "the fetcher could hand out inputs during the seek"
        assert changelog not in client.paused_during_seek  # changelogs (standbys) keep being read
        assert client.paused == inputs, "inputs fetchable before Faust emptied the queues"
        consumer._read_offset[TP(ORDERS, 0)] = 100  # noqa: SLF001 - a record handed out just before the seek
        app.flow_control.resume()  # empties the queues
        consumer.resume_flow()
        await _settle()
        assert client.paused == set()
        assert consumer._read_offset[TP(ORDERS, 0)] == COMMITTED[0]  # noqa: SLF001 - read again from there
        assert consumer._read_offset[TP(ORDERS, 1)] == COMMITTED[1]  # noqa: SLF001

    asyncio.run(run())


def test_a_flow_resumed_during_the_seek_releases_the_inputs_once_the_seek_is_done() -> None:
    async def run() -> None:
        consumer, client, _, _ = _worker_consumer(during_seek=lambda c: c.resume_flow())
        await consumer.perform_seek()
        await _settle()
        assert client.paused_during_seek == {TopicPartition(ORDERS, 0), TopicPartition(ORDERS, 1)}
        assert client.paused == set(), "inputs left paused for good"

    asyncio.run(run())


def test_a_failed_seek_does_not_leave_the_inputs_paused() -> None:
    async def run() -> None:
        def fail(_: Any) -> None:
            raise TimeoutError("coordinator not available")

        consumer, client, _, _ = _worker_consumer(during_seek=fail)
        try:
            await consumer.perform_seek()
        except TimeoutError:
            pass
        await _settle()
        assert client.paused == set()

    asyncio.run(run())

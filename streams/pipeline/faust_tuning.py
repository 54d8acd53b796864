"""Two adjustments to faust-streaming's Kafka consumer.

1. No input lost after a restart or rebalance: :class:`InputsHeldWhileSeeking`.

2. One consumer setting faust-streaming does not expose: ``fetch_max_wait_ms``.

faust-streaming 0.15 builds its aiokafka consumer with ``fetch_max_wait_ms=1500``
hard-coded (faust/transport/drivers/aiokafka.py). When a fetch for the
verified topic is parked at the broker, an order waits up to 1.5 s between
the verify and the monitor agent: measured with ``csos bench --rate 300``,
received-to-verdict p50 went from 2.6 s to 0.49 s with 100 ms. This module
substitutes a consumer class with the configured value, for the Faust
driver only; every other argument is Faust's own.
"""
from __future__ import annotations

import asyncio
import logging
import types
from typing import Any, Iterable

import aiokafka
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as faust_driver
from faust.types import TP

log = logging.getLogger(__name__)


def set_fetch_max_wait(ms: int) -> None:
    """Make every consumer the Faust driver creates wait at most ``ms`` at the broker."""
    base = aiokafka.AIOKafkaConsumer

    class Consumer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *topics: Any, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = ms
            super().__init__(*topics, **kwargs)

    module = types.ModuleType("aiokafka")
    module.__dict__.update(aiokafka.__dict__)
    module.AIOKafkaConsumer = Consumer  # type: ignore[attr-defined]
    faust_driver.aiokafka = module  # type: ignore[attr-defined]


class InputsHeldWhileSeeking(faust_driver.Consumer):  # type: ignore[misc]
    """Faust's consumer, with its input partitions held in the Kafka client while Faust repositions them.

    Why: at the end of table recovery (every restart with state, every
    rebalance) Faust resumes the agents' input partitions, seeks them to the
    committed offsets and only then empties the agents' queues
    (``flow_control.resume()``). Its fetcher keeps running meanwhile (it was
    started to read the changelogs), so records fetched in that window are
    put on the queues, marked read, and then thrown away; and when the seek's
    reset of Faust's read offset lands in the middle of that, Faust takes the
    next record for a gap in the log and acknowledges the missing range on
    the agents' behalf. Measured in ``tests/integration/test_crash_safety.py``:
    after a kill -9 the restarted worker committed past ~70 orders per
    partition that no agent ever saw (no outcome, ever), or stopped
    committing a partition for good. Upstream: faust-streaming issue #596.

    Here every ``perform_seek`` first pauses the input partitions in aiokafka
    itself (its fetched records for them are dropped without moving the
    position, so nothing of theirs is handed out or consumed), and they are
    released only at ``resume_flow``, which Faust calls right after emptying
    the queues: the agents then read from the committed offset, in order, with
    no hole. Redelivered orders are answered from their outcome records
    (``streams.pipeline.outcomes``).
    """

    _held: frozenset[TP] = frozenset()  # input partitions paused in the client, released at resume_flow
    _held_at: dict[TP, int | None] = {}  # their read offsets as the seek set them
    _seeking: int = 0
    _resumed_while_seeking: bool = False

    def _inputs_in_client(self) -> list[Any]:
        """The assigned partitions an agent reads (not changelogs), as aiokafka's TopicPartition."""
        changelogs = self.app.tables.changelog_topics
        return [tp for tp in self._thread._ensure_consumer().assignment() if tp.topic not in changelogs]  # noqa: SLF001

    def _pause_inputs(self) -> list[Any]:
        """Runs in the consumer thread: pause the input partitions; returns them."""
        tps = self._inputs_in_client()
        self._thread._ensure_consumer().pause(*tps)  # noqa: SLF001
        return tps

    def _resume_inputs(self, tps: Iterable[TP]) -> None:
        """Runs in the consumer thread: resume those still assigned (a rebalance may have taken some)."""
        client = self._thread._ensure_consumer()  # noqa: SLF001
        assigned = client.assignment()
        client.resume(*(TopicPartition(tp.topic, tp.partition) for tp in tps if tp in assigned))

    async def perform_seek(self) -> None:
        self._seeking += 1
        try:
            held = await self._thread.call_thread(self._pause_inputs)  # noqa: SLF001
            self._held = self._held | frozenset(TP(tp.topic, tp.partition) for tp in held)
            await super().perform_seek()
            self._held_at = {tp: self._read_offset.get(tp) for tp in self._held}
        except BaseException:
            self._seeking -= 1
            self._release(reposition=False)  # as unpatched Faust would be: better than inputs held for good
            raise
        self._seeking -= 1
        if not self._seeking and self._resumed_while_seeking:
            self._release()

    def resume_flow(self) -> None:
        super().resume_flow()
        if self._seeking:
            self._resumed_while_seeking = True  # released when the seek is done
        else:
            self._release()

    def _release(self, *, reposition: bool = True) -> None:
        """Hand the held input partitions back, reading from where the seek put them (``reposition``)."""
        self._resumed_while_seeking = False
        held, self._held = self._held, frozenset()
        if not held:
            return
        for tp in held if reposition else ():  # nothing of theirs was handed out since the seek
            if tp in self._held_at:
                self._read_offset[tp] = self._held_at[tp]
        log.info("input partitions repositioned at their committed offsets; fetching again: %s",
                 ", ".join(f"{tp.topic}[{tp.partition}]@{self._held_at.get(tp)}" for tp in sorted(held)))
        task = asyncio.ensure_future(self._thread.call_thread(self._resume_inputs, held))  # noqa: SLF001
        task.add_done_callback(_log_failure)
        _pending.add(task)
        task.add_done_callback(_pending.discard)


_pending: set[asyncio.Future[Any]] = set()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("input partitions could not be resumed in the Kafka client: %r", task.exception())


def hold_inputs_while_seeking(app: Any) -> None:
    """Give ``app`` the consumer of :class:`InputsHeldWhileSeeking` (before its consumer is created)."""
    app.transport.Consumer = InputsHeldWhileSeeking

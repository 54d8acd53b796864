"""Two adjustments to faust-streaming's Kafka consumer.

1. No input record committed unless an agent acknowledged it: :class:`GaplessInputs`.

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

import logging
import time
import types
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiokafka
from faust.transport.drivers import aiokafka as faust_driver
from faust.types import TP
from faust.utils.functional import consecutive_numbers

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


#: Seconds between two scans for lost records (a loss is repaired when two scans in a row see it).
REPAIR_CHECK_SECONDS = 1.0

#: Fetches in a row that may skip the same expected offset before its records are taken as deleted by retention.
MAX_REFETCH = 5


class GaplessInputs(faust_driver.Consumer):  # type: ignore[misc]
    """Faust's consumer, with a committed offset that never passes an input record no agent acknowledged.

    Why: faust-streaming 0.15 may commit past records that were fetched but
    never processed, and then they are lost for good (no outcome, ever):

    * after a seek (every restart with state, every rebalance) records
      fetched in the window before the agents' queues are emptied are put on
      the queues, counted as read and thrown away (upstream issue #596);
    * a record that arrives more than one offset after the last one read is
      taken for a gap in the log (compaction, transaction markers) and the
      missing range is acknowledged on the agents' behalf (``_add_gap``);
    * the commit check lets exactly one missing record at the head through
      (``min(acked) - committed > 1``), and never checks a partition that has
      no committed offset yet.

    Measured before this class with ``tests/integration/test_crash_safety.py``: after a
    kill -9, a restarted worker committed past ~70 orders per partition no
    agent saw; with an earlier workaround (inputs paused while seeking), one
    run in four still left ~24 orders unread.

    The agents' input topics are delete-retention topics written without
    transactions, so their offsets have no holes: here

    1. records are handed on in offset order without a jump: a fetch that
       skips offsets is dropped and the partition fetched again from the
       expected one (a skip seen ``MAX_REFETCH`` times in a row is taken for
       records deleted by retention, logged as an error); and a gap is never
       acknowledged for them: a missing offset stays missing;
    2. a commit goes only as far as the acknowledged offsets run without a
       hole from the committed offset (or, with none committed, from the
       first record delivered since the partition was positioned);
    3. about once a second, a commit looks for *lost* records: offsets fetched for the
       agents since the committed offset that are neither acknowledged nor
       still held by anything (a queue, a stream, an agent's batch: the
       consumer keeps each fetched record by weak reference). A loss
       seen on two rounds in a row is repaired by seeking the partition back
       to the first lost offset. What was processed already is read again and
       answered from its outcome record (``streams.pipeline.outcomes``): a duplicate of
       the same decision, never a second judgement. A hole the broker cannot
       fill (its records deleted by retention) is logged and skipped.

    So a race inside Faust costs at most a re-read, never an order; the
    commit stalls (and the lag shows it) rather than skipping a record.
    """

    _delivered: dict[TP, tuple[int, int]]  # per input partition: first and last offset handed to the agents
    _settled: dict[TP, int]  # per input partition: next offset after what _new_offset took, until it is committed
    _suspect: dict[TP, int]  # the lost offset seen on the last round (repaired if seen again)
    _expected: dict[TP, int]  # per input partition: the next offset to hand on (after a seek: where it went)
    _jumps: dict[tuple[TP, int], int]  # fetches that skipped past an expected offset, per (partition, offset)
    _fetched: dict[TP, weakref.WeakValueDictionary]  # offset -> record, while anything (a queue, an agent) holds it
    _repairs: int = 0
    _next_repair_check: float = 0.0  # monotonic time of the next scan for lost records

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._delivered = {}
        self._settled = {}
        self._suspect = {}
        self._fetched = {}
        self._expected = {}
        self._jumps = {}

    def _gapless(self, tp: TP) -> bool:
        return tp.topic not in self.app.tables.changelog_topics

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        """Faust's fetch, with each input partition handed on in offset order and without a jump.

        A record beyond the next expected offset (the fetch skipped some: a
        stale fetch after a seek, a race in the client) is not handed on; the
        partition is fetched again from the expected offset, so the agents
        see every record, in order (the monitor's baselines depend on it).
        """
        jumped: set[TP] = set()
        async for tp, message in super().getmany(timeout):
            if tp in jumped:
                continue  # the rest of that partition's batch: fetched again after the seek
            if self._gapless(tp):
                expected = self._expected.get(tp)
                if expected is not None and message.offset > expected and not self._give_up(tp, expected, message):
                    jumped.add(tp)
                    await self.seek(tp, expected)
                    continue
                if expected is None or message.offset >= expected:
                    self._expected[tp] = message.offset + 1
                self.note_fetched(tp, message)
            yield tp, message

    def _give_up(self, tp: TP, expected: int, message: Any) -> bool:
        """After a few fetches that skip the same records, take them for gone from the log (retention)."""
        key = (tp, expected)
        self._jumps[key] = tries = self._jumps.get(key, 0) + 1
        if tries <= MAX_REFETCH:
            log.warning("input %s[%d]: fetched %d while %d was expected; fetching again from %d",
                        tp.topic, tp.partition, message.offset, expected, expected)
            return False
        log.error("input %s[%d]: records %d..%d were skipped by %d fetches in a row: taken as deleted from the log "
                  "(retention); going on from %d", tp.topic, tp.partition, expected, message.offset - 1, tries,
                  message.offset)
        del self._jumps[key]
        self._committed_offset[tp] = message.offset  # nothing below it can be read any more: commits start here
        return True

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        self._expected[partition] = offset

    def note_fetched(self, tp: TP, message: Any) -> None:
        """Remember that ``message`` of an input partition was fetched (weakly: held only while others hold it)."""
        if self._gapless(tp):
            first, last = self._delivered.get(tp, (message.offset, message.offset))
            self._delivered[tp] = (min(first, message.offset), max(last, message.offset))
            self._fetched.setdefault(tp, weakref.WeakValueDictionary())[message.offset] = message

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        if not self._gapless(tp):
            await super()._add_gap(tp, offset_from, offset_to)
            return
        log.warning("input %s[%d]: records %d..%d skipped by the fetch; not acknowledged (they will be read again)",
                    tp.topic, tp.partition, offset_from, offset_to - 1)

    async def _commit_offsets(self, offsets: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            return await super()._commit_offsets(offsets, *args, **kwargs)
        finally:
            for tp in offsets:  # Faust's committed offset now stands for what _new_offset took
                self._settled.pop(tp, None)

    def _head(self, tp: TP) -> int | None:
        """The first offset of ``tp`` not yet committed, or ``None`` when unknown."""
        committed = self._committed_offset.get(tp)
        if committed is not None:
            return max(committed, self._settled.get(tp, committed))
        settled = self._settled.get(tp)
        if settled is not None:
            return settled
        delivered = self._delivered.get(tp)
        return None if delivered is None else delivered[0]

    def _new_offset(self, tp: TP) -> int | None:
        if not self._gapless(tp):
            return super()._new_offset(tp)
        acked = self._acked[tp]
        head = self._head(tp)
        if not acked or head is None:
            return None
        acked.sort()
        if acked[0] != head:
            return None  # the record at the head is not acknowledged: nothing beyond it can be committed
        run = next(consecutive_numbers(acked))
        del acked[:len(run)]
        self._acked_index[tp].difference_update(run)
        self._settled[tp] = run[-1] + 1
        return run[-1] + 1

    def lost_offsets(self) -> dict[TP, int]:
        """Per input partition, the first offset fetched for the agents that is unacknowledged and held by nothing.

        A record still in a queue or an agent's batch is alive (``_fetched``
        holds it weakly); one thrown away, skipped or dropped by Faust is not,
        and nothing will ever acknowledge it.
        """
        lost: dict[TP, int] = {}
        for tp, (_, last) in list(self._delivered.items()):
            head = self._head(tp)
            if head is None or last < head:
                continue
            acked = self._acked_index.get(tp, ())
            alive = self._fetched.get(tp, {})
            for offset in range(head, last + 1):
                if offset not in acked and alive.get(offset) is None:
                    lost[tp] = offset
                    break
        return lost

    async def commit(self, *args: Any, **kwargs: Any) -> bool:
        # Agents commit after every batch: the scan for lost records (a walk over each partition's uncommitted
        # offsets) runs at most once a REPAIR_CHECK_SECONDS, not on every one of those commits.
        now = time.monotonic()
        if self.flow_active and not self.app.rebalancing and now >= self._next_repair_check:
            self._next_repair_check = now + REPAIR_CHECK_SECONDS
            await self._repair_lost()
        return await super().commit(*args, **kwargs)

    async def _repair_lost(self) -> None:
        """Seek back a partition whose lost offset was seen on the previous round too."""
        lost = self.lost_offsets()
        suspect, self._suspect = self._suspect, dict(lost)
        for tp, offset in lost.items():
            if suspect.get(tp) != offset or tp not in self.assignment():
                continue
            self._repairs += 1
            log.warning("input %s[%d]: record %d was delivered to no agent that finished it (lost inside the "
                        "consumer); reading the partition again from there", tp.topic, tp.partition, offset)
            self._delivered.pop(tp, None)
            self._fetched.pop(tp, None)
            self._suspect.pop(tp, None)
            await self.seek(tp, offset)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        for tp in revoked:
            self._forget(tp)
        await super().on_partitions_revoked(revoked)

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:
        """Faust's fetch, asking the client for the partitions active *now* (a copy), never for every partition.

        Why: Faust hands the client thread its live set of active partitions,
        and the client waits up to ``timeout`` for records. A rebalance empties
        that set meanwhile (every partition is paused once recovery has read
        the changelogs, until the inputs are resumed), and aiokafka's
        ``fetched_records`` takes an empty set for "every partition": it
        returned the paused input partitions' records and moved past them, and
        Faust's loop threw them away as inactive, before this class saw them.
        """
        snapshot = None if active_partitions is None else set(active_partitions)
        if snapshot is not None and not snapshot:
            return {}
        return await super()._getmany(active_partitions=snapshot, timeout=timeout)

    async def perform_seek(self) -> None:
        self._delivered.clear()
        self._fetched.clear()
        self._settled.clear()
        self._suspect.clear()
        self._expected.clear()
        self._jumps.clear()
        await super().perform_seek()
        await self._rewind_uncommitted()
        for tp, committed in list(self._committed_offset.items()):
            if committed is not None and self._gapless(tp):
                self._expected[tp] = committed

    async def _rewind_uncommitted(self) -> None:
        """Put every input partition that has no committed offset back at its first record.

        Why (the two-worker stall of issue 14): Faust's seek "to the committed
        offsets" after a rebalance is what brings back the records it fetched
        and threw away during the rebalance (queues cleared, inactive
        partitions dropped). aiokafka's ``seek_to_committed`` skips a
        partition with no committed offset (or 0), so such a partition stays
        wherever the client had read to: past the dropped records, which no
        agent ever sees, and which this class cannot repair either (it never
        saw them). A group's partitions have no commit until their first
        batch is acknowledged, so a second worker joining early (the benchmark
        with ``--workers 2``) lost every order verified before it joined, and
        the first worker's monitor agent never took an event again. Reading
        such a partition again from its start repeats at most records already
        decided; each is answered from its outcome record
        (``streams.pipeline.outcomes``), never judged twice.
        """
        topics = self.app.topics
        uncommitted = [tp for tp in self.assignment()
                       if self._gapless(tp) and topics.acks_enabled_for(tp.topic) and not self._committed_offset.get(tp)]
        if not uncommitted:
            return
        await self._thread.seek_to_beginning(*(faust_driver.ensure_aiokafka_TP(tp) for tp in uncommitted))
        for tp in uncommitted:
            self._read_offset[tp] = None  # Faust's fetch loop drops offsets below its read offset
            self._expected.pop(tp, None)  # the log's first offset: taken from the first record fetched

    def _forget(self, tp: TP) -> None:
        self._expected.pop(tp, None)
        self._delivered.pop(tp, None)
        self._fetched.pop(tp, None)
        self._settled.pop(tp, None)
        self._suspect.pop(tp, None)

    @property
    def repairs(self) -> int:
        """How many lost-record repairs this consumer made (shown in the worker's /health)."""
        return self._repairs


def gapless_inputs(app: Any) -> None:
    """Give ``app`` the consumer of :class:`GaplessInputs` (before its consumer is created)."""
    app.transport.Consumer = GaplessInputs

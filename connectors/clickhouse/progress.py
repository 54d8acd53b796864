"""How far the sink has stored each topic partition, and which batch it began last: crash-exact writes.

Two small tables (``schemas/clickhouse/019_sink_progress.sql``, ``021_sink_batches.sql``), one row per topic
partition, read once when partitions are assigned and kept in memory after:

* ``sink_progress``: the highest offset whose rows are in every table. A message at or below it, re-delivered
  after a crash between a batch's inserts and its Kafka commit, is skipped (``ClickHouseSink.already_stored``).
* ``sink_batches``: the offsets of the batch the sink began, recorded before its first insert. A batch begun
  and not stored (a crash in the middle of it) is read back from Kafka and written again as the same batch
  (``streams.pipeline.sink_service.SinkService.replay_open_batches``), so its inserts repeat their
  deduplication tokens.

Both rely on a partition's offsets never going back; :meth:`SinkProgress.drop_beyond` catches the one way they
do (a topic re-created against an old store).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

#: (topic, partition) -> (first offset, last offset): the messages a batch was read from.
Extent = dict[tuple[str, int], tuple[int, int]]


def extent_of(offsets: Iterable[tuple[str, int, int]]) -> Extent:
    """Each partition's first and last offset among ``(topic, partition, offset)``."""
    extent: Extent = {}
    for topic, partition, offset in offsets:
        lo, hi = extent.get((topic, partition), (offset, offset))
        extent[(topic, partition)] = (min(lo, offset), max(hi, offset))
    return extent


def batch_id(extent: Extent) -> str:
    """A batch's id, a function of its offsets: a retry of the batch records the same one."""
    spans = ",".join(f"{t}:{p}:{lo}-{hi}" for (t, p), (lo, hi) in sorted(extent.items()))
    return hashlib.sha256(spans.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class BatchRecord:
    """A partition's latest batch, as ``sink_batches`` holds it."""

    batch_id: str
    partitions: int
    first_offset: int
    last_offset: int


@dataclass(frozen=True)
class OpenBatch:
    """A batch begun and not stored in full: see :meth:`SinkProgress.open_batches`."""

    batch_id: str
    extent: Extent
    complete: bool


class SinkProgress:
    """The two records above for one sink; not thread-safe (the sink's writing thread only)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        #: (topic, partition) -> highest offset stored in every table (``sink_progress``); None until read.
        self._stored: dict[tuple[str, int], int] | None = None
        #: (topic, partition) -> its latest batch as recorded in ``sink_batches``; None until read.
        self._batches: dict[tuple[str, int], BatchRecord] | None = None

    def forget(self) -> None:
        """Read both records again before the next use (partitions were reassigned)."""
        self._stored = None
        self._batches = None

    def stored_offset(self, topic: str, partition: int) -> int:
        """The highest offset of ``topic``/``partition`` whose rows are all stored (-1: none)."""
        if self._stored is None:
            self._stored = {(t, int(p)): int(o) for t, p, o in self.client.query(
                "SELECT topic, partition, max(stored_offset) FROM sink_progress GROUP BY topic, partition").result_rows}
        return self._stored.get((topic, partition), -1)

    def drop_beyond(self, topic: str, partition: int, end_offset: int) -> bool:
        """Forget the stored offset of a partition whose log now ends before it; True if there was one.

        ``sink_progress`` relies on a partition's offsets never going back. A topic deleted and re-created
        (or a new broker) against an old store starts again at 0: its messages would all sit "at or below"
        the old progress and be skipped as already stored, i.e. lost without a trace. A stored offset at or
        past the partition's end (``end_offset``, the next offset to be written) can only mean that, so the
        record is deleted (logged as an error) and the partition's messages are stored again; the worst left
        is the dashboards' aggregates counting an old copy, never a lost order. The partition's batch record
        (``sink_batches``) goes with it when it too reaches past the end: replayed from the new topic, its
        offsets would read other messages, which its old deduplication tokens would have ClickHouse drop.
        """
        stored = self.stored_offset(topic, partition)
        begun = self._latest_batches().get((topic, partition))
        beyond = max(stored, begun.last_offset if begun is not None else -1)
        if beyond < end_offset:
            return False
        log.error("sink_progress says %s[%d] was stored (or sink_batches, begun) up to offset %d, but the partition "
                  "ends at %d: the topic was re-created (or the broker is new) against an old store; its progress "
                  "is dropped and its messages are stored again", topic, partition, beyond, end_offset)
        for table in ("sink_progress", "sink_batches"):  # an old batch must not be replayed from the new topic
            self.client.command(f"ALTER TABLE {table} DELETE WHERE topic = %(t)s AND partition = %(p)s",
                                parameters={"t": topic, "p": partition}, settings={"mutations_sync": 2})
        if self._stored is not None:
            self._stored.pop((topic, partition), None)
        if self._batches is not None:
            self._batches.pop((topic, partition), None)
        return True

    def open_batches(self) -> list[OpenBatch]:
        """Batches begun (``sink_batches``) and not stored in full (``sink_progress``): a sink died mid-batch.

        Each is to be written again exactly as it was (``ClickHouseSink.write`` with its ``extent``), before
        anything after it, so that its inserts repeat their deduplication tokens. ``complete`` is False when a later
        batch has since overwritten one of its partitions' records (only a group of several sinks splitting
        its partitions can do that): it can no longer be re-formed exactly.
        """
        found: dict[str, tuple[int, Extent]] = {}
        for (topic, partition), rec in sorted(self._latest_batches().items()):
            found.setdefault(rec.batch_id, (rec.partitions, {}))[1][(topic, partition)] = (rec.first_offset,
                                                                                          rec.last_offset)
        return [OpenBatch(batch_id, extent, complete=len(extent) == partitions)
                for batch_id, (partitions, extent) in found.items()
                if any(hi > self.stored_offset(t, p) for (t, p), (_lo, hi) in extent.items())]

    def record_batch(self, extent: Extent) -> None:
        """Remember, in ClickHouse, the batch about to be written (before its first insert; see 021)."""
        bid = batch_id(extent)
        rows = [[t, p, bid, len(extent), lo, hi] for (t, p), (lo, hi) in sorted(extent.items())]
        self.client.insert("sink_batches", list(zip(*rows)), column_oriented=True,
                           column_names=["topic", "partition", "batch_id", "batch_partitions", "first_offset",
                                         "last_offset"])
        latest = self._latest_batches()
        for (t, p), (lo, hi) in extent.items():
            latest[(t, p)] = BatchRecord(bid, len(extent), lo, hi)

    def record_stored(self, extent: Extent) -> None:
        """Remember, in ClickHouse, the highest offset of each partition of a batch now stored in full."""
        highest = {key: hi for key, (_lo, hi) in extent.items() if hi > self.stored_offset(*key)}
        if not highest:
            return
        rows = [[t, p, o] for (t, p), o in sorted(highest.items())]
        self.client.insert("sink_progress", list(zip(*rows)), column_names=["topic", "partition", "stored_offset"],
                           column_oriented=True)
        if self._stored is not None:  # (read by stored_offset above; else the next read finds these rows)
            self._stored.update(highest)  # each above what was stored

    def _latest_batches(self) -> dict[tuple[str, int], BatchRecord]:
        if self._batches is None:
            self._batches = {(t, int(p)): BatchRecord(b, int(n), int(lo), int(hi)) for t, p, b, n, lo, hi in
                             self.client.query(
                "SELECT topic, partition, argMax(batch_id, last_offset), argMax(batch_partitions, last_offset), "
                "argMax(first_offset, last_offset), max(last_offset) FROM sink_batches "
                "GROUP BY topic, partition").result_rows}
        return self._batches

"""Per-key state in a Faust table, parsed once and written once per batch.

The table (memory store + compacted changelog) is the source of truth and
holds Avro bytes. Agents keep the parsed object next to the exact bytes it
came from: if the table value changes under it (changelog recovery after a
rebalance) the identity check fails and the value is parsed again. Changes
are written back with ``flush()`` at the end of each batch, before the
batch's outputs are flushed and its input offsets committed; in the worker
the table is a ``DurableTable``, whose ``write_durable`` waits until those
writes are on the broker.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, Callable, Generic, Iterator, MutableMapping, TypeVar

T = TypeVar("T")


class CachedTable(Generic[T]):
    def __init__(self, table: MutableMapping[bytes, bytes], load: Callable[[bytes | None, str], T],
                 dump: Callable[[T], bytes], max_entries: int = 50_000) -> None:
        self.table = table
        self.load = load
        self.dump = dump
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[bytes | None, T]] = OrderedDict()
        self._dirty: set[str] = set()

    def get(self, key: str) -> T:
        raw = self.table.get(key.encode())
        cached = self._cache.get(key)
        if cached is not None and cached[0] is raw:
            self._cache.move_to_end(key)
            return cached[1]
        value = self.load(raw, key)
        self._cache[key] = (raw, value)
        while len(self._cache) > self.max_entries:
            oldest = next(iter(self._cache))
            if oldest in self._dirty:
                break
            self._cache.popitem(last=False)
        return value

    def put(self, key: str, value: T) -> None:
        """Replace the value (written to the table at the next ``flush``)."""
        self._cache[key] = (self.table.get(key.encode()), value)
        self._cache.move_to_end(key)
        self._dirty.add(key)

    def delete(self, key: str) -> None:
        """Remove the key from the table now (a tombstone on the changelog)."""
        self._cache.pop(key, None)
        self._dirty.discard(key)
        self.table.pop(key.encode(), None)

    def mark_dirty(self, key: str) -> None:
        self._dirty.add(key)

    def forget(self, key: str) -> None:
        """Drop a parsed value that a failure may have left half-updated (the table keeps the last good one)."""
        self._cache.pop(key, None)
        self._dirty.discard(key)

    def flush(self) -> int:
        for key in self._dirty:
            value = self._cache[key][1]
            raw = self.dump(value)
            self.table[key.encode()] = raw
            self._cache[key] = (raw, value)
        n = len(self._dirty)
        self._dirty.clear()
        return n

    def keys(self) -> Iterator[str]:
        """Keys held by this worker's table (its partitions), for sweeps such as re-verification."""
        for k in list(self.table.keys()):
            yield k.decode() if isinstance(k, bytes) else str(k)


class DurableTable(MutableMapping[bytes, bytes]):
    """A Faust table whose writes go to its changelog only at ``write_durable``, which waits for the broker.

    Faust's ``Table.__setitem__`` sends the changelog record through its
    producer buffer and drops the delivery future, and its producer
    ``flush()`` may return before the buffer is empty (it gives up after
    0.1 s without progress). The worker must know the state is on the broker
    before it publishes the outputs that state records (``streams.pipeline.app``), so
    writes land in the table's local store at once (reads see them) and their
    changelog records are sent, and awaited, together.
    """

    def __init__(self, table: Any, publisher: Callable[[], Any] | None = None) -> None:
        self.table = table
        self._unsent: dict[bytes, bytes | None] = {}
        #: Makes this table's own confluent-kafka producer (``connectors.kafka.io.Publisher``) at the first
        #: write; None: through Faust's aiokafka producer (see ``write_durable``).
        self._make_publisher = publisher
        self._publisher: Any = None

    def __getitem__(self, key: bytes) -> bytes:
        return self.table[key]

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.table.data[key] = value
        self._unsent[key] = value

    def __delitem__(self, key: bytes) -> None:
        del self.table.data[key]
        self._unsent[key] = None  # a tombstone

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def unsent(self) -> int:
        """Changed keys whose changelog records are not sent yet."""
        return len(self._unsent)

    async def write_durable(self) -> int:
        """Send every changed key's changelog record and wait until the broker acknowledged each; returns how many.

        The records are what Faust's own ``send_changelog`` builds (partition
        chosen by the producer's murmur2 partitioner, the table's serializers
        and its ``_on_changelog_sent`` callback), but they are handed to the
        producer here, one after another, instead of through Faust's
        ``ProducerBuffer``. That buffer sends one message per event-loop round,
        and each round also runs a slice of the other agents' work: a batch
        that changed 1,000 registrants waited 0.3-3 s for its state on a busy
        worker. The futures resolve on delivery (``acks=-1``) and raise if it
        failed, in which case the records stay owed and the caller's batch is
        not acknowledged.
        """
        if self._make_publisher is not None:
            return await self._write_through_publisher()
        unsent, self._unsent = self._unsent, {}
        futures = []
        table = self.table
        topic = table.changelog_topic
        try:
            for key, value in unsent.items():
                fut = topic.as_future_message(
                    key=key, value=value, partition=table.partition_for_key(key),
                    key_serializer=table.key_serializer,
                    value_serializer="raw" if value is None else table.value_serializer,
                    callback=table._on_changelog_sent,  # noqa: SLF001 - what send_changelog registers
                    eager_partitioning=True)
                ttl = table._maybe_set_key_ttl if value is not None else table._maybe_del_key_ttl
                ttl(key, fut.message.partition)  # noqa: SLF001 - what on_key_set/on_key_del do (windowed tables)
                await topic.publish_message(fut, wait=False)  # into the producer's batch; no loop round per record
                futures.append(fut)
            await asyncio.gather(*futures)
        except BaseException:
            self._unsent = {**unsent, **self._unsent}
            raise
        return len(futures)

    async def _write_through_publisher(self) -> int:
        """``write_durable`` through this table's own confluent-kafka producer, flushed: on the broker when it returns.

        Why not Faust's producer: aiokafka builds every produce request in
        Python on the worker's event loop, ~12 % of a saturated worker's time in
        its profile (the state records are the worker's largest messages);
        librdkafka batches and sends them from its own threads. The records are
        the same: the changelog topic Faust reads back on recovery, the key's
        partition by murmur2 (``use_partitioner`` tables; librdkafka's
        ``murmur2_random`` is the Java and aiokafka partitioner for a keyed
        record), the value or a tombstone. The producer is this table's alone,
        so a flush that returns means *these* records were delivered: a failure
        raises, the records stay owed and the batch is not acknowledged.
        """
        unsent, self._unsent = self._unsent, {}
        if not unsent:
            return 0
        if self._publisher is None and self._make_publisher is not None:
            self._publisher = self._make_publisher()
        topic = self.table.changelog_topic.get_topic_name()
        try:
            for key, value in unsent.items():
                self._publisher.publish(topic, key, value)  # None: a tombstone
            await self._publisher.flush_async()
        except BaseException:
            self._unsent = {**unsent, **self._unsent}
            raise
        return len(unsent)

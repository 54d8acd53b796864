"""A worker table without Faust: a dict of the assigned partitions' keys, its changes made durable per batch.

The confluent-kafka runtime (``streams.pipeline.kafka_worker``) keeps each
processor's state here. It holds the same records, in the same changelog
topic, as the Faust table of the same name (``streams.pipeline.wiring.TABLES``):
keyed by the table key, on the key's murmur2 partition (the partitioner of
every producer in the project), raw Avro bytes or a tombstone. A worker can
therefore change runtime and find its state.

Lifecycle: ``restore`` loads a partition when the worker is given the
co-partitioned input; writes go to the dict at once (reads see them) and to
the changelog at ``write_durable``, which returns once the broker has them;
``drop`` forgets a partition the worker no longer owns.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping

from connectors.kafka.io import Publisher, key_partition

#: Reads (partition, key, value or None) records of a topic's partitions to their end (``connectors.kafka.changelog``).
Reader = Callable[[str, Iterable[int]], Iterable[tuple[int, bytes, "bytes | None"]]]


class ChangelogTable(MutableMapping[bytes, bytes]):
    """One table's keys in this worker's partitions; see the module docstring."""

    def __init__(self, topic: str, partitions: int, publisher: Publisher) -> None:
        self.topic = topic
        self.partitions = partitions
        self.publisher = publisher  # shared by the worker's tables: one flush covers a batch's state
        self.data: dict[bytes, bytes] = {}
        self._unsent: dict[bytes, bytes | None] = {}

    def __getitem__(self, key: bytes) -> bytes:
        return self.data[key]

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        return self.data.get(key, default)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.data[key] = value
        self._unsent[key] = value

    def __delitem__(self, key: bytes) -> None:
        del self.data[key]
        self._unsent[key] = None  # a tombstone

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def unsent(self) -> int:
        """Changed keys whose changelog records are not sent yet."""
        return len(self._unsent)

    def send(self) -> int:
        """Hand every changed key's record to the shared producer; the caller flushes it (``write_durable``).

        Should producing fail, the records stay owed (the batch is then not
        committed, and a restarted worker decides it again).
        """
        unsent, self._unsent = self._unsent, {}
        try:
            for key, value in unsent.items():
                self.publisher.publish(self.topic, key, value)  # type: ignore[arg-type] - None: a tombstone
        except BaseException:
            self._unsent = {**unsent, **self._unsent}
            raise
        return len(unsent)

    async def write_durable(self) -> int:
        """Send the changed keys and wait until the broker acknowledged them (``acks=all``).

        If the flush fails, the records stay owed (sent again by the next write).
        """
        owed = dict(self._unsent)
        n = self.send()
        if n:
            try:
                await self.publisher.flush_async()
            except BaseException:
                self._unsent = {**owed, **self._unsent}
                raise
        return n

    def partition_of(self, key: bytes) -> int:
        """The changelog (and input) partition of ``key``: Java-compatible murmur2, as every producer here."""
        return key_partition(key, self.partitions)

    def restore(self, partitions: Iterable[int], read: Reader) -> int:
        """Load ``partitions`` from the changelog (latest value per key, tombstones removing); returns keys loaded."""
        wanted = set(partitions)
        self.drop(wanted)  # whatever was here is older than the changelog
        loaded = 0
        for _partition, key, value in read(self.topic, sorted(wanted)):
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value
                loaded += 1
        return loaded

    def drop(self, partitions: Iterable[int]) -> int:
        """Forget the keys of ``partitions`` (revoked: another worker owns them now); returns how many."""
        gone = set(partitions)
        keys = [k for k in self.data if self.partition_of(k) in gone]
        for key in keys:
            del self.data[key]
        return len(keys)

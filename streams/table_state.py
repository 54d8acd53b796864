"""Per-key state in a Faust table, parsed once and written once per batch.

The table (memory store + compacted changelog) is the source of truth and
holds Avro bytes. Agents keep the parsed object next to the exact bytes it
came from: if the table value changes under it (changelog recovery after a
rebalance) the identity check fails and the value is parsed again. Changes
are written back with ``flush()`` at the end of each batch, before the
batch's outputs are flushed and its input offsets committed.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Iterator, MutableMapping, TypeVar

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

"""The confluent-kafka runtime's tables: what a worker writes is what the next owner of a partition restores.

``ChangelogTable`` (``streams.pipeline.changelog_table``) over an in-memory
producer; the reader hands back the delivered changelog records of the
partitions asked for, in order, as ``connectors.kafka.changelog.read_to_end``
does from the broker.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from connectors.kafka.io import DeliveryFailed
from connectors.kafka.testing import MemoryPublisher, partition_for
from streams.pipeline.changelog_table import ChangelogTable

TOPIC = "csos-test-som-registrant-state-changelog"
PARTITIONS = 4


def reader(publisher: MemoryPublisher):
    def read(topic: str, partitions: Iterable[int]):
        wanted = set(partitions)
        return [(m.partition_, m.key_, m.value_) for m in publisher.delivered
                if m.topic_ == topic and m.partition_ in wanted]
    return read


def keys_by_partition(n: int) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    for i in range(n):
        key = f"AB{i:07d}".encode()
        out[partition_for(key, PARTITIONS)].append(key)
    return out


def written_table() -> tuple[MemoryPublisher, ChangelogTable, dict[int, list[bytes]]]:
    pub = MemoryPublisher(partitions=PARTITIONS)
    table = ChangelogTable(TOPIC, PARTITIONS, pub)
    keys = keys_by_partition(40)
    for p, ks in keys.items():
        for k in ks:
            table[k] = b"v1-" + k
    asyncio.run(table.write_durable())
    return pub, table, keys


def test_partition_of_is_the_producers_partition() -> None:
    pub, table, keys = written_table()
    for p, ks in keys.items():
        assert {table.partition_of(k) for k in ks} <= {p}
    assert {m.partition_ for m in pub.delivered if m.key_ in keys[2]} == {2}


def test_a_new_owner_restores_exactly_the_partitions_it_is_given() -> None:
    pub, old, keys = written_table()
    old[keys[1][0]] = b"v2"  # the latest value wins
    del old[keys[1][1]]  # a tombstone removes the key
    asyncio.run(old.write_durable())
    new = ChangelogTable(TOPIC, PARTITIONS, MemoryPublisher(partitions=PARTITIONS))
    loaded = new.restore([1, 3], reader(pub))
    assert set(new) == (set(keys[1]) - {keys[1][1]}) | set(keys[3])
    assert new[keys[1][0]] == b"v2" and new[keys[3][0]] == b"v1-" + keys[3][0]
    assert loaded >= len(new)


def test_restore_replaces_what_the_table_held_for_those_partitions() -> None:
    pub, table, keys = written_table()
    table.data[keys[0][0]] = b"stale"  # e.g. left from before the partition moved away and back
    table.data[b"never-written"] = b"x"  # on the changelog nowhere: gone only if its partition is restored
    table.restore([0], reader(pub))
    assert table[keys[0][0]] == b"v1-" + keys[0][0]
    assert (b"never-written" in table) == (table.partition_of(b"never-written") != 0)


def test_drop_forgets_only_the_revoked_partitions() -> None:
    _pub, table, keys = written_table()
    assert table.drop([2]) == len(keys[2])
    assert set(table) == set(keys[0]) | set(keys[1]) | set(keys[3])


def test_state_is_owed_until_the_broker_has_it() -> None:
    pub = MemoryPublisher(partitions=PARTITIONS, fail_flush=True)
    table = ChangelogTable(TOPIC, PARTITIONS, pub)
    table[b"AB0000001"] = b"v"
    with pytest.raises(DeliveryFailed):
        asyncio.run(table.write_durable())
    assert table.unsent == 1  # the batch is not committed; its records are sent again with the next write
    pub.fail_flush = False
    assert asyncio.run(table.write_durable()) == 1 and table.unsent == 0
    assert [m.key_ for m in pub.delivered] == [b"AB0000001"]

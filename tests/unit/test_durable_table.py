"""DurableTable through its own producer: what reaches the changelog, and what a failed delivery leaves owed."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from connectors.kafka.io import DeliveryFailed
from streams.pipeline.table_state import DurableTable

CHANGELOG = "csos-som-som-registrant-state-changelog"


class Table:
    """What DurableTable reads of a Faust table: its local store and its changelog topic's name."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.changelog_topic = SimpleNamespace(get_topic_name=lambda: CHANGELOG)

    def __getitem__(self, key: bytes) -> bytes:
        return self.data[key]

    def __iter__(self) -> Any:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class Producer:
    """Delivers at flush; ``fail_next`` makes the next flush report a failed delivery."""

    def __init__(self) -> None:
        self.broker: list[tuple[str, bytes, bytes | None]] = []
        self.queued: list[tuple[str, bytes, bytes | None]] = []
        self.fail_next = False
        self.flushes = 0

    def publish(self, topic: str, key: bytes, value: bytes | None) -> None:
        self.queued.append((topic, key, value))

    async def flush_async(self, timeout: float = 60.0) -> None:
        self.flushes += 1
        queued, self.queued = self.queued, []
        if self.fail_next:
            self.fail_next = False
            raise DeliveryFailed(f"{CHANGELOG}: Broker: Not enough in-sync replicas")
        self.broker += queued


def durable() -> tuple[DurableTable, list[Producer]]:
    made: list[Producer] = []

    def make() -> Producer:
        made.append(Producer())
        return made[-1]
    return DurableTable(Table(), make), made


def test_changed_keys_reach_the_changelog_once_each_with_tombstones_and_are_readable_at_once() -> None:
    table, made = durable()
    table[b"PC1"] = b"v1"
    table[b"PC1"] = b"v2"  # written twice in the batch: one record, the last value
    table[b"PC2"] = b"w1"
    del table[b"PC2"]  # gone: a tombstone, so that compaction forgets it
    assert table[b"PC1"] == b"v2" and table.unsent == 2  # the store has it before the changelog does
    assert not made  # no producer until there is something to write

    assert asyncio.run(table.write_durable()) == 2
    assert made[0].broker == [(CHANGELOG, b"PC1", b"v2"), (CHANGELOG, b"PC2", None)]
    assert asyncio.run(table.write_durable()) == 0 and made[0].flushes == 1  # nothing owed: no round trip
    assert len(made) == 1


def test_a_failed_delivery_raises_and_the_records_stay_owed_until_delivered() -> None:
    table, made = durable()
    table[b"PC1"] = b"v1"
    asyncio.run(table.write_durable())
    made[0].fail_next = True
    table[b"PC1"] = b"v2"
    with pytest.raises(DeliveryFailed):  # the caller's batch is not acknowledged
        asyncio.run(table.write_durable())
    assert table.unsent == 1
    table[b"PC3"] = b"x1"
    assert asyncio.run(table.write_durable()) == 2
    assert made[0].broker[1:] == [(CHANGELOG, b"PC1", b"v2"), (CHANGELOG, b"PC3", b"x1")]

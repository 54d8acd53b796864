"""Crash-safe outcomes (issue 10): a kill -9 at any point of a batch changes no order's outcome.

A worker is simulated without a broker: the real processors and the real
batch step (``streams.pipeline.app.decide_batch``, the one the Faust agents run) over
a ``DurableTable`` whose Faust table is a stand-in keeping what the "broker"
acknowledged (its changelog, from which a restarted worker recovers), and a
publisher that records what was delivered. A crash is a worker thrown away
at a chosen step; the restarted worker gets the same batch again (its
offsets were not committed), as Kafka redelivers it.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from connectors.kafka.io import DeliveryFailed
from connectors.kafka import catalogue as t
from streams.pipeline.agents.cases import CaseProcessor
from streams.pipeline.agents.monitor import MonitorProcessor
from streams.pipeline.agents.verify import VerifyProcessor
from streams.pipeline.app import decide_batch
from streams.core.avro_codec import default_codec
from connectors.kafka.emit import Emitter
from streams.monitoring import Monitor
from streams.pipeline.table_state import DurableTable
from tests.unit.test_agents_hostile import (  # noqa: F401 - pki, cred, verifier are fixtures
    DEA, NOW, SUPPLIER, cred, make_order, message, pki, signature, verifier,
)
from tests.unit.test_monitoring import order as verified_order
from tests.unit.test_verification import PRODUCTS

codec = default_codec()
MON_DEA = "BP1234563"
RECEIVED_AT = NOW - timedelta(minutes=59)  # the broker's append time of every test message


# ---------------------------------------------------------------------------- a broker stand-in
class _Future(asyncio.Future):  # type: ignore[type-arg]
    message: Any


class FakeFaustTable:
    """The parts of a Faust table ``DurableTable`` uses; ``broker`` is the acknowledged changelog (compacted)."""

    def __init__(self, broker: dict[bytes, bytes], ops: list[tuple[str, Any]], *, fail: bool = False) -> None:
        self.broker, self.ops, self.fail = broker, ops, fail
        self.data: dict[bytes, bytes] = dict(broker)  # a restarted worker recovers the table from its changelog

    def __getitem__(self, key: bytes) -> bytes:
        return self.data[key]

    def __iter__(self) -> Any:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def partition_for_key(self, key: bytes) -> None:
        return None

    key_serializer = value_serializer = None

    def _on_changelog_sent(self, fut: _Future) -> None:
        pass

    @property
    def changelog_topic(self) -> "FakeChangelogTopic":
        return FakeChangelogTopic(self)

    def _maybe_set_key_ttl(self, key: bytes, partition: int) -> None:
        pass

    _maybe_del_key_ttl = _maybe_set_key_ttl


class FakeChangelogTopic:
    """The two calls ``DurableTable.write_durable`` makes on the changelog topic: build a record, hand it over."""

    def __init__(self, table: FakeFaustTable) -> None:
        self.table = table

    def as_future_message(self, *, key: bytes, value: bytes | None, **_: Any) -> _Future:
        fut = _Future()
        fut.message = SimpleNamespace(partition=0, key=key, value=value)
        return fut

    async def publish_message(self, fut: _Future, wait: bool = False) -> None:
        table, key, value = self.table, fut.message.key, fut.message.value
        if table.fail:  # the worker dies before the broker has it
            fut.set_exception(ConnectionError("killed before the changelog was acknowledged"))
            return
        if value is None:
            table.broker.pop(key, None)
        else:
            table.broker[key] = value
        table.ops.append(("state acked", key))
        fut.set_result(None)


class FakePublisher:
    """Delivers at ``flush``; with ``fail`` the worker dies first and what it produced is lost."""

    def __init__(self, delivered: list[tuple[str, bytes | None, bytes]], ops: list[tuple[str, Any]], *,
                 fail: bool = False) -> None:
        self.delivered, self.ops, self.fail = delivered, ops, fail
        self.produced: list[tuple[str, bytes | None, bytes]] = []

    def publish(self, topic: str, key: bytes | str | None, value: bytes) -> None:
        self.ops.append(("publish", topic))
        self.produced.append((topic, key.encode() if isinstance(key, str) else key, value))

    def flush(self, timeout: float = 60.0) -> None:
        if self.fail:
            raise DeliveryFailed("killed before the outputs were delivered")
        self.delivered.extend(self.produced)
        self.produced = []

    async def flush_async(self, timeout: float = 60.0) -> None:
        self.flush(timeout)


class Cluster:
    """The broker: the agent's changelog and the messages delivered to its output topics."""

    def __init__(self) -> None:
        self.changelog: dict[bytes, bytes] = {}
        self.delivered: list[tuple[str, bytes | None, bytes]] = []
        self.ops: list[tuple[str, Any]] = []

    def worker(self, make: Callable[[DurableTable, Emitter], Any], *, state_fails: bool = False,
               publish_fails: bool = False) -> "Worker":
        return Worker(self, make, state_fails=state_fails, publish_fails=publish_fails)

    def topic(self, name: str) -> list[tuple[bytes | None, bytes]]:
        return [(k, v) for tp, k, v in self.delivered if tp == name]


class Worker:
    """One worker process: its processor, over the table recovered from the changelog."""

    def __init__(self, cluster: Cluster, make: Callable[[DurableTable, Emitter], Any], *, state_fails: bool,
                 publish_fails: bool) -> None:
        self.publisher = FakePublisher(cluster.delivered, cluster.ops, fail=publish_fails)
        self.table = DurableTable(FakeFaustTable(cluster.changelog, cluster.ops, fail=state_fails))
        self.proc = make(self.table, Emitter(self.publisher, "agent", buffered=True))  # type: ignore[arg-type]

    def batch(self, events: list[Any]) -> None:
        asyncio.run(decide_batch(self.proc, self.table, events))


def event(topic: str, offset: int, key: str, value: bytes, partition: int = 0) -> Any:
    return SimpleNamespace(message=SimpleNamespace(topic=topic, partition=partition, offset=offset, key=key.encode(),
                                                   value=value, timestamp_type=1,
                                                   timestamp=RECEIVED_AT.timestamp()))


def decisions(cluster: Cluster) -> dict[str, set[tuple[int, str]]]:
    """Order id -> the (decision_version, HOLD|RELEASE) pairs downstream saw on som.hold / som.release."""
    seen: dict[str, set[tuple[int, str]]] = defaultdict(set)
    for topic, kind in ((t.HOLD, "HOLD"), (t.RELEASE, "RELEASE")):
        for _, value in cluster.topic(topic):
            rec = codec.decode(value)[1]
            seen[rec["order_id"]].add((rec["decision_version"], kind))
    return seen


def assert_no_contradiction(cluster: Cluster) -> None:
    """The downstream contract: per order id and decision version, one decision (duplicates allowed)."""
    for oid, pairs in decisions(cluster).items():
        versions = [v for v, _ in pairs]
        assert len(versions) == len(set(versions)), f"order {oid}: contradicting decisions {sorted(pairs)}"


# ---------------------------------------------------------------------------- the monitor
def monitor(table: DurableTable, emitter: Emitter) -> MonitorProcessor:
    return MonitorProcessor(Monitor(), table, emitter)


def monitor_feed() -> list[Any]:
    """A steady registrant (42 released orders), a spike (held) and two more normal orders, as one batch.

    The spike is a first-ever high-risk family, so its open case holds later orders of that family only
    and the two normal OXYCODONE orders are released (the open-case rule: tests/unit/test_open_cases.py).
    """
    start = NOW - timedelta(days=130)
    orders = [verified_order(MON_DEA, start + timedelta(days=3 * i), {"OXYCODONE": 380 + (i % 5) * 10})
              for i in range(42)]
    orders.append(verified_order(MON_DEA, NOW - timedelta(days=2), {"FENTANYL": 4000}))
    orders += [verified_order(MON_DEA, NOW - timedelta(days=1, hours=h), {"OXYCODONE": 400}) for h in (2, 1)]
    return [event(t.VERIFIED, i, MON_DEA, codec.encode("csos.orders.VerifiedOrder", o)) for i, o in enumerate(orders)]


def state_of(cluster: Cluster, key: str = MON_DEA) -> dict[str, Any]:
    return codec.decode(cluster.changelog[key.encode()])[1]


def test_state_is_on_the_broker_before_any_output_is_published() -> None:
    """Crash point (a): outputs out, state lost, cannot happen: no publish precedes the changelog's acknowledgement."""
    cluster = Cluster()
    cluster.worker(monitor).batch(monitor_feed())
    kinds = [op for op, _ in cluster.ops]
    assert "state acked" in kinds and "publish" in kinds
    assert max(i for i, k in enumerate(kinds) if k == "state acked") < kinds.index("publish")


def test_a_crash_before_the_state_is_acknowledged_publishes_nothing_and_the_retry_decides_the_same() -> None:
    """Crash point (a'): killed while writing state: nothing of the batch is out; redelivered, it is decided anew."""
    feed = monitor_feed()
    clean = Cluster()
    clean.worker(monitor).batch(feed)

    cluster = Cluster()
    with pytest.raises(ConnectionError):
        cluster.worker(monitor, state_fails=True).batch(feed)
    assert cluster.delivered == [] and cluster.changelog == {} and ("publish", t.VERDICTS) not in cluster.ops
    cluster.worker(monitor).batch(feed)  # restarted, the same batch
    assert decisions(cluster) == decisions(clean)
    assert state_of(cluster)["total_orders"] == state_of(clean)["total_orders"] == 44


def test_state_written_outputs_lost_the_redelivery_publishes_the_identical_bytes() -> None:
    """Crash point (b): the state is durable, the outputs never left: the restarted worker sends those exact bytes."""
    cluster, feed = Cluster(), monitor_feed()
    dead = cluster.worker(monitor, publish_fails=True)
    with pytest.raises(DeliveryFailed):
        dead.batch(feed)
    lost = dead.publisher.produced
    assert cluster.delivered == [] and cluster.changelog  # state durable, no output delivered
    learned = state_of(cluster)

    cluster.worker(monitor).batch(feed)
    assert cluster.delivered == lost  # byte for byte, in order: verdicts, holds, releases, audit events
    assert state_of(cluster) == learned  # nothing learned twice, nothing judged again
    assert_no_contradiction(cluster)


def test_outputs_and_state_written_offsets_not_committed_only_identical_duplicates() -> None:
    """Crash point (c): all done but the commit: redelivered, the batch repeats its outputs and learns nothing."""
    cluster, feed = Cluster(), monitor_feed()
    cluster.worker(monitor).batch(feed)
    first = list(cluster.delivered)
    state = dict(cluster.changelog)
    held = [codec.decode(v)[1]["order_id"] for _, v in cluster.topic(t.HOLD)]
    assert len(held) == 1

    cluster.ops.clear()
    cluster.worker(monitor).batch(feed)
    assert cluster.delivered == first + first  # duplicates of the same messages (same event ids, same decision ids)
    assert cluster.changelog == state and ("state acked", MON_DEA.encode()) not in cluster.ops
    assert [codec.decode(v)[1]["order_id"] for _, v in cluster.topic(t.HOLD)] == held * 2
    assert {codec.decode(v)[1]["decision_id"] for _, v in cluster.topic(t.HOLD)} == {
        codec.decode(cluster.topic(t.HOLD)[0][1])[1]["decision_id"]}
    assert_no_contradiction(cluster)


def test_an_upstream_duplicate_after_the_commit_is_neither_judged_nor_learned_again() -> None:
    """Crash point (d): the verify agent re-sent orders after its crash; the monitor reads them at new offsets."""
    cluster, feed = Cluster(), monitor_feed()
    worker = cluster.worker(monitor)
    worker.batch(feed)
    before = state_of(cluster)
    assert any(o["outputs"] for o in before["outcomes"].values())  # kept while a redelivery is possible
    worker.proc.outcomes.set_committed({(t.VERIFIED, 0): len(feed)})  # the batch is committed
    n = len(cluster.delivered)

    # the first order (learned long before the last 8) and the held spike, again, at new offsets; and a new order
    fresh = verified_order(MON_DEA, NOW - timedelta(hours=2), {"OXYCODONE": 400})
    again = [event(t.VERIFIED, len(feed) + i, MON_DEA, e.message.value) for i, e in enumerate((feed[0], feed[42]))]
    worker.batch(again + [event(t.VERIFIED, len(feed) + 2, MON_DEA,
                                codec.encode("csos.orders.VerifiedOrder", fresh))])
    new = cluster.delivered[n:]
    audits = [codec.decode(v)[1] for tp, _, v in new if tp == t.AUDIT]
    ignored = [a["order_id"] for a in audits if a["action"] == "order.redelivery_ignored"]
    dup_ids = [codec.decode(e.message.value)[1]["order_id"] for e in again]
    assert ignored == dup_ids
    assert [codec.decode(v)[1]["order_id"] for tp, _, v in new if tp == t.VERDICTS] == [fresh["order_id"]]
    after = state_of(cluster)
    assert after["total_orders"] == before["total_orders"] + 1  # only the new order was learned
    assert not any(o["outputs"] for oid, o in after["outcomes"].items() if oid != fresh["order_id"])  # pruned
    assert_no_contradiction(cluster)


def test_old_state_without_outcomes_is_read_and_gains_them() -> None:
    """State written before issue 10 (RegistrantState v3, no outcomes) still loads; the next write adds them."""
    from streams.core.avro_codec import SchemaCatalog, SCHEMA_DIR
    old = next(s for s in SchemaCatalog(SCHEMA_DIR).by_fingerprint.values()
               if s.source.name == "som.state.RegistrantState.v3.avsc")
    base = Monitor().baselines(None, MON_DEA).to_state()
    base.pop("outcomes")
    cluster = Cluster()
    cluster.changelog[MON_DEA.encode()] = codec.encode_with(old, base)
    cluster.worker(monitor).batch(monitor_feed()[:1])
    assert len(state_of(cluster)["outcomes"]) == 1


# ---------------------------------------------------------------------------- the verify agent
def verify(verifier_: Any) -> Callable[[DurableTable, Emitter], VerifyProcessor]:
    def make(table: DurableTable, emitter: Emitter) -> VerifyProcessor:
        return VerifyProcessor(verifier_, PRODUCTS, emitter, table, suppliers={SUPPLIER.dea_number})
    return make


def verdicts(cluster: Cluster) -> list[tuple[str, str]]:
    out = []
    for topic, _, value in cluster.delivered:
        if topic in (t.VERIFIED, t.REJECTED):
            rec = codec.decode(value)[1]
            out.append((rec["order_id"], rec.get("reason_code") or "VERIFIED"))
    return out


def test_verify_a_redelivered_order_is_never_rejected_as_a_replay_of_itself(verifier: Any, cred: Any) -> None:
    """(b) and (e): state durable, outputs lost -> the same VERIFIED bytes; a new order id with that number: replay."""
    sig = signature(make_order(21), cred)
    order = event(t.RECEIVED, 0, DEA, message(sig, order_id="order-21", received_at=RECEIVED_AT))
    cluster = Cluster()
    dead = cluster.worker(verify(verifier), publish_fails=True)
    with pytest.raises(DeliveryFailed):
        dead.batch([order])
    lost = dead.publisher.produced

    worker = cluster.worker(verify(verifier))
    worker.batch([order])  # redelivered after the crash
    assert cluster.delivered == lost and verdicts(cluster) == [("order-21", "VERIFIED")]
    worker.batch([order])  # and again (offset still not committed): a duplicate of the same decision
    assert verdicts(cluster) == [("order-21", "VERIFIED")] * 2

    worker.proc.outcomes.set_committed({(t.RECEIVED, 0): 1})
    replay = event(t.RECEIVED, 1, DEA, message(sig, order_id="order-21b", received_at=RECEIVED_AT))
    upstream_dup = event(t.RECEIVED, 2, DEA, order.message.value)
    worker.batch([replay, upstream_dup])
    assert verdicts(cluster)[2:] == [("order-21b", "DUPLICATE_ORDER_NUMBER")]  # a true replay still refused
    ignored = [codec.decode(v)[1] for tp, _, v in cluster.delivered if tp == t.AUDIT]
    assert [a["order_id"] for a in ignored if a["action"] == "order.redelivery_ignored"] == ["order-21"]
    outcomes = codec.decode(cluster.changelog[DEA.encode()])[1]["outcomes"]
    assert {oid: o["decision"] for oid, o in outcomes.items()} == {
        "order-21": "VERIFIED", "order-21b": "REJECTED:DUPLICATE_ORDER_NUMBER"}


# ---------------------------------------------------------------------------- the case agent
def test_case_opened_once_and_its_event_repeated_byte_for_byte_after_a_crash() -> None:
    hold = {"order_id": "order-31", "order_number": "26X000031", "purchaser_dea": MON_DEA,
            "held_at": datetime.fromtimestamp(NOW.timestamp(), NOW.tzinfo), "reasons": [], "summary": "Held.",
            "order": None}
    raw = codec.encode("som.Hold", hold)
    cluster = Cluster()
    dead = cluster.worker(lambda table, em: CaseProcessor(table, em), publish_fails=True)
    with pytest.raises(DeliveryFailed):
        dead.batch([event(t.HOLD, 0, "order-31", raw)])
    lost = dead.publisher.produced
    assert [tp for tp, _, _ in lost] == [t.CASES, t.AUDIT]

    worker = cluster.worker(lambda table, em: CaseProcessor(table, em))
    worker.batch([event(t.HOLD, 0, "order-31", raw)])
    assert cluster.delivered == lost  # the OPENED event, its id and due date unchanged: one case
    worker.batch([event(t.HOLD, 1, "order-31", raw)])  # the monitor's duplicate at a new offset
    assert cluster.topic(t.CASES) == [(b"order-31", lost[0][2])]

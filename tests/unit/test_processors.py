"""The processor interface (``streams.pipeline.processor``), exercised on the three real processors without a broker.

Each processor takes ``InputMessage``s inside ``begin_batch``/``end_batch``,
writes through a buffered ``Emitter`` over the in-memory publisher
(``connectors.kafka.testing``), decodes as a visible ok/error step and owns
its counters. Messages one processor publishes are read back and handed to
the next, as the topics would.
"""
from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from connectors.kafka import catalogue as t
from connectors.kafka.emit import Emitter
from connectors.kafka.testing import MemoryMessage, MemoryPublisher
from streams.core.avro_codec import default_codec
from streams.monitoring import Monitor
from streams.pipeline.agents.cases import CaseProcessor
from streams.pipeline.agents.monitor import MonitorProcessor
from streams.pipeline.agents.verify import VerifyProcessor
from streams.pipeline.processor import InputMessage, Processor, decode
from streams.verification import Verifier
from tests.unit.test_agents_hostile import (  # noqa: F401 - pki, cred, verifier are fixtures
    DEA, NOW, SUPPLIER, cred, make_order, message, pki, signature, verifier,
)
from tests.unit.test_cases import a_hold
from tests.unit.test_verification import PRODUCTS

codec = default_codec()


def buffered(pub: MemoryPublisher, actor: str) -> Emitter:
    return Emitter(pub, actor, buffered=True)  # type: ignore[arg-type]


def processors(verifier: Verifier, pub: MemoryPublisher) -> dict[str, Any]:
    return {
        "verify": VerifyProcessor(verifier, PRODUCTS, buffered(pub, "verify-agent"), {},
                                  suppliers={SUPPLIER.dea_number}),
        "monitor": MonitorProcessor(Monitor(), {}, buffered(pub, "monitor-agent")),
        "case": CaseProcessor({}, buffered(pub, "case-agent")),
    }


def batch(proc: Processor, *messages: InputMessage) -> None:
    """One batch as the agent loop runs it; the buffered outputs are published at its end."""
    proc.begin_batch()
    for m in messages:
        proc.handle(m)
    proc.end_batch()
    asyncio.run(proc.emitter.publish_pending())


def as_input(m: MemoryMessage) -> InputMessage:
    """A published message as the next agent receives it."""
    return InputMessage(m.topic(), m.partition(), m.offset(), m.key(), m.value())


INPUT_TOPIC = {"verify": t.RECEIVED, "monitor": t.VERIFIED, "case": t.HOLD}


def test_every_processor_has_the_interface(verifier: Verifier) -> None:
    procs = processors(verifier, MemoryPublisher())
    assert all(isinstance(p, Processor) for p in procs.values())
    assert {name: p.stage for name, p in procs.items()} == {"verify": "verify", "monitor": "monitor", "case": "case"}


def test_decoding_is_an_ok_or_error_result_that_emits_nothing() -> None:
    hold = a_hold()
    good = InputMessage(t.HOLD, 0, 0, b"k", codec.encode("som.Hold", hold))
    ok = decode(codec, good, "som.Hold")
    assert ok.ok and ok.schema == "som.Hold" and ok.record["order_id"] == hold["order_id"]
    garbage = decode(codec, InputMessage(t.HOLD, 0, 1, b"k", b"\x00 not avro"), "som.Hold")
    assert not garbage.ok and garbage.record is None and garbage.error.startswith("undecodable Hold: ")
    other = decode(codec, good, ("som.Decision", "som.Release"), label="case input")
    assert other.error == "undecodable case input: expected one of som.Decision, som.Release, got som.Hold"


@pytest.mark.parametrize("name", ["verify", "monitor", "case"])
def test_an_undecodable_message_takes_the_error_branch(verifier: Verifier, name: str) -> None:
    pub = MemoryPublisher()
    proc = processors(verifier, pub)[name]
    batch(proc, InputMessage(INPUT_TOPIC[name], 0, 7, b"k", b"\x00 not avro"))
    [dead] = pub.records(t.DLQ)
    assert (dead["stage"], dead["source_topic"], dead["source_offset"]) == (name, INPUT_TOPIC[name], 7)
    assert dead["reason"].startswith("undecodable ")
    assert pub.topics() == [t.DLQ, t.AUDIT]  # a dead letter and its audit event, nothing else
    assert proc.counts["dead_lettered"] == 1 and proc.counts["batches"] == 1


def test_outputs_wait_for_the_end_of_the_batch(verifier: Verifier, cred: Any) -> None:
    pub = MemoryPublisher()
    proc = processors(verifier, pub)["verify"]
    proc.begin_batch()
    proc.handle(InputMessage(t.RECEIVED, 0, 0, DEA.encode(), message(signature(make_order(41), cred))))
    proc.end_batch()
    assert pub.messages == [] and proc.emitter.pending  # buffered until the loop publishes them
    asyncio.run(proc.emitter.publish_pending())
    assert [r["purchaser_dea"] for r in pub.records(t.VERIFIED)] == [DEA]


def test_an_order_flows_from_verify_to_monitor_to_case_through_messages(verifier: Verifier, cred: Any) -> None:
    pub = MemoryPublisher()
    procs = processors(verifier, pub)
    received = InputMessage(t.RECEIVED, 0, 0, DEA.encode(), message(signature(make_order(42), cred)),
                            appended_at=NOW - timedelta(minutes=59))
    batch(procs["verify"], received)
    [verified] = pub.on(t.VERIFIED)
    batch(procs["monitor"], as_input(verified))
    [verdict] = pub.records(t.VERDICTS)
    monitored = procs["monitor"].counts
    assert verdict["purchaser_dea"] == DEA and monitored["released"] + monitored["held"] == 1
    hold = a_hold()
    batch(procs["case"], InputMessage(t.HOLD, 0, 0, hold["order_id"].encode(), codec.encode("som.Hold", hold)))
    assert [c["kind"] for c in pub.records(t.CASES)] == ["OPENED"]
    assert procs["verify"].counts["verified"] == 1 and procs["case"].counts["opened"] == 1


def test_a_redelivered_message_repeats_its_recorded_outcome(verifier: Verifier, cred: Any) -> None:
    pub = MemoryPublisher()
    proc = processors(verifier, pub)["verify"]
    received = InputMessage(t.RECEIVED, 0, 3, DEA.encode(), message(signature(make_order(43), cred)))
    batch(proc, received)
    batch(proc, received)  # the same offset again, as Kafka redelivers an unacknowledged batch
    first, again = pub.on(t.VERIFIED)
    assert first.value() == again.value()  # the recorded bytes, not a second judgement
    assert proc.counts["verified"] == 1 and proc.counts["redelivered"] == 1 and proc.counts["batches"] == 2

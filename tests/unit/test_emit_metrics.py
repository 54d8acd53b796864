"""Outcome metrics are counted from the records an agent encoded, not by decoding its outputs again.

``connectors.kafka.metrics.observe_published`` used to read back every verdict and rejection an
agent had just encoded (on the worker's hot path); the emitter now keeps the record it was given.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from connectors.kafka import catalogue as t
from connectors.kafka import metrics
from connectors.kafka.emit import Emitter
from connectors.kafka.testing import MemoryPublisher
from streams.core.avro_codec import default_codec


def _rejection(order_id: str) -> dict:
    now = datetime.now(timezone.utc)
    return {"order_id": order_id, "received_at": now - timedelta(seconds=2), "rejected_at": now,
            "reason_code": "TEST_METRICS_CODE", "reason": "test", "order_number": None, "purchaser_dea": None,
            "signer_subject": None, "checks": []}


def _rejected(code: str) -> float:
    return metrics.REJECTIONS.labels(code)._value.get()  # noqa: SLF001 - prometheus_client has no public read


def test_a_delivered_outcome_is_counted_from_its_record_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(*_: object) -> dict:
        raise AssertionError("the outcome was decoded again")
    monkeypatch.setattr(metrics, "_read_own", no_decode)
    codec = default_codec()
    emitter = Emitter(MemoryPublisher(), "test", buffered=True)
    before = _rejected("TEST_METRICS_CODE")
    rec = _rejection("o-1")
    emitter.publish(t.REJECTED, "o-1", codec.encode("csos.orders.Rejection", rec), record=rec)
    assert _rejected("TEST_METRICS_CODE") == before  # buffered: counted only once delivered
    asyncio.run(emitter.publish_pending())
    assert _rejected("TEST_METRICS_CODE") == before + 1


def test_a_discarded_outcome_is_never_counted() -> None:
    codec = default_codec()
    emitter = Emitter(MemoryPublisher(), "test", buffered=True)
    before = _rejected("TEST_METRICS_DISCARDED")
    rec = dict(_rejection("o-2"), reason_code="TEST_METRICS_DISCARDED")
    with emitter.capture() as produced:
        emitter.publish(t.REJECTED, "o-2", codec.encode("csos.orders.Rejection", rec), record=rec)
    emitter.discard(produced)
    asyncio.run(emitter.publish_pending())
    assert _rejected("TEST_METRICS_DISCARDED") == before

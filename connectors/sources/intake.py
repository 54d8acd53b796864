"""Intake: put signed orders from a warehouse or trading-partner feed on the received topic.

Each order becomes a ReceivedOrder (exact bytes kept) keyed by the purchaser
DEA number the sender claims, so a registrant's orders stay in one partition
and in order. The claim is only for routing: the verifier decides who signed.
Intake also leaves the first audit event of the order's trail.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from connectors.kafka import catalogue as t
from connectors.kafka.emit import Emitter

from connectors.kafka.io import Publisher


class OrderIntake:
    def __init__(self, publisher: Publisher, source: str) -> None:
        self.emitter = Emitter(publisher, f"intake:{source}")
        self.source = source

    def submit(self, signature: bytes, *, document: bytes | None, purchaser_dea: str,
               order_id: str | None = None, received_at: datetime | None = None,
               fmt: str = "csos-order/1") -> str:
        """Queue one signed order; returns its order id (flush the publisher to make it durable)."""
        order_id = order_id or str(uuid.uuid4())
        received_at = received_at or datetime.now(timezone.utc)
        self.emitter.send(t.RECEIVED, "csos.orders.ReceivedOrder", purchaser_dea, {
            "order_id": order_id, "received_at": received_at, "source": self.source, "format": fmt,
            "document": document, "signature": signature,
        })
        self.emitter.audit("intake", "order.received", "RECEIVED", order_id=order_id, purchaser_dea=None,
                           detail={"source": self.source, "claimed_purchaser_dea": purchaser_dea,
                                   "bytes": len(signature) + len(document or b"")}, at=received_at)
        return order_id

    def submit_raw(self, payload: bytes, key: str | None = None) -> None:
        """Put bytes on the received topic as they are (a broken feed; used to test the dead-letter path)."""
        self.emitter.publisher.publish(t.RECEIVED, key, payload)

    def flush(self) -> None:
        self.emitter.publisher.flush()

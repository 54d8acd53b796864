"""A stand-in warehouse for the demo and tests: ships released orders and confirms each shipment.

A real warehouse system consumes ``som.release`` and writes
``warehouse.ShipmentConfirmation`` records to ``warehouse.shipments`` when
the goods leave; this connector does exactly that, shipping every line in
full, so the CSOS fill report has something to report. It is not part of a
production deployment.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, Iterable

from connectors.kafka import catalogue as t
from streams.core.avro_codec import AvroCodec, default_codec

from connectors.kafka.io import Publisher, consume_all


def confirmation(release: dict[str, Any], shipped_at: datetime) -> dict[str, Any]:
    """The confirmation a warehouse sends after shipping ``release`` in full."""
    return {
        # One shipment per released order: a repeated release (at-least-once) ships nothing twice.
        "shipment_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"csos-shipment:{release['order_id']}")),
        "order_id": release["order_id"], "order_number": release["order_number"],
        "purchaser_dea": release["purchaser_dea"], "supplier_dea": release["supplier_dea"], "shipped_at": shipped_at,
        "lines": [{"line_no": ln["line_no"], "ndc": ln["ndc"], "packages_shipped": ln["packages"]}
                  for ln in release["lines"]],
    }


def ship(publisher: Publisher, releases: Iterable[dict[str, Any]], *, shipped_at: datetime | None = None,
         delay: timedelta = timedelta(hours=4), codec: AvroCodec | None = None) -> int:
    """Confirm a shipment for each release (once per order); ``shipped_at`` defaults to release time + ``delay``."""
    codec = codec or default_codec()
    seen: set[str] = set()
    for rel in releases:
        if rel["order_id"] in seen or not rel["lines"]:
            continue
        seen.add(rel["order_id"])
        rec = confirmation(rel, shipped_at or rel["released_at"] + delay)
        publisher.publish(t.SHIPMENTS, rel["order_id"], codec.encode("warehouse.ShipmentConfirmation", rec))
    publisher.flush()
    return len(seen)


def released_orders(bootstrap: str, codec: AvroCodec | None = None) -> list[dict[str, Any]]:
    """Every release on ``som.release`` so far, as a downstream consumer reads them."""
    codec = codec or default_codec()
    return [codec.decode(m.value(), expect="som.Release")[1]
            for m in consume_all(bootstrap, [t.RELEASE], idle_seconds=2.0, timeout=120)]

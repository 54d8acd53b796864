"""Verification agent: received order -> verified order or rejection.

The checks themselves live in ``streams.verification``; this module decides
what goes where. A message that is not a ReceivedOrder is dead-lettered; an
order the verifier cannot judge (an unexpected error inside it) is rejected
with VERIFICATION_ERROR, never passed on: an invalid finding can't be bypassed
and a failure to decide is treated as invalid (fail closed).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from .. import topic_names as t
from ..avro_codec import AvroCodec, DecodeError, default_codec
from ..emit import Emitter, utcnow
from ..products import ProductMaster
from ..verification import Verifier, enrich_lines

log = logging.getLogger(__name__)
STAGE = "verify"


class VerifyProcessor:
    def __init__(self, verifier: Verifier, products: ProductMaster, emitter: Emitter,
                 codec: AvroCodec | None = None) -> None:
        self.verifier = verifier
        self.products = products
        self.emitter = emitter
        self.codec = codec or default_codec()
        self.counts = {"verified": 0, "rejected": 0, "dead_lettered": 0}

    def end_batch(self) -> None:
        """Nothing to persist: verification keeps no state between orders (yet)."""

    def handle(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        try:
            _, rec = self.codec.decode(value, expect="csos.orders.ReceivedOrder")
        except DecodeError as exc:
            self.counts["dead_lettered"] += 1
            self.emitter.dead_letter(STAGE, topic, partition, offset, key, value, f"undecodable ReceivedOrder: {exc}")
            return
        received_at: datetime = rec["received_at"]
        try:
            outcome = self.verifier.verify(rec["document"], rec["signature"], received_at)
        except Exception as exc:  # noqa: BLE001 - hostile input must not kill the agent
            log.exception("verifier failed on order %s", rec["order_id"])
            self._reject(rec, "VERIFICATION_ERROR",
                         f"The order could not be verified ({exc.__class__.__name__}); it is treated as invalid.",
                         [], None, None, None)
            return
        if outcome.ok:
            self._accept(rec, outcome)
        else:
            order = outcome.order
            self._reject(rec, outcome.reason_code or "INVALID", outcome.reason or "invalid order",
                         [{"check": c.check, "passed": c.passed, "detail": c.detail} for c in outcome.checks],
                         order.order_number if order else None,
                         order.purchaser.dea_number if order else None,
                         outcome.signer_subject)

    def _accept(self, rec: dict[str, Any], outcome: Any) -> None:
        order = outcome.order
        verified = {
            "order_id": rec["order_id"],
            "order_number": order.order_number,
            "purchaser_dea": order.purchaser.dea_number,
            "purchaser_name": order.purchaser.name,
            "supplier_dea": order.supplier.dea_number,
            "signed_at": order.signed_at,
            "received_at": rec["received_at"],
            "verified_at": utcnow(),
            "signer_serial": outcome.signer_serial or "",
            "signer_fingerprint": outcome.signer_fingerprint or "",
            "business_activity": None,
            "lines": enrich_lines(order, self.products),
        }
        # Keyed by the DEA number the signature vouches for, not the sender's claim:
        # the monitor's per-registrant state is partitioned by it.
        self.emitter.send(t.VERIFIED, "csos.orders.VerifiedOrder", order.purchaser.dea_number, verified)
        self.emitter.audit(STAGE, "order.verified", "VERIFIED", order_id=rec["order_id"],
                           purchaser_dea=order.purchaser.dea_number,
                           detail={"order_number": order.order_number, "signer_serial": outcome.signer_serial,
                                   "checks": [c.check for c in outcome.checks], "lines": len(order.lines)})
        self.counts["verified"] += 1

    def _reject(self, rec: dict[str, Any], code: str, reason: str, checks: list[dict[str, Any]],
                order_number: str | None, purchaser_dea: str | None, signer_subject: str | None) -> None:
        rejection = {
            "order_id": rec["order_id"], "received_at": rec["received_at"], "rejected_at": utcnow(),
            "reason_code": code, "reason": reason, "order_number": order_number,
            "purchaser_dea": purchaser_dea, "signer_subject": signer_subject, "checks": checks,
        }
        self.emitter.send(t.REJECTED, "csos.orders.Rejection", rec["order_id"], rejection)
        self.emitter.audit(STAGE, "order.rejected", code, order_id=rec["order_id"], purchaser_dea=purchaser_dea,
                           detail={"order_number": order_number, "reason": reason})
        self.counts["rejected"] += 1

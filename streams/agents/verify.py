"""Verification agent: received order -> verified order, rejection, or parked until data arrives.

The cryptographic and document checks live in ``streams.verification``;
this module adds what needs state or reference data, and decides what goes
where:

* a message that is not a ReceivedOrder is dead-lettered;
* an order the verifier cannot judge (an unexpected error inside it) is
  rejected with VERIFICATION_ERROR: an invalid finding can't be bypassed and
  a failure to decide counts as invalid (fail closed);
* an order that cannot be verified *yet* because reference data is missing
  (no current CRL, unknown registrant, unknown product) is parked in the
  purchaser's state and re-verified when the data arrives: never released,
  never lost;
* a valid order whose purchaser's registration is not active is rejected;
* a purchaser's order number is accepted once; a replay is rejected. The
  accepted numbers live in a Faust table (compacted changelog), so this holds
  across restarts and rebalances;
* a valid order that arrived keyed by another DEA number than the one it was
  signed for is re-keyed onto the received topic first, so that the replay
  state of a purchaser is only ever read and written by the partition's owner.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, MutableMapping

from .. import topic_names as t
from ..avro_codec import AvroCodec, default_codec
from ..emit import Emitter, utcnow
from ..products import ProductMaster
from ..reference_data import REGISTRANT_UNKNOWN, ReferenceFeed, RegistrantDirectory
from ..table_state import CachedTable
from ..verification import RETRYABLE, Outcome, Verifier, enrich_lines

log = logging.getLogger(__name__)
STAGE = "verify"
STATE_SCHEMA = "csos.state.PurchaserVerifyState"
DUPLICATE_ORDER_NUMBER = "DUPLICATE_ORDER_NUMBER"
VERIFICATION_ERROR = "VERIFICATION_ERROR"
#: How long an accepted order number is remembered. Orders are void 60 days
#: after signing, so a replay of the same signed order is refused as expired
#: afterwards anyway; the margin covers clock skew and late receipt.
REMEMBER = timedelta(days=400)
PARK_ADVICE = ("The order is not filled yet: it is held and will be verified as soon as the supplier has the "
               "missing data; no action is needed unless it stays pending.")


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


class VerifyProcessor:
    def __init__(self, verifier: Verifier, products: ProductMaster, emitter: Emitter,
                 table: MutableMapping[bytes, bytes], directory: RegistrantDirectory | None = None,
                 feed: ReferenceFeed | None = None, codec: AvroCodec | None = None) -> None:
        self.verifier = verifier
        self.products = products
        self.emitter = emitter
        self.directory = directory  # None: registration status is not checked
        self.feed = feed
        self.codec = codec or default_codec()
        self.counts = {"verified": 0, "rejected": 0, "dead_lettered": 0, "parked": 0, "rerouted": 0}
        self.state: CachedTable[dict[str, Any]] = CachedTable(
            table,
            load=lambda raw, dea: (self.codec.decode(raw, expect=STATE_SCHEMA)[1] if raw is not None
                                   else {"purchaser_dea": dea, "accepted": {}, "pending": {}}),
            dump=lambda state: self.codec.encode(STATE_SCHEMA, state),
        )

    # ------------------------------------------------------------------ reference data
    def apply_reference_updates(self) -> int:
        """Apply queued CRLs and registrant changes; returns how many took effect."""
        if self.feed is None:
            return 0
        applied = 0
        for topic, key, record, trace in self.feed.drain():
            if topic == t.CRL:
                if record is None:
                    continue  # a CRL is never withdrawn by a tombstone; a newer one replaces it
                try:
                    if self.verifier.update_crl(record["crl_der"]):
                        applied += 1
                        if trace is None:  # each worker audits its own load; the traced copy is a second look
                            self.emitter.audit(STAGE, "crl.loaded", "LOADED", detail={
                                "issuer": record["issuer"], "next_update": record["next_update"],
                                "source": record["source"]})
                except Exception as exc:  # noqa: BLE001 - a bad CRL is refused, loudly, never applied
                    log.error("CRL from %s refused: %s", record.get("source"), exc)
                    if trace is not None:  # audited once, by the worker tracing its partition (reference_data)
                        self.emitter.audit(STAGE, "crl.refused", "REFUSED", detail={
                            "issuer": record.get("issuer"), "source": record.get("source"), "reason": str(exc),
                            "partition": trace.partition, "offset": trace.offset})
            elif self.directory is not None:
                self.directory.apply(key, record)
                applied += 1
        return applied

    def recheck_parked(self) -> int:
        """Re-verify every parked order this worker holds; returns how many left the parking."""
        resolved = 0
        for dea in self.state.keys():
            state = self.state.get(dea)
            for order_id, raw in list(state["pending"].items()):
                _, rec = self.codec.decode(raw, expect="csos.orders.ReceivedOrder")
                if self._verify(rec, dea, raw, parked=True):
                    del state["pending"][order_id]
                    self.state.mark_dirty(dea)
                    resolved += 1
        return resolved

    def begin_batch(self) -> None:
        """The newest CRLs and registrations before judging a batch."""
        self.tick()

    def end_batch(self) -> None:
        self.state.flush()

    def tick(self) -> int:
        """Take in reference data and, if it changed, retry parked orders; returns how much happened."""
        applied = self.apply_reference_updates()
        resolved = self.recheck_parked() if applied else 0
        self.state.flush()
        return applied + resolved

    # ------------------------------------------------------------------ orders
    def handle(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        rec = self.emitter.decode_or_dead_letter(STAGE, "csos.orders.ReceivedOrder", topic, partition, offset,
                                                 key, value)
        if rec is None:
            self.counts["dead_lettered"] += 1
            return
        routing_key = (key or b"").decode("utf-8", errors="replace")
        try:
            self._verify(rec, routing_key, value, parked=False)
        except Exception as exc:  # noqa: BLE001 - hostile input must not kill the agent
            log.exception("verification failed on order %s", rec["order_id"])
            self.state.forget(routing_key)
            self._reject(rec, VERIFICATION_ERROR,
                         f"The order could not be verified ({exc.__class__.__name__}); it is treated as invalid.",
                         [], None, None, None)

    def _verify(self, rec: dict[str, Any], routing_key: str, raw: bytes, *, parked: bool) -> bool:
        """Judge one order. Returns False only when it stays (or becomes) parked."""
        outcome = self.verifier.verify(rec["document"], rec["signature"], rec["received_at"], rec["format"])
        order = outcome.order
        if not outcome.ok:
            if outcome.reason_code in RETRYABLE:
                return self._park(rec, routing_key, raw, outcome.reason_code, outcome.reason or "", outcome,
                                  parked=parked)
            self._reject_outcome(rec, outcome)
            return True
        dea = order.purchaser.dea_number
        if dea != routing_key and not parked:
            # Re-key so the purchaser's state partition owner decides (replay protection).
            self.emitter.publisher.publish(t.RECEIVED, dea, raw)
            self.emitter.audit(STAGE, "order.rerouted", "REROUTED", order_id=rec["order_id"], purchaser_dea=dea,
                               detail={"received_key": routing_key, "signed_for": dea})
            self.counts["rerouted"] += 1
            return True
        checks = [{"check": c.check, "passed": c.passed, "detail": c.detail} for c in outcome.checks]
        if self.directory is not None:
            finding = self.directory.check(dea, rec["received_at"])
            if finding.code == REGISTRANT_UNKNOWN:
                return self._park(rec, routing_key, raw, finding.code,
                                  f"The purchaser {dea} is not in the supplier's registrant directory.", outcome,
                                  parked=parked)
            checks.append({"check": "registration", "passed": finding.code is None, "detail": finding.detail})
            if finding.code is not None:
                self._reject(rec, finding.code,
                             f"{finding.detail[0].upper()}{finding.detail[1:]}: DEA registration must be active "
                             "to order controlled substances; renew or correct the registration, then send a new "
                             "order.", checks, order.order_number, dea, outcome.signer_subject)
                return True
        state = self.state.get(dea)
        now_ms = _ms(utcnow())
        number = order.order_number
        if state["accepted"].get(number, 0) > now_ms:
            checks.append({"check": "order_number_unused", "passed": False,
                           "detail": f"order number {number} was already accepted from {dea}"})
            self._reject(rec, DUPLICATE_ORDER_NUMBER,
                         f"Order number {number} was already used by {dea} and is accepted only once; "
                         "send a new order with a new order number.", checks, number, dea, outcome.signer_subject)
            return True
        state["accepted"] = {n: exp for n, exp in state["accepted"].items() if exp > now_ms}
        state["accepted"][number] = _ms(order.signed_at + REMEMBER)
        self.state.mark_dirty(dea)
        checks.append({"check": "order_number_unused", "passed": True, "detail": f"first use of {number}"})
        self._accept(rec, outcome)
        return True

    def _park(self, rec: dict[str, Any], routing_key: str, raw: bytes, code: str, reason: str,
              outcome: Outcome, *, parked: bool) -> bool:
        if parked:
            return False  # still waiting; it was announced when first parked
        state = self.state.get(routing_key)
        state["pending"][rec["order_id"]] = raw
        self.state.mark_dirty(routing_key)
        order = outcome.order
        self.emitter.send(t.PENDING, "csos.orders.PendingOrder", rec["order_id"], {
            "order_id": rec["order_id"], "received_at": rec["received_at"], "parked_at": utcnow(),
            "reason_code": code, "reason": f"{reason} {PARK_ADVICE}".strip(),
            "order_number": order.order_number if order else None,
            "purchaser_dea": order.purchaser.dea_number if order else None, "attempts": 1,
        })
        self.emitter.audit(STAGE, "order.parked", code, order_id=rec["order_id"],
                           purchaser_dea=order.purchaser.dea_number if order else None,
                           detail={"reason": reason})
        self.counts["parked"] += 1
        return False

    def _accept(self, rec: dict[str, Any], outcome: Outcome) -> None:
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
            "business_activity": self._registrant_field(order.purchaser.dea_number, "business_activity"),
            "purchaser_state": self._registrant_field(order.purchaser.dea_number, "state"),
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

    def _registrant_field(self, dea: str, name: str) -> str | None:
        """A field of the registrant master's record (business activity, state), None when unknown."""
        rec = self.directory.get(dea) if self.directory is not None else None
        return rec.get(name) if rec else None

    def _reject_outcome(self, rec: dict[str, Any], outcome: Outcome) -> None:
        order = outcome.order
        self._reject(rec, outcome.reason_code or "INVALID", outcome.reason or "invalid order",
                     [{"check": c.check, "passed": c.passed, "detail": c.detail} for c in outcome.checks],
                     order.order_number if order else None,
                     order.purchaser.dea_number if order else None,
                     outcome.signer_subject)

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

"""Monitoring agent: verified order -> verdict, and hold or release.

Per-registrant state (baselines for every drug family) is one entry of a
Faust table keyed by purchaser DEA number, encoded with the Avro schema
``som.state.RegistrantState`` so its changelog topic is readable like every
other topic. The monitor learns only from orders it releases, so a run of
suspicious orders can never raise the baseline that judges them.

Each order id is decided and learned once: the registrant's state records
the decision per order id (``outcomes``, see ``streams.pipeline.outcomes``), written
in the same changelog record as what was learned from it, so a redelivered
or duplicated order repeats its recorded HOLD or RELEASE and is never scored
or learned again.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, MutableMapping

from connectors.kafka import catalogue as t
from streams.core.avro_codec import AvroCodec, default_codec
from connectors.kafka.emit import Emitter
from streams.core import clock
from streams.monitoring.baselines import RegistrantBaselines
from streams.monitoring.monitor import Monitor
from streams.pipeline.outcomes import OutcomeBook, Position, decision_id
from streams.pipeline.processor import InputMessage, ProcessorBase, decode
from streams.pipeline.table_state import CachedTable

log = logging.getLogger(__name__)
STAGE = "monitor"
STATE_SCHEMA = "som.state.RegistrantState"
VERIFIED_SCHEMA = "csos.orders.VerifiedOrder"


class MonitorProcessor(ProcessorBase):
    """Scores each verified order against live baselines kept per registrant (see ``CachedTable``).

    The processor interface (message, batch, counters) is ``streams.pipeline.processor``.
    """

    stage = STAGE

    def __init__(self, monitor: Monitor, table: MutableMapping[bytes, bytes], emitter: Emitter,
                 codec: AvroCodec | None = None, outcomes: OutcomeBook | None = None) -> None:
        self.monitor = monitor
        self.emitter = emitter
        self.codec = codec or default_codec()
        self.outcomes = outcomes or OutcomeBook()
        self.counts = {"released": 0, "held": 0, "dead_lettered": 0, "repeated": 0}
        #: What this batch changed in each registrant's state, in order (learning, case bookkeeping), so that a
        #: failure on one order can drop the half-updated state and replay the others' changes (see ``_restore``).
        self._steps: dict[str, list[Callable[[RegistrantBaselines], Any]]] = {}
        self._recorded: dict[str, dict[str, dict[str, Any]]] = {}  # this batch's outcome records, per registrant
        self.state: CachedTable[RegistrantBaselines] = CachedTable(
            table,
            load=lambda raw, dea: self.monitor.baselines(
                None if raw is None else self.codec.decode(raw, expect=STATE_SCHEMA)[1], dea),
            dump=lambda base: self.codec.encode(STATE_SCHEMA, base.to_state()),
        )

    def begin_batch(self) -> None:
        """A new batch (counted): nothing learned in it yet (see ``_restore``)."""
        super().begin_batch()
        self._steps.clear()
        self._recorded.clear()

    def end_batch(self) -> None:
        """Write every registrant learned from in this batch to the table (one changelog record each)."""
        self._steps.clear()
        self._recorded.clear()
        self.state.flush()

    def handle(self, message: InputMessage) -> None:
        """Decide one verified order (or learn one cleared order); the append time is not used here."""
        if message.topic == t.CLEARED:
            self.learn_cleared(message)
            return
        decoded = decode(self.codec, message, VERIFIED_SCHEMA)
        if not decoded.ok:
            self.dead_letter(message, decoded.error or "")
            return
        order: dict[str, Any] = decoded.record  # type: ignore[assignment]
        dea = order["purchaser_dea"]
        position = message.position
        if self._repeated(dea, order["order_id"], position):
            return
        with self.emitter.capture() as produced:
            learned = self._decide(dea, order, message)
        if learned is not None:
            self._record(dea, order["order_id"], learned[0], position, produced, learned=learned[1])

    def _repeated(self, dea: str, order_id: str, position: Position, *, cleared: bool = False) -> bool:
        """Answer (and return True for) an order already decided (or, ``cleared``, already learned)."""
        try:
            known = self.outcomes.current(self.state.get(dea).outcomes, order_id)
        except Exception:  # noqa: BLE001 - unreadable state: the order is decided (and fails closed) below
            return False
        if known is None or (cleared and not known["learned"]):
            return False
        self.counts["repeated"] += 1
        self.outcomes.repeat(self.emitter, STAGE, known, order_id, position, purchaser_dea=dea)
        return True

    def _record(self, dea: str, order_id: str, decision: str, position: Position, produced: list[Any], *,
                learned: bool) -> None:
        """Record the decision in the registrant's state (the same changelog record as what it learned)."""
        try:
            base = self.state.get(dea)
            rec = self.outcomes.record(base.outcomes, order_id, decision, position, produced, learned=learned)
            self._recorded.setdefault(dea, {})[order_id] = rec
            self.state.mark_dirty(dea)
        except Exception:  # noqa: BLE001 - the decision stands; only its record is missing
            log.exception("outcome of order %s could not be recorded", order_id)

    def _decide(self, dea: str, order: dict[str, Any], message: InputMessage) -> tuple[str, bool] | None:
        """Score, publish and (if released) learn one order; returns (decision, learned), None if dead-lettered."""
        learned = False
        try:
            base = self.state.get(dea)
            verdict = self.monitor.score(base, order)
            # encoded before learning: a failure here learns nothing
            outputs = self._outputs(order, verdict, source=message.value)
            if verdict["verdict"] == "RELEASE":
                self._learn(dea, base, order)
                learned = True
            if self.monitor.note_verdict(base, order, verdict):  # a HOLD opens the family's case
                self.state.mark_dirty(dea)
                self._step(dea, lambda b: self.monitor.note_verdict(b, order, verdict))
        except Exception as exc:  # noqa: BLE001 - fail closed: an order we cannot score, encode or learn is held
            log.exception("monitor failed on order %s", order.get("order_id"))
            try:
                verdict = self._error_verdict(order, exc)
                outputs = self._outputs(order, verdict, source=message.value)
            except Exception as again:  # noqa: BLE001 - not even a hold can carry it: keep the message whole
                log.exception("no error verdict could be written for order %s", order.get("order_id"))
                self.dead_letter(message, f"monitor_error: {exc.__class__.__name__}: {exc}; no verdict could be "
                                          f"written ({again.__class__.__name__}: {again}); the order is not released")
                return None
        self._publish(order, verdict, outputs)
        return verdict["verdict"], learned

    def _learn(self, dea: str, base: RegistrantBaselines, order: dict[str, Any]) -> None:
        """Learn a released order; on failure restore the registrant's baselines, then raise."""
        try:
            self.monitor.learn_into(base, order)
        except Exception:
            self._restore(dea)
            raise
        self.state.mark_dirty(dea)
        self._step(dea, lambda b: self.monitor.learn_into(b, order))

    def _step(self, dea: str, change: Callable[[RegistrantBaselines], Any]) -> None:
        # The callers' lambdas close over names they never rebind afterwards (plain closures, not default
        # arguments, which mypy cannot type for a one-argument callable).
        self._steps.setdefault(dea, []).append(change)

    def _restore(self, dea: str) -> None:
        """Undo a failed learning step and nothing else.

        The baselines a failure may have half-updated are dropped (the table
        keeps the last flushed ones) and what this batch already changed for
        the registrant (orders learned, cases opened or closed) is applied
        again in the same order, so one bad order never undoes the others.
        """
        self.state.forget(dea)
        earlier = self._steps.get(dea, [])
        recorded = self._recorded.get(dea, {})
        if not earlier and not recorded:
            return
        base = self.state.get(dea)
        try:
            for change in earlier:
                change(base)
            base.outcomes.update(recorded)  # this batch's decisions stand (after learning: it skips learned ids)
        except Exception:  # noqa: BLE001 - cannot happen unless learning is not deterministic; say so
            log.exception("could not replay %d change(s) of this batch for %s; they are dropped", len(earlier), dea)
            self.state.forget(dea)
            self._steps.pop(dea, None)
            return
        self.state.mark_dirty(dea)

    def learn_cleared(self, message: InputMessage) -> None:
        """Act on a due-diligence outcome (``som.ClearedOrder``): learn a cleared order, update open cases.

        RELEASED: the held order is learned as if the monitor had released it,
        and its open case (if it was one) closes. Only RELEASED teaches the
        baselines, so held orders never do unless a person vouched for them.
        REPORTED, CANCELLED and the registrant decisions (SET_LIMIT,
        TERMINATED, ONBOARDED) only change the registrant's due-diligence state
        (``streams.monitoring.open_cases``). Each is applied once per decision id.
        """
        decoded = decode(self.codec, message, "som.ClearedOrder")
        if not decoded.ok:
            self.dead_letter(message, decoded.error or "")
            return
        cleared: dict[str, Any] = decoded.record  # type: ignore[assignment]
        order = cleared.get("order")
        if cleared.get("outcome", "RELEASED") != "RELEASED" or order is None:
            self.apply_outcome(cleared, message)
            return
        dea = order["purchaser_dea"]
        position = message.position
        if self._repeated(dea, order["order_id"], position, cleared=True):
            return  # learned once per order id, however often the clearance comes
        with self.emitter.capture() as produced:
            try:
                self._learn(dea, self.state.get(dea), order)
            except Exception as exc:  # noqa: BLE001 - keep the good baselines; the clearance stays on the topic
                log.exception("monitor could not learn cleared order %s", order["order_id"])
                self.emitter.audit(STAGE, "order.learn_failed", "ERROR", order_id=order["order_id"],
                                   purchaser_dea=dea, detail={"error": f"{exc.__class__.__name__}: {exc}"})
                return
            self.monitor.apply_outcome(self.state.get(dea), cleared)  # its open case (if any) closes
            self._step(dea, lambda b: self.monitor.apply_outcome(b, cleared))
            self.count("learned_cleared")
            self.emitter.audit(STAGE, "order.learned_after_review", "LEARNED", order_id=order["order_id"],
                               purchaser_dea=dea, detail={"decision_id": cleared["decision_id"],
                                                          "cleared_by": cleared["cleared_by"]})
        self._record(dea, order["order_id"], "CLEARED", position, produced, learned=True)

    def apply_outcome(self, outcome: dict[str, Any], message: InputMessage) -> None:
        """Apply a due-diligence outcome that teaches no baseline (report, cancel, limit, termination, onboarding).

        Audited as ``due_diligence.applied`` (or ``.repeated`` for a decision id
        already applied). One that cannot be applied is dead-lettered before
        anything changes (``apply_outcome`` validates first), for a person to look at.
        """
        dea = outcome.get("purchaser_dea") or (outcome.get("order") or {}).get("purchaser_dea") or ""
        kind = outcome.get("outcome", "RELEASED")
        detail = {"decision_id": outcome["decision_id"], "case_id": outcome["order_id"], "decided_by":
                  outcome["cleared_by"], "drug_families": list(outcome.get("drug_families") or []),
                  "monthly_limit_units": outcome.get("monthly_limit_units")}
        try:
            if not dea:
                raise ValueError("the outcome names no registrant (purchaser_dea)")
            applied = self.monitor.apply_outcome(self.state.get(dea), outcome)
        except Exception as exc:  # noqa: BLE001 - a bad outcome must not stop the monitor; it is kept for review
            log.exception("monitor could not apply outcome %s", outcome.get("decision_id"))
            self.dead_letter(message, f"due-diligence outcome {kind} not applied: {exc.__class__.__name__}: {exc}")
            return
        if applied:
            self.state.mark_dirty(dea)
            self._step(dea, lambda b: self.monitor.apply_outcome(b, outcome))
            self.count("outcomes_applied")
        self.emitter.audit(STAGE, "due_diligence.applied" if applied else "due_diligence.repeated", kind,
                           order_id=outcome["order_id"] or None, purchaser_dea=dea, detail=detail,
                           actor=outcome["cleared_by"] or None)

    def _error_verdict(self, order: dict[str, Any], exc: Exception) -> dict[str, Any]:
        now = clock.utcnow()
        return {
            "order_id": order["order_id"], "order_number": order["order_number"],
            "purchaser_dea": order["purchaser_dea"], "verdict": "HOLD", "decided_at": now,
            "received_at": order["received_at"], "signed_at": order["signed_at"],
            "model_version": self.monitor.model_version,
            "reasons": [{
                "detector": "monitor_error", "dimension": "pattern", "drug_family": "*", "value": 0.0,
                "baseline": 0.0, "threshold": 0.0, "window": "-", "fired": True, "enforced": True,
                "explanation": f"The order could not be scored ({exc.__class__.__name__}); held for review.",
            }],
            "lines": order["lines"],
            "total_dosage_units": sum(ln["dosage_units"] for ln in order["lines"]),
        }

    def _outputs(self, order: dict[str, Any], verdict: dict[str, Any], *,
                 source: bytes | None = None) -> list[tuple[str, str, bytes]]:
        """Every message the verdict sends, encoded (topic, key, bytes): encoding fails before anything is sent.

        ``source``: the verified order's message ``order`` was read from. The
        hold embeds that order and every output repeats its lines, so their
        bytes are copied from it rather than encoded again (the same bytes:
        ``AvroCodec.encoded_fields`` gives them only when they are what an
        encoding would write).
        """
        oid = order["order_id"]
        enc = self.codec.encode
        found = (self.codec.encoded_fields(source, VERIFIED_SCHEMA, last_items=len(order["lines"]))
                 if source is not None else None)
        whole, lines = (found[0], {"lines": found[1]["lines"]}) if found is not None else (None, None)
        out = [(t.VERDICTS, oid, enc("som.Verdict", verdict, spliced=lines if verdict["lines"] is order["lines"]
                                     else None))]
        # The findings that decided (a fired static rule that is only recorded does not hold the order).
        fired = [r for r in verdict["reasons"] if r["fired"] and r.get("enforced", True)]
        if verdict["verdict"] == "HOLD":
            out.append((t.HOLD, oid, enc("som.Hold", {
                "order_id": oid, "order_number": order["order_number"], "purchaser_dea": order["purchaser_dea"],
                "held_at": verdict["decided_at"], "reasons": fired,
                "summary": " ".join(r["explanation"] for r in fired), "order": order,
                "decision_id": decision_id(oid, 1), "decision_version": 1,
            }, spliced={"order": whole} if whole is not None else None)))
        else:
            out.append((t.RELEASE, oid, enc("som.Release", {
                "order_id": oid, "order_number": order["order_number"], "purchaser_dea": order["purchaser_dea"],
                "supplier_dea": order["supplier_dea"], "released_at": verdict["decided_at"],
                "released_by": "monitor", "lines": order["lines"],
                "decision_id": decision_id(oid, 1), "decision_version": 1,
            }, spliced=lines)))
        return out

    def _publish(self, order: dict[str, Any], verdict: dict[str, Any], outputs: list[tuple[str, str, bytes]]) -> None:
        for topic, key, payload in outputs:  # the verdict's record spares the metrics a decode
            self.emitter.publish(topic, key, payload, record=verdict if topic == t.VERDICTS else None)
        fired = [r for r in verdict["reasons"] if r["fired"] and r.get("enforced", True)]
        if verdict["verdict"] == "HOLD":
            self.counts["held"] += 1
            action, outcome = "order.held", "HOLD"
        else:
            self.counts["released"] += 1
            action, outcome = "order.released", "RELEASE"
        self.emitter.audit(STAGE, action, outcome, order_id=order["order_id"], purchaser_dea=order["purchaser_dea"],
                           detail={"order_number": order["order_number"], "model_version": verdict["model_version"],
                                   "fired": [f"{r['detector']}:{r['drug_family']}" for r in fired]})

"""Case agent: held orders and analysts' decisions -> due-diligence cases and what they decide.

Inputs, both keyed by order id and so co-partitioned with the case table:
``som.hold`` (the monitor opens a case) and ``som.decisions`` (an analyst
releases, reports or cancels). The case table (``som.state.Case`` Avro,
compacted changelog) is the authority on a case's status; the review page
only proposes decisions, and this agent applies them or refuses them.

Outputs per step, every one with an audit event naming the actor:
  * ``som.cases``: OPENED, RELEASED, REPORTED, CANCELLED, ESCALATED, REFUSED;
  * RELEASE: a ``som.Release`` for the warehouse (keyed by order id, the same
    record shape as an automatic release) and a ``som.ClearedOrder`` keyed by
    purchaser DEA for the monitor, which learns the order like one it released;
  * REPORT: a ``som.SuspiciousOrderReport`` on ``som.reports``.

Delivery is at-least-once: the case records the last input it applied and
the exact messages that input produced (``outcome``, see
``streams.pipeline.outcomes``), in the same changelog record as the case. The same
input delivered again re-publishes those bytes; a duplicate hold finds its
case open and is only audited; a repeated decision is recognised by its id
and its closing outputs are sent again unchanged (all keyed and idempotent
downstream) instead of being refused as a second decision.

A release after due diligence is version 2 of the order's decision
(``decision_version``; the monitor's hold is version 1).
"""
from __future__ import annotations

import dataclasses
import logging
import uuid
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, MutableMapping

from connectors.kafka.io import key_partition as _key_partition

from connectors.kafka import catalogue as t
from streams.core.avro_codec import AvroCodec, default_codec
from streams.cases.machine import (
    CANCELLED, HELD, RELEASED, REPORTED, Case, DecisionRefused, decide, escalate, is_repeat, open_case,
)
from streams.cases.sor import report_for
from streams.cases import registrant_decisions as registrant
from connectors.kafka.emit import Emitter
from streams.core import clock
from streams.pipeline.outcomes import OutcomeBook, Position, decision_id, records_outputs_pruned
from streams.pipeline.processor import InputMessage, ProcessorBase, decode
from streams.pipeline.table_state import CachedTable

log = logging.getLogger(__name__)
STAGE = "case"
STATE_SCHEMA = "som.state.Case"
AGENT_ACTOR = "case-agent"
KIND_FOR = {RELEASED: "RELEASED", REPORTED: "REPORTED", CANCELLED: "CANCELLED"}
#: ``decision_version`` of a release after due diligence: the monitor's hold was version 1.
REVIEWED_DECISION_VERSION = 2
INPUTS = ("som.Hold", "som.Decision")


def key_partition(key: str, partitions: int) -> int:
    """The partition of an order id's case (``connectors.kafka.io.key_partition``): a worker escalates only
    the cases in the partitions it owns."""
    return _key_partition(key, partitions)


class CaseProcessor(ProcessorBase):
    """Applies holds, decisions and the due-diligence clock to the case table, one event at a time.

    The processor interface (message, batch, counters) is ``streams.pipeline.processor``.
    """

    stage = STAGE

    def __init__(self, table: MutableMapping[bytes, bytes], emitter: Emitter, *, due_days: float = 7.0,
                 reporting_dea: str = "", owns: Callable[[str], bool] | None = None,
                 retention_days: float = 90.0, codec: AvroCodec | None = None,
                 outcomes: OutcomeBook | None = None) -> None:
        self.emitter = emitter
        self.outcomes = outcomes or OutcomeBook()
        self.codec = codec or default_codec()
        self.due_days = due_days
        self.retention = timedelta(days=retention_days)
        self.reporting_dea = reporting_dea
        self.owns = owns or (lambda order_id: True)
        self.counts = {"opened": 0, "released": 0, "reported": 0, "cancelled": 0, "escalated": 0, "refused": 0,
                       "dead_lettered": 0, "expired": 0, "clock_runs": 0}
        self.state: CachedTable[Case | None] = CachedTable(
            table,
            load=lambda raw, _: None if raw is None else Case.from_state(
                self.codec.decode(raw, expect=STATE_SCHEMA)[1]),
            dump=lambda case: self.codec.encode(STATE_SCHEMA, case.to_state()),
        )

    # -- the processor interface (streams.pipeline.processor); begin_batch (counting it) is ProcessorBase's
    def end_batch(self) -> None:
        self.state.flush()

    def handle(self, message: InputMessage) -> None:
        """Apply one hold or decision; the append time is not used here."""
        decoded = decode(self.codec, message, INPUTS, label="case input")
        if not decoded.ok:
            self.dead_letter(message, decoded.error or "")
            return
        name, rec = decoded.schema, decoded.record or {}
        position = message.position
        with self.emitter.capture() as produced:
            try:
                changed = self.on_hold(rec, position) if name == "som.Hold" else self.on_decision(rec, position)
            except Exception as exc:  # noqa: BLE001 - an agent never dies on input; the message is kept
                self.emitter.discard(produced)
                changed = exc
        if isinstance(changed, Case):  # the outputs of the step are recorded with it, to repeat them if need be
            self._store(dataclasses.replace(changed, outcome=self.outcomes.make(changed.status, position, produced)))
            return
        if isinstance(changed, Exception):
            exc = changed
            log.exception("case agent failed on %s for order %s", name, rec.get("order_id"), exc_info=exc)
            self.state.forget(str(rec.get("order_id")))
            self.dead_letter(message, f"case agent could not apply {name}: {exc.__class__.__name__}: {exc}")

    # -- inputs
    def on_hold(self, hold: dict[str, Any], position: Position | None = None) -> Case | None:
        """Open a case for a new hold; returns it (None: a repeat, answered from the case's record)."""
        oid = hold["order_id"]
        known = self.state.get(oid)
        if known is not None:  # redelivered or duplicated hold: the case is open (or already decided)
            self._repeat(known, position)
            return None
        case = open_case(hold, self.due_days)
        self._store(case)
        self.counts["opened"] += 1
        self._case_event(case, "OPENED", at=clock.utcnow(), actor=AGENT_ACTOR)
        self.emitter.audit(STAGE, "case.opened", HELD, order_id=oid, purchaser_dea=hold["purchaser_dea"],
                           detail={"order_number": hold["order_number"], "due_at": case.due_at.isoformat()})
        return case

    def _repeat(self, case: Case, position: Position | None) -> bool:
        """Re-publish what the case's last input produced if this is that input again; else audit the duplicate."""
        if case.outcome is None or position is None:
            return False
        return self.outcomes.repeat(self.emitter, STAGE, case.outcome, case.order_id, position,
                                    purchaser_dea=case.hold["purchaser_dea"])

    def on_decision(self, decision: dict[str, Any], position: Position | None = None) -> Case | None:
        """Apply an analyst's decision; returns the decided case (None: repeated or refused)."""
        oid = decision["order_id"]
        case = self.state.get(oid) if oid else None
        if decision["action"] in registrant.REGISTRANT_ACTIONS:
            self.on_registrant_decision(case, decision)
            return None
        if is_repeat(case, decision):
            same_input = case.outcome is not None and position is not None and \
                (case.outcome["topic"], case.outcome["partition"], case.outcome["offset"]) == tuple(position)
            if same_input:  # this very input again: what it produced, byte for byte (or nothing, if delivered)
                self._repeat(case, position)  # type: ignore[arg-type]
            else:  # the decision sent again (e.g. by the review app): its closing outputs again, idempotent downstream
                self._closing_outputs(case)  # type: ignore[arg-type]
            return None
        try:
            decided = decide(case, decision)
        except DecisionRefused as refused:
            self._refuse(case, decision, refused)
            return None
        self._store(decided)
        self._case_event(decided, KIND_FOR[decided.status], at=decided.decided_at, actor=decided.decided_by)
        self.emitter.audit(
            STAGE, f"case.{decided.status.lower()}", decided.status, order_id=oid,
            purchaser_dea=decided.hold["purchaser_dea"], at=decided.decided_at,
            detail={"order_number": decided.hold["order_number"], "decision_id": decided.decision_id,
                    "actor": decided.decided_by, "rationale": decided.rationale,
                    "evidence_notes": decided.evidence_notes, "escalated": decided.escalated_at is not None},
            actor=decided.decided_by)
        self.counts[decided.status.lower()] += 1
        self._closing_outputs(decided)
        return decided

    def on_registrant_decision(self, case: Case | None, decision: dict[str, Any]) -> None:
        """Check a SET_LIMIT / TERMINATE / ONBOARDED decision and hand it to the monitor; the case is unchanged.

        Sent again, it is sent again (the monitor applies a decision id once).
        """
        try:
            dea, family, units = registrant.check(case, decision)
        except DecisionRefused as refused:
            self._refuse(case, decision, refused)
            return
        outcome = registrant.outcome_for(case, decision, dea, family, units)
        self.emitter.send(t.CLEARED, "som.ClearedOrder", dea, outcome)
        kind = registrant.EVENT_KINDS[decision["action"]]
        self.count(kind.lower())
        self.emitter.audit(STAGE, f"registrant.{kind.lower()}", kind, order_id=decision["order_id"] or None,
                           purchaser_dea=dea, at=decision["decided_at"], actor=decision["actor"],
                           detail={"decision_id": decision["decision_id"], "rationale": decision["rationale"],
                                   "evidence_notes": decision.get("evidence_notes") or "",
                                   "drug_family": family, "monthly_limit_units": units})
        if case is not None:  # the case's history says what was decided from it (no new version: it is not changed)
            self._case_event(case, kind, at=decision["decided_at"], actor=decision["actor"], decision=decision,
                             event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"csos-decision:{decision['decision_id']}")))

    def tick(self, now: datetime | None = None, keys: Iterable[str] | None = None) -> int:
        """Escalate every owned case whose due-diligence clock lapsed; returns how many.

        Also drops cases closed more than ``retention_days`` ago from the table,
        so worker state stays bounded: their history is in ClickHouse
        (``cases``, ``case_events``, kept two years), and a decision arriving
        for one after that is refused as about an unknown case.
        """
        now = now or clock.utcnow()
        self.counts["clock_runs"] += 1  # on /health: what a check for late duplicates waits on
        escalated = 0
        for oid in list(keys if keys is not None else self.state.keys()):
            if not self.owns(oid):
                continue  # a standby copy: the owner escalates it
            case = self.state.get(oid)
            if case is not None and case.closed and case.decided_at is not None \
                    and now - case.decided_at > self.retention:
                self.state.delete(oid)
                self.counts["expired"] += 1
                continue
            later = escalate(case, now) if case is not None else None
            if later is None:
                continue
            self._store(later)
            self._case_event(later, "ESCALATED", at=now, actor=AGENT_ACTOR)
            overdue = (now - later.due_at).total_seconds() / 86400
            self.emitter.audit(STAGE, "case.escalated", "ESCALATED", order_id=oid,
                               purchaser_dea=later.hold["purchaser_dea"],
                               detail={"order_number": later.hold["order_number"], "held_at": later.held_at.isoformat(),
                                       "due_at": later.due_at.isoformat(), "days_overdue": round(overdue, 3)})
            escalated += 1
        self.counts["escalated"] += escalated
        self.state.flush()
        return escalated

    # -- outputs
    def _store(self, case: Case) -> None:
        """Write the case (at the end of the batch); outputs of an input already committed are forgotten."""
        if case.outcome is not None and case.outcome["topic"] and self.outcomes.delivered(case.outcome):
            outcome = dict(case.outcome)
            records_outputs_pruned(outcome)
            case = dataclasses.replace(case, outcome=outcome)
        self.state.put(case.order_id, case)

    def _closing_outputs(self, case: Case) -> None:
        hold, order = case.hold, case.hold.get("order")
        if case.status == RELEASED:
            self.emitter.send(t.RELEASE, "som.Release", case.order_id, {
                "order_id": case.order_id, "order_number": hold["order_number"], "purchaser_dea": hold["purchaser_dea"],
                "supplier_dea": order["supplier_dea"] if order else "", "released_at": case.decided_at,
                "released_by": case.decided_by, "lines": order["lines"] if order else [],
                "decision_id": decision_id(case.order_id, REVIEWED_DECISION_VERSION),
                "decision_version": REVIEWED_DECISION_VERSION,
            })
            if order:
                self._outcome_to_monitor(case, "RELEASED")
            else:  # a v2 hold: the warehouse may ship, but there is nothing for the monitor to learn from
                self.emitter.audit(STAGE, "case.not_learned", "SKIPPED", order_id=case.order_id,
                                   purchaser_dea=hold["purchaser_dea"],
                                   detail={"reason": "the hold does not carry the order (written before v3)"})
        elif case.status == REPORTED:
            self._outcome_to_monitor(case, "REPORTED")
            report = report_for(case, self.reporting_dea)
            self.emitter.send(t.REPORTS, "som.SuspiciousOrderReport", case.order_id, report)
            self.emitter.audit(STAGE, "report.created", "REPORTED", order_id=case.order_id,
                               purchaser_dea=hold["purchaser_dea"],
                               detail={"report_id": report["report_id"], "lines": len(report["lines"])},
                               actor=case.decided_by)

        elif case.status == CANCELLED:
            self._outcome_to_monitor(case, "CANCELLED")

    def _outcome_to_monitor(self, case: Case, outcome: str) -> None:
        """The closed case for the monitor (``som.ClearedOrder`` on ``som.cleared``, keyed by purchaser DEA).

        RELEASED: it learns the order; every outcome: the open case of the
        order's families closes (REPORTED: they wait for a new limit).
        """
        hold, order = case.hold, case.hold.get("order")
        families = sorted({str(ln["drug_family"]).strip().upper() for ln in order["lines"]}) if order else sorted(
            {str(r["drug_family"]).upper() for r in hold["reasons"]} - {"*"})
        self.emitter.send(t.CLEARED, "som.ClearedOrder", hold["purchaser_dea"], {
            "order_id": case.order_id, "decision_id": case.decision_id, "cleared_by": case.decided_by,
            "cleared_at": case.decided_at, "order": order, "outcome": outcome,
            "purchaser_dea": hold["purchaser_dea"], "drug_families": families, "rationale": case.rationale,
        })

    def _refuse(self, case: Case | None, decision: dict[str, Any], refused: DecisionRefused) -> None:
        self.counts["refused"] += 1
        oid = decision["order_id"]
        self.emitter.audit(STAGE, "case.decision_refused", "REFUSED", order_id=oid,
                           purchaser_dea=case.hold["purchaser_dea"] if case else None,
                           detail={"code": refused.code, "error": refused.message, "action": decision["action"],
                                   "decision_id": decision["decision_id"], "actor": decision["actor"],
                                   "actor_role": decision["actor_role"]},
                           actor=decision["actor"] or "unknown")
        if case is None:
            log.warning("decision %s refused: %s", decision["decision_id"], refused.message)
            return  # no case to attach it to; the audit event carries it
        self._case_event(case, "REFUSED", at=decision["decided_at"], actor=decision["actor"], error=refused.message,
                         decision=decision)

    def _case_event(self, case: Case, kind: str, *, at: datetime, actor: str, error: str = "",
                    decision: dict[str, Any] | None = None, event_id: str | None = None) -> None:
        hold = case.hold
        if decision is not None:  # REFUSED or a registrant decision: that decision's particulars, not the case's
            decision_id, rationale, notes = decision["decision_id"], decision["rationale"], decision["evidence_notes"]
        elif kind in KIND_FOR.values():
            decision_id, rationale, notes = case.decision_id, case.rationale, case.evidence_notes
        else:
            decision_id, rationale, notes = None, "", ""
        order = hold.get("order")
        lines = order["lines"] if order else []
        families = {ln["drug_family"] for ln in lines} or {r["drug_family"] for r in hold["reasons"]} - {"*"}
        self.emitter.send(t.CASES, "som.CaseEvent", case.order_id, {
            "event_id": event_id or str(uuid.uuid4()), "order_id": case.order_id, "order_number": hold["order_number"],
            "purchaser_dea": hold["purchaser_dea"], "kind": kind, "status": case.status, "version": case.version,
            "at": at, "held_at": case.held_at, "due_at": case.due_at, "escalated_at": case.escalated_at,
            "actor": actor, "decision_id": decision_id, "rationale": rationale, "evidence_notes": notes,
            "error": error, "summary": hold["summary"], "drug_families": sorted(families),
            "total_dosage_units": sum(ln["dosage_units"] for ln in lines),
        })

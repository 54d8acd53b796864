"""The due-diligence case of one held order, as a state machine.

    HELD --RELEASE--> RELEASED   (ship it; the monitor learns the order)
    HELD --REPORT---> REPORTED   (do not ship; report it to DEA)
    HELD --CANCEL---> CANCELLED  (do not ship; not reported)

A closed case never reopens: 1301.74(b) lets a suspicious order ship only
after due diligence clears it, so a REPORTED or CANCELLED order must never be
released by a later click, and a RELEASED one cannot be un-shipped by a later
report (that is a new report about a shipped order, outside this workflow).
Every refusal says why in words an analyst can act on.

The clock: a case still HELD ``due_days`` calendar days after the hold is
escalated once. Escalation does not change the status; the order still may not
ship until someone decides.

Pure functions over plain values, so the Faust agent, the tests and any
replay reach the same decisions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping
from streams.core.errors import CsosError

HELD, RELEASED, REPORTED, CANCELLED = "HELD", "RELEASED", "REPORTED", "CANCELLED"
#: What each analyst action does to a HELD case.
ACTIONS = {"RELEASE": RELEASED, "REPORT": REPORTED, "CANCEL": CANCELLED}
#: The only role allowed to decide; viewers read.
DECIDING_ROLE = "analyst"
DEFAULT_DUE_DAYS = 7.0


class DecisionRefused(CsosError):
    """A decision that cannot be applied; the case is unchanged. ``code`` is stable, the message is for people."""
    code = "DECISION_REFUSED"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Case:
    order_id: str
    status: str
    version: int
    held_at: datetime
    due_at: datetime
    hold: Mapping[str, Any]
    escalated_at: datetime | None = None
    decision_id: str | None = None
    decided_by: str = ""
    decided_at: datetime | None = None
    rationale: str = ""
    evidence_notes: str = ""
    #: The last input applied and its exact outputs (``csos.state.OrderOutcome``), kept by the case agent.
    outcome: Mapping[str, Any] | None = None

    @property
    def closed(self) -> bool:
        return self.status != HELD

    def to_state(self) -> dict[str, Any]:
        """The ``som.state.Case`` record: the fields as they are, shared, not copied.

        Written once per changed case per batch. ``dataclasses.asdict`` deep-copied
        the hold (the whole order, its findings) and the recorded output bytes first,
        ~6 ms a case in the worker's profile, only for the encoder to read them once.
        The record is read, never changed, by whoever takes it; a case is frozen.
        """
        state = {f.name: getattr(self, f.name) for f in _FIELDS}
        state["hold"] = dict(self.hold)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Case":
        return cls(**{f.name: state[f.name] for f in _FIELDS if f.name in state})


_FIELDS = dataclasses.fields(Case)


def open_case(hold: Mapping[str, Any], due_days: float = DEFAULT_DUE_DAYS) -> Case:
    """A new HELD case for a ``som.Hold``; the clock starts when the monitor held the order."""
    if due_days <= 0:
        raise ValueError(f"the due-diligence period must be positive, got {due_days} days")
    held_at = hold["held_at"]
    return Case(order_id=hold["order_id"], status=HELD, version=1, held_at=held_at,
                due_at=held_at + timedelta(days=due_days), hold=hold)


def is_repeat(case: Case | None, decision: Mapping[str, Any]) -> bool:
    """Whether ``decision`` is the one that already closed ``case`` (a redelivery: apply once, refuse nothing)."""
    return case is not None and case.decision_id is not None and case.decision_id == decision["decision_id"]


def decide(case: Case | None, decision: Mapping[str, Any]) -> Case:
    """Apply an analyst's ``som.Decision``; raises :class:`DecisionRefused` when it may not be applied."""
    action = decision["action"]
    order_id = decision["order_id"]
    if case is None:
        raise DecisionRefused("UNKNOWN_CASE", f"There is no held order {order_id}: nothing to {action.lower()}.")
    if action not in ACTIONS:
        raise DecisionRefused("UNKNOWN_ACTION", f"Unknown action {action!r}; expected one of {', '.join(ACTIONS)}.")
    if decision["actor_role"] != DECIDING_ROLE:
        raise DecisionRefused(
            "NOT_AUTHORIZED",
            f"{decision['actor'] or 'Someone'} has the role {decision['actor_role']!r}; only an analyst may "
            f"{action.lower()} a held order.")
    if not decision["actor"].strip():
        raise DecisionRefused("ACTOR_REQUIRED", "A decision must name the analyst who made it.")
    if not decision["rationale"].strip():
        raise DecisionRefused("RATIONALE_REQUIRED",
                              f"A decision to {action.lower()} order {case.hold['order_number']} needs a rationale.")
    if case.closed:
        when = case.decided_at.strftime("%Y-%m-%d %H:%M UTC") if case.decided_at else "earlier"
        raise DecisionRefused(
            "CASE_CLOSED",
            f"Order {case.hold['order_number']} was already {case.status} by {case.decided_by or 'someone'} "
            f"({when}); a closed case cannot be {ACTIONS[action].lower()}.")
    return dataclasses.replace(
        case, status=ACTIONS[action], version=case.version + 1, decision_id=decision["decision_id"],
        decided_by=decision["actor"], decided_at=decision["decided_at"], rationale=decision["rationale"],
        evidence_notes=decision.get("evidence_notes") or "")


def escalate(case: Case, now: datetime) -> Case | None:
    """The escalated case if its clock has lapsed while still HELD and it was not escalated yet, else None."""
    if case.closed or case.escalated_at is not None or now < case.due_at:
        return None
    return dataclasses.replace(case, escalated_at=now, version=case.version + 1)

"""Decisions about a registrant rather than one held order: a new limit, the end of the relationship, onboarding.

    SET_LIMIT  a monthly limit (dosage units) for one drug family; after a
               REPORTED case it lets the family order again, up to the limit
    TERMINATE  the relationship ends: the monitor holds every later order
    ONBOARDED  the new-customer review is done: its own history counts

They travel on ``som.decisions`` like the case decisions (same checks: an
analyst, named, with a rationale) and are usually made from a case (``order_id``
names it; the registrant is then the case's). They close no case: the case
agent checks them (:func:`check`) and hands them to the monitor as a
``som.ClearedOrder`` with the matching ``outcome`` (:func:`outcome_for`), keyed by
purchaser DEA on ``som.cleared``, where they change the registrant's
due-diligence state (``streams.monitoring.open_cases``).

Pure functions, like :mod:`.machine`.
"""
from __future__ import annotations

from typing import Any, Mapping

from streams.cases.machine import DECIDING_ROLE, Case, DecisionRefused

#: Registrant decision action -> the ``som.CaseOutcome`` the monitor applies, and its case-event kind.
REGISTRANT_ACTIONS = {"SET_LIMIT": "SET_LIMIT", "TERMINATE": "TERMINATED", "ONBOARDED": "ONBOARDED"}
EVENT_KINDS = {"SET_LIMIT": "LIMIT_SET", "TERMINATE": "TERMINATED", "ONBOARDED": "ONBOARDED"}


def _families(case: Case | None) -> list[str]:
    if case is None:
        return []
    order = case.hold.get("order")
    lines = order["lines"] if order else []
    fams = {str(ln["drug_family"]).strip().upper() for ln in lines}
    return sorted(fams or {str(r["drug_family"]).upper() for r in case.hold["reasons"]} - {"*"})


def check(case: Case | None, decision: Mapping[str, Any]) -> tuple[str, str, int | None]:
    """(purchaser DEA, drug family or "", monthly units or None) of a valid decision; raises DecisionRefused."""
    action = decision["action"]
    what = action.lower().replace("_", " ")
    if decision["actor_role"] != DECIDING_ROLE:
        raise DecisionRefused("NOT_AUTHORIZED", f"{decision['actor'] or 'Someone'} has the role "
                                                f"{decision['actor_role']!r}; only an analyst may {what}.")
    if not decision["actor"].strip():
        raise DecisionRefused("ACTOR_REQUIRED", "A decision must name the analyst who made it.")
    if not decision["rationale"].strip():
        raise DecisionRefused("RATIONALE_REQUIRED", f"A decision to {what} needs a rationale.")
    given = str(decision.get("purchaser_dea") or "").strip().upper()
    of_case = str(case.hold["purchaser_dea"]).upper() if case is not None else ""
    if given and of_case and given != of_case:
        raise DecisionRefused("REGISTRANT_MISMATCH", f"Case {case.order_id} is of registrant {of_case}, "  # type: ignore[union-attr]
                                                     f"not {given}.")
    dea = given or of_case
    if not dea:
        raise DecisionRefused("UNKNOWN_REGISTRANT" if decision["order_id"] else "REGISTRANT_REQUIRED",
                              f"No registrant to {what}: name one, or decide from one of its cases.")
    if action != "SET_LIMIT":
        return dea, "", None
    family = str(decision.get("drug_family") or "").strip().upper()
    fams = _families(case)
    if not family and len(fams) == 1:
        family = fams[0]
    if not family:
        raise DecisionRefused("FAMILY_REQUIRED", "A limit is per drug family: say which one.")
    units = decision.get("monthly_limit_units")
    if units is None or units < 0:
        raise DecisionRefused("LIMIT_REQUIRED", f"Give the monthly limit for {family} in dosage units (0 or more).")
    return dea, family, int(units)


def outcome_for(case: Case | None, decision: Mapping[str, Any], dea: str, family: str,
                units: int | None) -> dict[str, Any]:
    """The ``som.ClearedOrder`` (outcome SET_LIMIT / TERMINATED / ONBOARDED) the monitor applies."""
    return {
        "order_id": case.order_id if case is not None else "", "decision_id": decision["decision_id"],
        "cleared_by": decision["actor"], "cleared_at": decision["decided_at"], "order": None,
        "outcome": REGISTRANT_ACTIONS[decision["action"]], "purchaser_dea": dea,
        "drug_families": [family] if family else [], "monthly_limit_units": units,
        "rationale": decision["rationale"],
    }

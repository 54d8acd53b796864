"""A suspicious order report for DEA from a REPORTED case (21 CFR 1301.74(b)).

The fields are those DEA proposed for its centralized suspicious order
database: ordering registrant DEA number, date received, reporting registrant
DEA number, NDC, unit, strength, quantity, order form number, a unique
transaction identifier, and the circumstances. The circumstances combine the
monitor's findings (numbers included) with the analyst's rationale and
evidence, so the report stands on its own when DEA reads it.
"""
from __future__ import annotations

import uuid
from typing import Any

from streams.cases.machine import REPORTED, Case


def circumstances(case: Case) -> str:
    hold = case.hold
    parts = [f"Held by suspicious order monitoring on {hold['held_at']:%Y-%m-%d %H:%M} UTC: {hold['summary']}"]
    parts.append(f"Due diligence by {case.decided_by}: {case.rationale.strip()}")
    if case.evidence_notes.strip():
        parts.append(f"Evidence: {case.evidence_notes.strip()}")
    if case.escalated_at is not None:
        parts.append(f"The due-diligence period lapsed on {case.due_at:%Y-%m-%d}; the case was escalated.")
    return " ".join(p if p.endswith(".") else p + "." for p in parts)


def report_for(case: Case, reporting_registrant_dea: str = "") -> dict[str, Any]:
    """The ``som.SuspiciousOrderReport`` for a REPORTED case.

    ``reporting_registrant_dea`` defaults to the supplier named on the order
    (the distributor that received it). A hold written before holds carried
    the order (schema v2) still gives a report, without lines and saying so,
    rather than none. Raises ``ValueError`` for a case that is not REPORTED.
    """
    if case.status != REPORTED:
        raise ValueError(f"order {case.order_id} is {case.status}, not REPORTED")
    hold = case.hold
    order = hold.get("order") or {
        "order_id": hold["order_id"], "order_number": hold["order_number"], "purchaser_dea": hold["purchaser_dea"],
        "purchaser_name": "", "supplier_dea": "", "received_at": hold["held_at"], "lines": []}
    text = circumstances(case)
    if not order["lines"]:
        text += " The order lines are not in this hold (written before holds carried the order); see order_lines."
    lines = [{
        "line_no": ln["line_no"], "transaction_id": f"{order['order_id']}/{ln['line_no']}", "ndc": ln["ndc"],
        "product_name": ln["product_name"], "strength": ln["strength"],
        "unit": f"package of {ln['package_quantity']} dosage units", "package_quantity": ln["package_quantity"],
        "quantity": ln["packages"], "dosage_units": ln["dosage_units"], "drug_family": ln["drug_family"],
        "schedule": ln["schedule"],
    } for ln in order["lines"]]
    return {
        "report_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"csos-sor:{case.order_id}:{case.decision_id}")),
        "order_id": order["order_id"], "order_form_number": order["order_number"],
        "ordering_registrant_dea": order["purchaser_dea"], "ordering_registrant_name": order["purchaser_name"],
        "reporting_registrant_dea": reporting_registrant_dea or order["supplier_dea"],
        "date_received": order["received_at"], "reported_at": case.decided_at, "reported_by": case.decided_by,
        "circumstances": text, "lines": lines,
    }

"""The open-case rule: once an order is held, the registrant's later orders of that family wait for due diligence.

Why: a suspicious order may not ship until due diligence dispels the
suspicion (Masters Pharmaceutical v. DEA, 861 F.3d 206), and in the opioid
litigation a flagged customer's later orders were treated as suspicious until
that was done. Without the rule, the held head of a burst is not learned but
its released tail is, and the rest of the burst ships.

State (``som.state.DueDiligence``, the ``due_diligence`` sub-record of the
registrant's monitor state, a plain dict kept by :class:`RegistrantBaselines`):

* ``open[family]``: the case (the first held order's id) that holds every
  later order of the family (finding ``open_case``). Closed by RELEASED or
  CANCELLED of that case. Later orders held with findings of their own are
  queued in ``pending``: if the first case is released, the next of them
  becomes the open case, so its own suspicion still holds the family.
* ``reported[family]``: a case was REPORTED; orders of the family are held
  (``reported_pending_limit``) until an analyst sets a limit (SET_LIMIT).
* ``limits[family]``: an analyst's monthly limit; the calendar month's units,
  the order included, above it are held (``analyst_limit``).
* ``terminated``: TERMINATE ends the relationship; every later order is held
  (``terminated_customer``). Final: no decision lifts it.
* ``first_seen_ms`` / ``onboarded_ms``: the new-customer period (:mod:`.onboarding`).
* ``cleared[family]``: the latest month whose volume an analyst cleared by releasing a held order
  of the family (the ``ramp_2x`` guard holds again only well above it).

Each held order still gets its own case and needs its own decision: a
RELEASED first case opens the gate for new orders but does not ship the orders
that joined it (an analyst vouched for one order, not for the ones after it).

These findings are consequences of decisions already taken, not detections:
they are always enforced, whatever ``hold_detectors`` says, so every policy of
the evaluation is judged with the same due diligence.

The monitor learns the outcomes from ``som.ClearedOrder`` records (keyed by
purchaser DEA on ``som.cleared``, written by the case agent): :func:`apply_outcome`.
:class:`SimulatedDueDiligence` plays the analyst in the offline evaluation.
"""
from __future__ import annotations

import heapq
from datetime import datetime, timezone
from typing import Any, Mapping, MutableMapping

from streams.monitoring.baselines import (  # noqa: F401 - new_due_diligence: re-exported, open cases fill it
    MS_PER_DAY, RegistrantBaselines, month_name, month_of, new_due_diligence, to_ms)
from streams.monitoring.detectors import Finding, fmt_n, finding

OPEN_CASE = "open_case"
REPORTED_PENDING_LIMIT = "reported_pending_limit"
ANALYST_LIMIT = "analyst_limit"
TERMINATED_CUSTOMER = "terminated_customer"
#: Findings of this module: always enforced, never a policy of their own in the evaluation.
DUE_DILIGENCE_RULES = (OPEN_CASE, REPORTED_PENDING_LIMIT, ANALYST_LIMIT, TERMINATED_CUSTOMER)
#: Outcomes (``som.CaseOutcome``) the monitor applies.
RELEASED, REPORTED, CANCELLED = "RELEASED", "REPORTED", "CANCELLED"
SET_LIMIT, TERMINATED, ONBOARDED = "SET_LIMIT", "TERMINATED", "ONBOARDED"
OUTCOMES = (RELEASED, REPORTED, CANCELLED, SET_LIMIT, TERMINATED, ONBOARDED)
#: Bounds that keep the sub-record small whatever happens.
PENDING_KEPT = 16
APPLIED_KEPT = 32


def _case_text(case_id: str) -> str:
    return f"case {case_id}"


def findings(base: RegistrantBaselines, order: Any) -> list[Finding]:
    """The due-diligence findings for an order (``OrderFacts``): empty for a registrant with nothing pending."""
    dd = base.due_diligence
    if not (dd["open"] or dd["reported"] or dd["limits"] or dd["terminated"]):
        return []
    out: list[Finding] = []
    term = dd["terminated"]
    if term:
        out.append(finding(
            TERMINATED_CUSTOMER, "pattern", "*", 1.0, 0.0, 0.0, f"terminated {_day(term['at_ms'])}", True,
            f"The relationship with this registrant was ended by {term['by'] or 'an analyst'} on "
            f"{_day(term['at_ms'])} (from {_case_text(term['case_id']) if term['case_id'] else 'a review'}): "
            f"every order is held."))
    for fam in order.families:
        rep = dd["reported"].get(fam)
        if rep is not None:
            out.append(finding(
                REPORTED_PENDING_LIMIT, "pattern", fam, 1.0, 0.0, 0.0, _case_text(rep["case_id"]), True,
                f"{fam}: {_case_text(rep['case_id'])} was reported to DEA on {_day(rep['at_ms'])}; orders of "
                f"{fam} are held until an analyst sets a new monthly limit for this registrant."))
        case = dd["open"].get(fam)
        if case is not None:
            out.append(finding(
                OPEN_CASE, "pattern", fam, float(case["joined"] + 1), 0.0, 0.0, _case_text(case["case_id"]), True,
                f"{fam}: joins open {_case_text(case['case_id'])} (held {_day(case['opened_ms'])}); "
                f"later orders of {fam} are held until due diligence decides it."))
        limit = dd["limits"].get(fam)
        if limit is not None and rep is None:
            m = base.monthly(fam, order)
            fired = m.current > limit["units"]
            out.append(finding(
                ANALYST_LIMIT, "size", fam, float(m.current), float(limit["units"]), float(limit["units"]),
                f"calendar month {month_name(m.month)}; limit set by {limit['by'] or 'an analyst'}", fired,
                f"{fam} in {month_name(m.month)}: {fmt_n(m.current)} dosage units with this order; the monthly "
                f"limit an analyst set for this registrant on {_day(limit['at_ms'])} is {fmt_n(limit['units'])}"
                + ("; exceeded." if fired else "; within it.")))
    return out


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d") if ms else "?"


def _families(order: Mapping[str, Any]) -> list[str]:
    """The drug families of a verified order, spelled as ``order_facts`` spells them."""
    return sorted({str(ln["drug_family"]).strip().upper() or "UNKNOWN" for ln in order["lines"]})


def note_verdict(dd: MutableMapping[str, Any], order: Mapping[str, Any], verdict: Mapping[str, Any]) -> bool:
    """Record a verdict in the sub-record; True if it changed (the state must be written).

    The first order of a registrant starts its new-customer period. A HOLD
    opens a case for every family with an enforced finding of its own (a
    finding for the whole order, family ``*``, opens one for each family of
    the order) that has none open yet; a family already held by an open case
    counts the order as joined, and queues it when it also has findings of its own.
    """
    changed = False
    if not dd["first_seen_ms"]:
        dd["first_seen_ms"] = to_ms(order["received_at"])
        changed = True
    if verdict["verdict"] != "HOLD" or dd["terminated"]:
        return changed
    own: set[str] = set()
    gated: set[str] = set()
    for r in verdict["reasons"]:
        if not (r["fired"] and r.get("enforced", True)):
            continue
        if r["detector"] in DUE_DILIGENCE_RULES and r["detector"] != ANALYST_LIMIT:
            gated.add(r["drug_family"])
        elif r["drug_family"] == "*":
            own.update(_families(order))
        else:
            own.add(r["drug_family"])
    at = to_ms(verdict["received_at"])
    oid = str(order["order_id"])
    for fam in sorted(own | gated):
        if fam in dd["reported"]:
            continue  # the report's case holds the family; this order has its own case
        case = dd["open"].get(fam)
        if case is None:
            if fam in own:
                dd["open"][fam] = {"case_id": oid, "opened_ms": at, "joined": 0, "pending": []}
        elif case["case_id"] != oid:
            case["joined"] += 1
            if fam in own and oid not in case["pending"]:
                case["pending"] = (case["pending"] + [oid])[-PENDING_KEPT:]
        changed = True
    return changed


def apply_outcome(dd: MutableMapping[str, Any], outcome: Mapping[str, Any]) -> bool:
    """Apply a due-diligence outcome (a ``som.ClearedOrder`` dict) to the sub-record; False if already applied.

    RELEASED / CANCELLED of an open case close it (the next queued order with
    findings of its own becomes the open case); REPORTED turns the family into
    ``reported`` until SET_LIMIT; TERMINATED holds everything from now on;
    ONBOARDED ends the new-customer period.
    """
    did = str(outcome["decision_id"])
    kind = outcome.get("outcome") or RELEASED
    families = [str(f).strip().upper() for f in outcome.get("drug_families") or []]
    if kind not in OUTCOMES:  # validated before anything changes: a refused outcome leaves the state as it was
        raise ValueError(f"unknown due-diligence outcome {kind!r}; expected one of {', '.join(OUTCOMES)}")
    units = outcome.get("monthly_limit_units")
    if kind == SET_LIMIT and (units is None or units < 0 or not families):
        raise ValueError(f"SET_LIMIT {did} needs a drug family and a monthly limit of at least 0 units")
    if did in dd["applied"]:
        return False
    dd["applied"] = (dd["applied"] + [did])[-APPLIED_KEPT:]
    case_id = str(outcome.get("order_id") or "")
    at = to_ms(outcome["cleared_at"])
    by = str(outcome.get("cleared_by") or "")
    if kind == RELEASED:
        _record_cleared(dd, outcome, families, at)
    if kind in (RELEASED, CANCELLED):
        for fam, case in list(dd["open"].items()):
            if case["case_id"] == case_id:
                if case["pending"]:
                    nxt = case["pending"][0]
                    dd["open"][fam] = dict(case, case_id=nxt, pending=case["pending"][1:], joined=0)
                else:
                    del dd["open"][fam]
            elif case_id in case["pending"]:
                case["pending"] = [x for x in case["pending"] if x != case_id]
    elif kind == REPORTED:
        hit = [fam for fam, case in dd["open"].items() if case["case_id"] == case_id or case_id in case["pending"]]
        gated = hit or [f for f in families if f in dd["open"]] or families
        for fam in gated:
            dd["open"].pop(fam, None)
            dd["reported"][fam] = {"case_id": case_id, "at_ms": at, "by": by}
    elif kind == SET_LIMIT:
        for fam in families:
            dd["reported"].pop(fam, None)
            dd["limits"][fam] = {"units": int(units), "at_ms": at, "by": by, "decision_id": did}  # type: ignore[arg-type]
    elif kind == TERMINATED:
        if not dd["terminated"]:
            dd["terminated"] = {"at_ms": at, "by": by, "case_id": case_id, "decision_id": did}
    elif kind == ONBOARDED and not dd["onboarded_ms"]:
        dd["onboarded_ms"], dd["onboarded_by"] = at, by
    return True


def _record_cleared(dd: MutableMapping[str, Any], outcome: Mapping[str, Any], families: list[str], at: int) -> None:
    """A RELEASED held order clears its month's volume of its families (``cleared[family]`` = that month).

    Why: the long-memory guard (``ramp_2x``) holds a family whose month doubles its trailing-12-month
    average, as the 2x rule does; a store that grew legitimately would then be held on every order
    until its average caught up. Once an analyst has looked and released, the guard holds again only
    above ``ramp_2x_cleared_ratio`` x the cleared month's learned units (see ``RampGuardDetector``).
    The month is the held order's (the outcome's ``order``), else the decision's.
    """
    order = outcome.get("order")
    if order:
        families = families or _families(order)
        month = month_of(to_ms(order["received_at"]))
    else:
        month = month_of(at)
    cleared = dd.setdefault("cleared", {})
    for fam in families:
        cleared[fam] = max(int(cleared.get(fam, 0)), month)


# --------------------------------------------------------------------------- the evaluation's analyst
class SimulatedDueDiligence:
    """A simulated analyst for the offline evaluation: decides each held order ``review_days`` after its hold.

    With labels (order id -> ``{label, episode_start}``): a ``suspicious``
    order's case is REPORTED, and at once a limit is set for each reported
    family at the registrant's pre-episode level (``limit_headroom``, 1.5, x the
    largest learned month of the family before the episode's month, 0 if none); a registrant with
    nothing learned before the episode (a new pill mill) is TERMINATED. Like a real analyst reading the
    distributor's order history, it reads every learned month it has seen, not only the 13 the
    monitor's state keeps: an episode decided more than a year after it began would otherwise look like
    a customer with no history before it, and an established pharmacy would be terminated. Any other order (``normal``, and
    ``grey``: an analyst cannot tell the start of a ramp from growth) is
    RELEASED and learned. Without labels every case is RELEASED (the analyst
    found nothing), so unlabelled replays still show the rule's cost.

    Use (see ``streams.tools.evaluation.run_policy``)::

        dd = SimulatedDueDiligence(monitor, labels, review_days)
        for order in orders:
            dd.before(order, base)          # decisions due by this order's time
            verdict = monitor.score(base, order)
            ...learn if released...
            dd.after(order, base, verdict)  # opens cases, schedules the analyst
    """

    def __init__(self, monitor: Any, labels: Mapping[str, Mapping[str, Any]] | None = None,
                 review_days: float = 2.0, limit_headroom: float = 1.5) -> None:
        self.monitor = monitor
        #: The limit is this multiple of the pre-episode month: an analyst leaves room for ordinary variation.
        self.limit_headroom = limit_headroom
        self.labels = labels
        self.review_ms = int(review_days * MS_PER_DAY)
        self._due: dict[str, list[tuple[int, int, Mapping[str, Any]]]] = {}
        self._seq = 0
        self.counts = {RELEASED: 0, REPORTED: 0, SET_LIMIT: 0, TERMINATED: 0}
        #: registrant -> family -> month -> learned units: the order history the analyst reads (see the class)
        self._history: dict[str, dict[str, dict[int, int]]] = {}

    def before(self, order: Mapping[str, Any], base: RegistrantBaselines) -> None:
        """Apply every decision on this registrant's cases that is due by the order's time."""
        dea = str(order["purchaser_dea"])
        self._remember(dea, base, _families(order))
        queue = self._due.get(dea)
        at = to_ms(order["received_at"])
        while queue and queue[0][0] <= at:
            due, _, held = heapq.heappop(queue)
            self._decide(base, held, due)

    def after(self, order: Mapping[str, Any], base: RegistrantBaselines, verdict: Mapping[str, Any] | None) -> None:
        """Record the verdict (None: the order could not be scored, held) and schedule a held order's review."""
        if verdict is None:
            verdict = {"verdict": "HOLD", "reasons": [], "received_at": order["received_at"]}
        note_verdict(base.due_diligence, order, verdict)
        if verdict["verdict"] == "HOLD":
            self.schedule(order)

    def _remember(self, dea: str, base: RegistrantBaselines, families: list[str]) -> list[dict[int, int]]:
        """Copy these families' learned months into the analyst's history (before the state prunes them).

        A family's months are pruned only when an order of it is learned, and this runs before each
        order of it is scored, so no month leaves the state unseen.
        """
        history = self._history.setdefault(dea, {})
        out = []
        for fam in families:
            months = history.setdefault(fam, {})
            fb = base.family(fam)
            for m, u in (fb.months.cells.items() if fb else ()):  # type: ignore[union-attr]
                if u > months.get(m, 0):
                    months[m] = u
            out.append(months)
        return out

    def schedule(self, order: Mapping[str, Any]) -> None:
        """Put a held order on the analyst's desk: decided ``review_days`` after its receipt."""
        self._seq += 1
        heapq.heappush(self._due.setdefault(str(order["purchaser_dea"]), []),
                       (to_ms(order["received_at"]) + self.review_ms, self._seq, order))

    def _decide(self, base: RegistrantBaselines, held: Mapping[str, Any], due_ms: int) -> None:
        label = (self.labels or {}).get(str(held["order_id"])) or {}
        oid = str(held["order_id"])
        families = _families(held)
        common = {"order_id": oid, "cleared_by": "simulated-analyst", "cleared_at": due_ms,
                  "drug_families": families}
        if label.get("label") != "suspicious":
            self.monitor.learn_into(base, held)
            apply_outcome(base.due_diligence, dict(common, decision_id=f"{oid}#released", outcome=RELEASED,
                                                   order=held))
            self.counts[RELEASED] += 1
            return
        dd = base.due_diligence
        apply_outcome(dd, dict(common, decision_id=f"{oid}#reported", outcome=REPORTED))
        self.counts[REPORTED] += 1
        start = label.get("episode_start")
        before = month_of(to_ms(start)) if start is not None else month_of(to_ms(held["received_at"]))
        if not base.total_orders or month_of(base.first_order_ms) >= before:
            # nothing learned before the episode: a new customer that was suspicious from the start
            apply_outcome(dd, dict(common, decision_id=f"{oid}#terminated", outcome=TERMINATED))
            self.counts[TERMINATED] += 1
            return
        dea = str(held["purchaser_dea"])
        for fam in [f for f in families if f in dd["reported"]]:
            [months] = self._remember(dea, base, [fam])
            # the family's largest learned month before the episode; none: the family is not allowed (limit 0)
            level = max((u for m, u in months.items() if m < before), default=0)
            apply_outcome(dd, dict(common, decision_id=f"{oid}#limit-{fam}", outcome=SET_LIMIT,
                                   drug_families=[fam], monthly_limit_units=int(level * self.limit_headroom)))
            self.counts[SET_LIMIT] += 1


def label_index(labels: Any) -> dict[str, Mapping[str, Any]] | None:
    """Labels as a mapping by order id (from a mapping, a sequence of label dicts, or None)."""
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        return dict(labels)
    return {str(lab["order_id"]): lab for lab in labels}


__all__ = ["DUE_DILIGENCE_RULES", "OPEN_CASE", "REPORTED_PENDING_LIMIT", "ANALYST_LIMIT", "TERMINATED_CUSTOMER",
           "OUTCOMES", "new_due_diligence", "findings", "note_verdict", "apply_outcome", "SimulatedDueDiligence",
           "label_index"]

"""What a verdict carries of an order's findings: every fired one, and per detector the closest call.

Why a module of its own: it runs over every finding of every order (~110 for a
typical pharmacy order), which made it the costliest part of ``Monitor.score``
left interpreted (~30 us of ~300 per order). It is compiled with mypyc
(``streams.core.native.COMPILED``); ``monitor.py``, which tools and tests
wrap, stays interpreted and calls it.
"""
from __future__ import annotations

from typing import Any, Callable, Container, Mapping

from streams.monitoring import open_cases
from streams.monitoring.baselines import OrderFacts, RegistrantBaselines
from streams.monitoring.detectors import Finding, Reason, as_reason, finding

#: What ``Monitor`` runs per order: (a detector's bound ``score_one``, whether the anomaly score combines its
#: findings), in the detectors' order.
Plan = list[tuple[Callable[[RegistrantBaselines, OrderFacts], list[Finding]], bool]]


def verdict(plan: Plan, combiner: Any, deciding: Container[str], base: RegistrantBaselines, facts: OrderFacts,
            order: Mapping[str, Any], decided_at: Any, model_version: str) -> dict[str, Any]:
    """``Monitor.score``'s ``som.Verdict``: the order's findings (:func:`findings_of`, then ``replay`` for an order
    already learned), its evidence, and HOLD if a deciding detector fired (never for a replay).

    Compiled, as the loops it calls: interpreted, this per-order glue and the verdict's dict were ~5 % of
    scoring. ``decided_at`` comes from ``monitor.py``, whose clock tests and ``bench_worker --digest`` patch.
    """
    findings = findings_of(plan, combiner, base, facts)
    replay = base.has_learned(facts.order_id)
    if replay:
        findings.append(finding(
            "replay", "pattern", "*", 1.0, 0.0, 0.0, "last orders learned", False,
            "This order was already scored, released and learned; the earlier RELEASE is repeated."))
    reasons = evidence(findings, deciding)
    held = not replay and holds(reasons)
    return {
        "order_id": order["order_id"],
        "order_number": order["order_number"],
        "purchaser_dea": order["purchaser_dea"],
        "verdict": "HOLD" if held else "RELEASE",
        "decided_at": decided_at,
        "received_at": order["received_at"],
        "signed_at": order["signed_at"],
        "model_version": model_version,
        "reasons": reasons,
        "lines": order["lines"],
        "total_dosage_units": facts.total_units,
    }


def findings_of(plan: Plan, combiner: Any, base: RegistrantBaselines, facts: OrderFacts) -> list[Finding]:
    """An order's findings: every detector's in ``plan`` order, then the anomaly score's (``combiner``, None for
    none) over those it combines, then the due-diligence findings (open case, report, limit, termination).

    Compiled for the same reason as :func:`evidence`: the loop runs once per order over ~17 detectors.
    """
    findings: list[Finding] = []
    measures: list[Finding] = []  # the findings the anomaly score combines (~half of them)
    for score_one, combined in plan:
        found = score_one(base, facts)
        findings.extend(found)
        if combined:
            measures.extend(found)
    if combiner is not None:
        findings.extend(combiner.combine(measures))
    # Decisions already taken (open case, report, analyst limit, termination): always enforced.
    findings.extend(open_cases.findings(base, facts))
    return findings


def evidence(findings: list[Finding], deciding: Container[str]) -> list[Reason]:
    """The findings a verdict carries, as ``som.Reason`` records: every one that fired, and per detector the closest call.

    Detectors run for every drug family on the order (~110 findings for a
    typical pharmacy order). An auditor asking "why was this released?" needs,
    for each detector, the family that came nearest its threshold, with the
    numbers; the sentence is written only for findings that fired (what the
    analyst reads). This keeps a verdict ~1 KB instead of ~12 KB on every topic
    and table it flows through. Only these ~20 become dicts (``enforced``: the
    detector is in ``deciding``); the others stay the tuples they were built as.
    Closeness is value / threshold (0 when the threshold is not positive or
    cannot be reached); the first of equally close findings wins.
    """
    fired: list[Reason] = []
    closest: dict[str, tuple[float, Finding]] = {}  # detector -> (closeness, finding); the first wins a tie
    # A detector's findings come one after another: the running best of a run of one detector is kept in
    # locals and stored once per run (~20 dict writes per order instead of ~110 reads and writes). The run
    # starts from the detector's best so far, so the result is the one-by-one comparison's, ties and all.
    run_det: str | None = None
    run_near = 0.0
    run_best: Finding = ()
    for f in findings:  # (detector, dimension, family, value, baseline, threshold, window, fired, explanation)
        if f[7]:
            fired.append(as_reason(f, f[0] in deciding))
            continue
        # finding() stores the numbers as floats: compiled, the closeness is arithmetic on doubles.
        t: float = f[5]
        value: float = f[3]
        near = value / t if 0 < t < 1e300 else 0.0
        det: str = f[0]
        if det != run_det:
            if run_det is not None:
                closest[run_det] = (run_near, run_best)
            run_det = det
            best = closest.get(det)
            if best is None or near > best[0]:
                run_near, run_best = near, f
            else:
                run_near, run_best = best
        elif near > run_near:
            run_near, run_best = near, f
    if run_det is not None:
        closest[run_det] = (run_near, run_best)
    for d in sorted(closest):
        r = as_reason(closest[d][1], d in deciding)
        r["explanation"] = ""
        fired.append(r)
    return fired


def holds(reasons: list[Reason]) -> bool:
    """Whether a deciding detector fired among the reasons :func:`evidence` kept (it keeps every fired one).

    Compiled beside :func:`evidence`: the interpreted generator it replaces cost a frame per reason.
    """
    for r in reasons:
        if r["fired"] and r["enforced"]:
            return True
    return False

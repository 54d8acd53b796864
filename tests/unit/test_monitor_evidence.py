"""The verdict's evidence: every fired finding, and per detector the one that came nearest its threshold.

``monitor.evidence`` keeps each detector's running best while that detector's findings follow one another
(issue 14: fewer dict writes per order); the result must be the plain one-by-one comparison's, including when
a detector's findings come in several runs, on ties (the first wins) and on NaN closeness.
"""
from __future__ import annotations

import random
from typing import Any

from streams.monitoring.detectors import as_reason, finding
from streams.monitoring.evidence import evidence


def _one_by_one(findings: list[tuple], deciding: set[str]) -> list[dict[str, Any]]:
    """The reference: each non-fired finding compared with its detector's best so far, strictly."""
    fired, closest = [], {}
    for f in findings:
        if f[7]:
            fired.append(as_reason(f, f[0] in deciding))
            continue
        near = f[3] / f[5] if 0 < f[5] < 1e300 else 0.0
        if f[0] not in closest or near > closest[f[0]][0]:
            closest[f[0]] = (near, f)
    for d in sorted(closest):
        r = as_reason(closest[d][1], d in deciding)
        r["explanation"] = ""
        fired.append(r)
    return fired


def test_evidence_matches_one_by_one_comparison() -> None:
    rng = random.Random(14)
    detectors = ["size", "ramp", "anomaly", "open_case", "volume_30d"]
    for _ in range(400):
        findings = []
        for _ in range(rng.randint(0, 25)):
            det = rng.choice(detectors)
            value = rng.choice([0.0, 1.0, 2.0, float("nan"), rng.uniform(0, 5)])  # repeats make ties
            threshold = rng.choice([0.0, 1.0, 2.0, 1e301, rng.uniform(0.5, 3)])
            fam = rng.choice(["A", "B", "C"])
            findings.append(finding(det, "size", fam, value, 1.0, threshold, f"w{len(findings)}",
                                    rng.random() < 0.1, "text"))
        got = evidence(findings, {"size", "open_case"})
        want = _one_by_one(findings, {"size", "open_case"})
        assert [(r["detector"], r["window"], r["enforced"], r["explanation"]) for r in got] == \
            [(r["detector"], r["window"], r["enforced"], r["explanation"]) for r in want]

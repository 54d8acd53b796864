"""Combined anomaly score: several measures high at once, none past its own threshold.

Each learned detector compares one per-registrant feature with its own
baseline and threshold. An order can be unusual on several of them at once
(30-day volume at 2.5x, a third order in 24 hours, above its peers) without
any single one firing. This module normalises every finding the same way and
combines them:

* per finding, ``s = ln(value / baseline) / ln(threshold / baseline)``: how far
  the value went from its baseline towards its threshold on a log scale
  (0 = at the baseline, 1 = at the threshold; below the baseline counts 0,
  beyond the threshold counts 1: that measure fires on its own, and the
  combination is about breadth, so one extreme measure cannot carry it);
  for ``timing`` the rarity of the order's time, ``ln(1/share) / ln(1/max_share)``;
* per drug family, the combined score is the Euclidean norm of those
  fractions (the order's ``timing`` fraction joins every family), and the
  finding fires above ``anomaly_threshold``.

Why a combination and not ``river.anomaly.HalfSpaceTrees``: a tree ensemble
is one model over all registrants, and the monitor's only state is the
per-registrant Faust table (partitioned by DEA number), so a global model
could not be restored on another worker after a rebalance. The normalised
features already carry each registrant's own baseline; the combination needs
no state of its own, and its one threshold is calibrated on the scenarios
(``csos evaluate scenarios`` reports it as its own policy).
"""
from __future__ import annotations

import math
from typing import ClassVar, Final, Iterable

from streams.monitoring.detectors import _MAX, MonitorConfig, Finding, Reason, as_finding, as_reason, finding

#: The learned per-family detectors whose findings are combined (static rules and new_family are not features).
FEATURES = ("size", "volume_30d", "frequency_24h", "frequency_7d", "family_mix", "trend", "peer_volume")
TIMING: Final = "timing"
_FINITE: Final = 1e300
_FEATURES: Final = frozenset(FEATURES)


def fraction(r: Reason, timing_max_share: float) -> float | None:
    """How far a finding went towards its threshold, on a log scale; None when it has no baseline yet."""
    return _fraction(r["detector"], r["value"], r["baseline"], r["threshold"], timing_max_share)


def _fraction(detector: str, v: float, b: float, t: float, timing_max_share: float) -> float | None:
    if detector == TIMING:
        if t >= _FINITE:
            return None
        share = max(b, 1e-3)
        return min(1.0, max(0.0, math.log(1.0 / share) / math.log(1.0 / timing_max_share)))
    if not (0 < b < t < _FINITE) or v <= 0:
        return None  # cold start or not applicable: the ceilings judge alone
    return min(1.0, max(0.0, math.log(v / b) / math.log(t / b)))


class AnomalyCombiner:
    """Scores the findings of one order (before they are trimmed to the evidence) into ``anomaly`` findings."""

    name = "anomaly"
    dimension = "pattern"
    #: The detectors whose findings it reads (the monitor passes it only theirs: the others would be skipped).
    inputs: ClassVar[frozenset[str]] = frozenset(FEATURES) | {TIMING}

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg

    def score(self, reasons: Iterable[Reason]) -> list[Reason]:
        """The ``anomaly`` findings of ``som.Reason`` records (what :meth:`combine` does on findings)."""
        return [as_reason(f) for f in self.combine([as_finding(r) for r in reasons])]

    def combine(self, findings: Iterable[Finding]) -> list[Finding]:
        """One ``anomaly`` finding per drug family of the learned ``findings`` of one order."""
        per_family: dict[str, list[tuple[Finding, float]]] = {}
        timing: tuple[Finding, float] | None = None
        max_share = self.cfg.timing_max_share
        for r in findings:  # (detector, dimension, family, value, baseline, threshold, ...): see detectors.Finding
            det = r[0]
            if det in _FEATURES:
                fam: str = r[2]
                parts = per_family.get(fam)
                if parts is None:
                    parts = per_family[fam] = []
                # Typed as the floats finding() makes them: compiled, the comparisons and logs below are C
                # arithmetic on doubles (math.log called directly, not through a local alias).
                b: float = r[4]
                if b > 0:  # fraction(), inlined: ~40 findings per order
                    v: float = r[3]
                    t: float = r[5]
                    if b < t < _FINITE and v > 0:
                        s = math.log(v / b) / math.log(t / b)
                        parts.append((r, 0.0 if s <= 0.0 else 1.0 if s > 1.0 else s))
            elif det == TIMING:
                share = _fraction(det, r[3], r[4], r[5], max_share)
                timing = (r, share) if share is not None else None
        return [self._one(fam, parts + ([timing] if timing else [])) for fam, parts in per_family.items()]

    def _one(self, family: str, parts: list[tuple[Finding, float]]) -> Finding:
        c = self.cfg
        if len(parts) < 2:
            return finding(self.name, self.dimension, family, 0.0, 1.0, _MAX,
                           "not applicable: fewer than 2 measures with a baseline", False, "")
        # The builtin sum over a generator, as a compiled loop (no generator object per family): the same
        # float additions in the same order, from 0 as sum() starts.
        squares = 0.0
        for part in parts:
            s: float = part[1]
            squares += s * s
        score = math.sqrt(squares)
        fired = score > c.anomaly_threshold
        window = (_measures_window, len(parts), family)  # written only if the verdict keeps it (detectors.Window)
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, family, score, 1.0, c.anomaly_threshold, window, False, "")
        top = sorted(parts, key=lambda p: -p[1])[:4]
        listed = "; ".join(f"{r[0]} {_show(r)} ({100 * s:.0f}% of the way to its threshold)"
                           for r, s in top if s > 0)
        text = (f"Combined anomaly score for {family}: {score:.2f} (the root of the sum of squares of how far each "
                f"measure went from its baseline towards its own threshold, on a log scale, at most 1 each; one "
                f"measure at its threshold scores 1.0), threshold {c.anomaly_threshold:g}. Highest: "
                f"{listed}.")
        return finding(self.name, self.dimension, family, score, 1.0, c.anomaly_threshold, window, fired, text)


def _measures_window(n: int, family: str) -> str:
    return f"{n} learned measures of {family}, each against its own baseline"


def _show(r: Finding) -> str:
    """A finding's value against its baseline, in the units its own explanation uses."""
    det, value, baseline = r[0], r[3], r[4]
    if det == TIMING:
        return f"order time shared by {100 * baseline:.1f}% of its orders"
    if det == "family_mix":
        return f"share {100 * value:.0f}% vs usual {100 * baseline:.0f}%"
    return f"{value:,.0f} vs baseline {baseline:,.1f}"


__all__ = ["AnomalyCombiner", "fraction", "FEATURES"]

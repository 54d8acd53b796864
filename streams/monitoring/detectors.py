"""Suspicious-order detectors: unusual size, unusual frequency, deviation from pattern.

21 CFR 1301.74(b) names the three kinds of suspicious order; DEA sets no
numbers, so every threshold here is a documented, configurable choice
(:class:`MonitorConfig`, env vars ``SOM_*``). Each detector compares an order
with the registrant's own baselines (:mod:`.baselines`) and returns one
finding per drug family in the order, fired or not, with the observed value,
the baseline, the threshold and a sentence that states them. A verdict is
therefore a fact with its evidence: an analyst can see why an order was held,
and an auditor can see why one was not.

Detectors follow river's ``score_one`` convention but are stateless: all
learning goes through :meth:`RegistrantBaselines.learn`, once per released
order, so detectors cannot drift apart and a held order teaches nothing.
Every finding satisfies ``fired  =>  value > threshold``; where a detector has
an extra condition (the size z-score, the mix volume guard) it is folded into
the threshold or stated in the explanation.

Until a family has enough history ("cold start") the learned thresholds do not
apply and only absolute ceilings do, so a new customer is not held for its
first ordinary orders.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from .baselines import BaselineSettings, FamilyFacts, OrderFacts, RegistrantBaselines, ew_memory

#: Bump when detector logic changes (the config fingerprint is appended in ``model_version``).
DETECTORS_VERSION = "1"

Reason = dict[str, Any]

#: Threshold of a finding that cannot fire (no baseline yet): the largest finite double, since
#: JSON and most dashboards cannot hold infinity.
_MAX = 1.7976931348623157e308


@dataclass(frozen=True)
class MonitorConfig:
    """Every number the monitor decides with. Defaults are a starting point to calibrate.

    Read from the environment with :meth:`from_env` (``SOM_`` + field name in
    upper case, e.g. ``SOM_SIZE_Z=4.5``; tuples are comma-separated).
    """

    # Baselines: how fast they forget.
    ew_alpha: float = 0.1  # per-family EW baselines, ~19-order memory
    mix_alpha: float = 0.05  # family mix, ~39-order memory
    recent_max: int = 16  # order times kept from the last 24 h per family
    family_ttl_days: int = 400  # a family not ordered for this long is forgotten

    # Size of one order (per family).
    size_z: float = 4.0  # z-score of ln(units) against the EW mean/std
    size_ratio: float = 3.0  # ... and at least this multiple of the EW mean units
    size_min_history: int = 8  # learned orders of the family before the baseline applies
    size_min_log_std: float = 0.05  # floor on the log-scale std (a very regular customer)
    cold_start_max_units: int = 8000  # before that: hold a single order above this

    # Volume over 30 days (per family), the order included.
    volume_ratio: float = 3.0  # x the usual 30-day units ("extraordinary" in Rafalski's terms)
    volume_min_history: int = 4  # 30-day samples (taken once history spans 30 days); no ceiling before

    # Frequency (per family), the order included.
    freq_min_history: int = 5  # window samples before the learned thresholds apply
    freq_ratio_24h: float = 3.0
    freq_min_24h: float = 3.0  # never fire at 3 or fewer orders in 24 h
    freq_ratio_7d: float = 2.5
    freq_min_7d: float = 5.0  # never fire at 5 or fewer orders in 7 days
    cold_start_max_orders_24h: int = 5
    cold_start_max_orders_7d: int = 12

    # Pattern: a family never ordered before.
    new_family_min_orders: int = 10  # the registrant's learned orders before "new" means something
    high_risk_schedules: tuple[str, ...] = ("2",)
    high_risk_families: tuple[str, ...] = ("FENTANYL", "HYDROMORPHONE", "OXYMORPHONE", "OXYCODONE", "METHADONE")
    new_family_max_mme: float = 10000.0  # other new opioid families: hold above this many MME
    new_family_max_units: int = 5000  # other new non-opioid families: hold above this many units

    # Pattern: the family mix.
    mix_min_orders: int = 20  # the registrant's learned orders before the mix applies
    mix_odds_ratio: float = 4.0  # 30-day share's odds vs the usual share's odds
    mix_min_share: float = 0.2  # ... and never below this share (a minor family is not a shift)
    mix_min_volume_ratio: float = 1.25  # ... and the family's 30-day units vs its usual

    def baseline_settings(self) -> BaselineSettings:
        return BaselineSettings(self.ew_alpha, self.mix_alpha, self.recent_max, self.family_ttl_days)

    def fingerprint(self) -> str:
        """Short hash of every setting: part of ``model_version``, so a verdict names its thresholds."""
        blob = json.dumps(asdict(self), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, prefix: str = "SOM_") -> "MonitorConfig":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(prefix + f.name.upper())
            if raw is None or raw.strip() == "":
                continue
            default = f.default
            try:
                if isinstance(default, tuple):
                    values[f.name] = tuple(x.strip().upper() for x in raw.split(",") if x.strip())
                elif isinstance(default, bool):
                    values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                else:
                    values[f.name] = float(raw)
            except ValueError as exc:
                raise ValueError(f"{prefix}{f.name.upper()}={raw!r}: {exc}") from None
        return cls(**values)


class Detector(Protocol):
    name: str
    dimension: str

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Reason]: ...


# --------------------------------------------------------------------------
# formatting: the explanation must show the same numbers as the fields
# --------------------------------------------------------------------------

def fmt_n(x: float) -> str:
    """Whole number with thousands separators (dosage units, MME)."""
    return f"{x:,.0f}"


def fmt_r(x: float) -> str:
    """A rate or count baseline, one decimal."""
    return f"{x:,.1f}"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def reason(detector: str, dimension: str, family: str, value: float, baseline: float, threshold: float,
           window: str, fired: bool, explanation: str) -> Reason:
    """One ``som.Reason`` record."""
    return {
        "detector": detector, "dimension": dimension, "drug_family": family,
        "value": float(value), "baseline": float(baseline), "threshold": float(threshold),
        "window": window, "fired": bool(fired), "explanation": explanation,
    }


# --------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------

class SizeDetector:
    """Unusual size: one order of a family far above the registrant's usual order.

    Fires when the units exceed both ``size_z`` standard deviations above the
    EW mean of ln(units) and ``size_ratio`` times the EW mean of units. The log
    scale makes the test about multiples, not absolute units; the ratio keeps a
    very regular customer's ordinary restock from looking extreme. Before
    ``size_min_history`` orders of the family only ``cold_start_max_units`` applies.
    """

    name = "size"
    dimension = "size"

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Reason]:
        return [self._one(state, f) for f in order.families.values()]

    def _one(self, state: RegistrantBaselines, f: FamilyFacts) -> Reason:
        c = self.cfg
        fb = state.family(f.family)
        n = fb.orders if fb else 0
        if n < c.size_min_history:
            usual = fb.units.get() if fb else 0.0
            threshold = float(c.cold_start_max_units)
            fired = f.units > threshold
            window = f"cold start: {n} prior orders of {f.family} (< {c.size_min_history}); absolute ceiling"
            text = (f"Ordered {fmt_n(f.units)} dosage units of {f.family}; this registrant has {n} prior "
                    f"released orders of it ({c.size_min_history} needed for a baseline), so only the ceiling "
                    f"of {fmt_n(threshold)} dosage units per order applies"
                    + ("; the order exceeds it." if fired else "; the order is within it."))
            return reason(self.name, self.dimension, f.family, f.units, usual, threshold, window, fired, text)

        usual = fb.units.get()
        m, s = fb.log_units.mean, max(fb.log_units.std(), c.size_min_log_std)
        z_limit = math.exp(m + c.size_z * s)
        ratio_limit = c.size_ratio * usual
        threshold = max(z_limit, ratio_limit)
        fired = f.units > threshold
        z = (math.log(max(f.units, 1)) - m) / s
        multiple = f.units / usual if usual > 0 else float("inf")
        window = fb.units.window()
        head = (f"Ordered {fmt_n(f.units)} dosage units of {f.family}; this registrant's usual order is "
                f"{fmt_n(usual)} ({window}), the threshold is {fmt_n(threshold)}")
        basis = (f"the larger of {c.size_ratio:g}x the usual order and {c.size_z:g} standard deviations "
                 f"above it on a log scale")
        if fired:
            text = f"{head} ({basis}); this order is {multiple:.1f}x the usual, z = {z:.1f}."
        else:
            text = f"{head}; this order is {multiple:.1f}x the usual (z = {z:.1f}), within the usual range."
        return reason(self.name, self.dimension, f.family, f.units, usual, threshold, window, fired, text)


class VolumeDetector:
    """Unusual size over time: dosage units of a family in the last 30 days, this order included.

    Catches growth spread over several orders that are each below the size
    threshold. Compared with the EW mean of the same 30-day sum taken at each
    released order, so the baseline already reflects the customer's cadence.
    """

    name = "volume_30d"
    dimension = "size"

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Reason]:
        return [self._one(state, order, f) for f in order.families.values()]

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Reason:
        c = self.cfg
        fb = state.family(f.family)
        value = state.windows(f.family, order).units_30d
        samples = fb.units_30d.n if fb else 0
        if samples < c.volume_min_history:
            # No absolute 30-day ceiling: held orders are not learned, so a new customer above
            # such a ceiling would have every order held until an analyst cleared the history.
            usual = fb.units_30d.get() if fb else 0.0
            window = (f"cold start: {samples} 30-day samples of {f.family} (< {c.volume_min_history}); "
                      f"not judged")
            text = (f"Including this order, {fmt_n(value)} dosage units of {f.family} in the last 30 days; "
                    f"too little history for a 30-day baseline (the per-order ceiling and the frequency "
                    f"ceilings apply meanwhile).")
            return reason(self.name, self.dimension, f.family, value, usual, _MAX, window, False, text)
        usual = fb.units_30d.get()
        threshold = c.volume_ratio * usual
        fired = value > threshold
        window = fb.units_30d.window() + " (30-day units at each order)"
        text = (f"Including this order, {fmt_n(value)} dosage units of {f.family} in the last 30 days; "
                f"usually {fmt_n(usual)} ({window}), the threshold is {fmt_n(threshold)} "
                f"({c.volume_ratio:g}x usual)" + ("." if fired else "; within it."))
        return reason(self.name, self.dimension, f.family, value, usual, threshold, window, fired, text)


# --------------------------------------------------------------------------
# frequency
# --------------------------------------------------------------------------

class FrequencyDetector:
    """Unusual frequency: more orders of a family in a window than the registrant usually has.

    The value is the number of orders of the family in the window, this one
    included; the baseline is the EW mean of the same count at each released
    order. The threshold is the larger of ``ratio`` x baseline and a floor,
    so a burst of small orders within a day or two fires while a customer who
    orders daily, or twice on a busy day, does not. Held orders are not
    learned, so every order of a burst after the first held one is held too.
    """

    dimension = "frequency"

    def __init__(self, cfg: MonitorConfig, hours: int) -> None:
        if hours not in (24, 168):
            raise ValueError("frequency windows are 24 hours or 7 days")
        self.cfg = cfg
        self.hours = hours
        self.name = "frequency_24h" if hours == 24 else "frequency_7d"

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Reason]:
        return [self._one(state, order, f) for f in order.families.values()]

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Reason:
        c = self.cfg
        fb = state.family(f.family)
        w = state.windows(f.family, order)
        if self.hours == 24:
            value, base, span = w.orders_24h, (fb.count_24h if fb else None), "the last 24 hours"
            ratio, floor, cold = c.freq_ratio_24h, c.freq_min_24h, c.cold_start_max_orders_24h
        else:
            value, base, span = w.orders_7d, (fb.count_7d if fb else None), "the last 7 days (UTC calendar days)"
            ratio, floor, cold = c.freq_ratio_7d, c.freq_min_7d, c.cold_start_max_orders_7d
        samples = base.n if base else 0
        if samples < c.freq_min_history:
            threshold = float(cold)
            fired = value > threshold
            window = f"cold start: {samples} samples of {f.family} (< {c.freq_min_history}); absolute ceiling"
            text = (f"This is order {value} of {f.family} in {span}; too little history for a baseline, "
                    f"so only the ceiling of {cold} orders applies" + ("; exceeded." if fired else "; within it."))
            usual = base.get() if base else 0.0
            return reason(self.name, self.dimension, f.family, value, usual, threshold, window, fired, text)
        usual = base.get()
        threshold = max(floor, ratio * usual)
        fired = value > threshold
        gap = fb.gap_days.get() if fb and fb.gap_days.n else 0.0
        cadence = f"; it usually orders {f.family} every {gap:.1f} days" if gap > 0 else ""
        window = base.window()
        text = (f"This is order {value} of {f.family} in {span}; this registrant usually has {fmt_r(usual)} "
                f"({window}), the threshold is {fmt_r(threshold)} (the larger of {ratio:g}x usual and "
                f"{floor:g}){cadence}" + ("." if fired else "; within it."))
        return reason(self.name, self.dimension, f.family, value, usual, threshold, window, fired, text)


# --------------------------------------------------------------------------
# pattern
# --------------------------------------------------------------------------

class NewFamilyDetector:
    """Deviation from pattern: a family the registrant has never ordered.

    Only meaningful once the registrant has an established history
    (``new_family_min_orders``). A new family of a high-risk schedule or on the
    high-risk list fires at any quantity (threshold 0); any other new family
    fires above ``new_family_max_mme`` MME. The value is in MME for opioids and
    in dosage units for other drugs; other new families fire above
    ``new_family_max_mme`` MME (opioids) or ``new_family_max_units`` units.
    """

    name = "new_family"
    dimension = "pattern"

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg

    def high_risk(self, f: FamilyFacts) -> bool:
        return (f.family in self.cfg.high_risk_families
                or any(s in self.cfg.high_risk_schedules for s in f.schedules))

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Reason]:
        return [self._one(state, f) for f in order.families.values()]

    def _one(self, state: RegistrantBaselines, f: FamilyFacts) -> Reason:
        c = self.cfg
        fb = state.family(f.family)
        total = state.total_orders
        risky = self.high_risk(f)
        value, unit = (f.mme, "MME") if f.mme > 0 else (float(f.units), "dosage units")
        if risky:
            threshold = 0.0
        else:
            threshold = c.new_family_max_mme if unit == "MME" else float(c.new_family_max_units)
        window = f"{total} released orders of this registrant"
        sched = "/".join(f.schedules) or "?"
        if fb is not None:
            # Usual quantity in the value's unit: usual units, at this order's MME per unit for opioids.
            usual = fb.units.get() * (f.mme / f.units if unit == "MME" and f.units else 1.0)
            text = (f"{f.family} is not new: {fb.orders} of this registrant's {total} released orders "
                    f"contained it.")
            return reason(self.name, self.dimension, f.family, value, usual, threshold, window, False, text)
        if total < c.new_family_min_orders:
            text = (f"First order of {f.family} (schedule {sched}); the registrant has only {total} released "
                    f"orders ({c.new_family_min_orders} needed before a new family stands out).")
            return reason(self.name, self.dimension, f.family, value, 0.0, threshold, window, False, text)
        fired = value > threshold
        if risky:
            why = "a new family of a high-risk schedule or on the high-risk list is held at any quantity"
        else:
            why = f"a new family is held above {fmt_n(threshold)} {unit}"
        text = (f"First-ever order of {f.family} (schedule {sched}, {fmt_n(value)} {unit}) by a registrant with "
                f"{total} released orders; {why}" + ("." if fired else "; within it."))
        return reason(self.name, self.dimension, f.family, value, 0.0, threshold, window, fired, text)


def _odds(p: float) -> float:
    return p / (1.0 - p) if p < 1.0 else float("inf")


def _from_odds(o: float) -> float:
    return 1.0 if math.isinf(o) else o / (1.0 + o)


class FamilyMixDetector:
    """Deviation from pattern: one family taking over the registrant's purchases.

    The value is the family's share of the registrant's dosage units over the
    last 30 days, this order included; the baseline its usual (EW) share. It
    fires when the odds of the 30-day share exceed ``mix_odds_ratio`` times
    the odds of the usual share (a shift on the log-odds scale, so a family at
    5% and one at 50% are judged alike, but never below ``mix_min_share``)
    *and* the family's own 30-day units
    are at least ``mix_min_volume_ratio`` times its usual: a share that rose
    only because the customer stopped buying something else is not held.
    """

    name = "family_mix"
    dimension = "pattern"

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Reason]:
        if not order.families:
            return []
        shares = state.mix.shares()
        u30 = state.units_30d_all(order)
        total30 = sum(u30.values())
        return [self._one(state, f, shares, u30, total30) for f in order.families.values()]

    def _one(self, state: RegistrantBaselines, f: FamilyFacts, shares: dict[str, float],
             u30: dict[str, int], total30: int) -> Reason:
        c = self.cfg
        fb = state.family(f.family)
        value = u30[f.family] / total30 if total30 > 0 else 0.0
        usual = shares.get(f.family, 0.0)
        window = state.mix.window() + "; value over the last 30 days"
        if state.total_orders < c.mix_min_orders or fb is None or fb.units_30d.n < c.volume_min_history:
            text = (f"{f.family} would be {fmt_pct(value)} of this registrant's dosage units over the last "
                    f"30 days; too little history ({state.total_orders} released orders, {c.mix_min_orders} "
                    f"needed, and a 30-day baseline of the family) to judge the family mix.")
            return reason(self.name, self.dimension, f.family, value, usual, 1.0, window, False, text)
        threshold = max(_from_odds(c.mix_odds_ratio * _odds(usual)), c.mix_min_share)
        usual_volume = fb.units_30d.get()
        volume = u30[f.family]
        volume_ok = volume >= c.mix_min_volume_ratio * usual_volume
        fired = value > threshold and volume_ok
        text = (f"{f.family} would be {fmt_pct(value)} of this registrant's dosage units over the last 30 days, "
                f"usually {fmt_pct(usual)} ({state.mix.window()}); the threshold is {fmt_pct(threshold)} "
                f"({c.mix_odds_ratio:g}x the usual odds, at least {fmt_pct(c.mix_min_share)})")
        if value > threshold:
            vol = (f"its 30-day volume {fmt_n(volume)} is {volume / usual_volume:.1f}x its usual "
                   f"{fmt_n(usual_volume)}" if usual_volume > 0 else f"its 30-day volume is {fmt_n(volume)}")
            text += (f" and {vol} (at least {c.mix_min_volume_ratio:g}x required)" + ("." if fired else
                     "; the share rose because other purchases fell, not held."))
        else:
            text += "; within it."
        return reason(self.name, self.dimension, f.family, value, usual, threshold, window, fired, text)


def default_detectors(cfg: MonitorConfig) -> list[Detector]:
    """The detectors a verdict runs, in the order their findings are listed."""
    return [
        SizeDetector(cfg),
        VolumeDetector(cfg),
        FrequencyDetector(cfg, 24),
        FrequencyDetector(cfg, 168),
        NewFamilyDetector(cfg),
        FamilyMixDetector(cfg),
    ]


__all__ = [
    "MonitorConfig", "Detector", "Reason", "SizeDetector", "VolumeDetector", "FrequencyDetector",
    "NewFamilyDetector", "FamilyMixDetector", "default_detectors", "reason", "ew_memory",
]

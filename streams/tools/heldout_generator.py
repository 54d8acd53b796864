"""A second labelled order history, designed apart from :mod:`streams.tools.scenarios`, for honest figures.

The monitor's thresholds were chosen on :mod:`streams.tools.scenarios`. Figures
measured on the same generator flatter it: the detectors were shaped around
its ordering habits and its episode shapes. This module models order history
another way, so that a score on it says how the monitor does on data it was
never tuned on. **Do not tune thresholds on it.**

How buyers order (not how :mod:`streams.tools.scenarios` does): each buyer
*dispenses* every day (a per-family daily demand with weekday, season and a
slow random drift) from an on-hand stock and *replenishes* when the stock of a
family falls under its reorder point, up to an order-up-to level, on its own
ordering weekdays (an (s, S) inventory policy). Order sizes and gaps follow
from demand, so more demand shows as bigger *and* more frequent orders, as in
real distribution data. Each family's units are split over its strengths by a
buyer-specific mix.

Population (``HeldoutConfig.buyers``, default 300, over 730 days from
2013-01-07, so the hydrocodone rescheduling of 2014-10-06 falls inside):
chain pharmacies (several families, two or three ordering days a week), retail
pharmacies (a third single-family), hospitals (injectables and tablets,
ordering most weekdays), practitioners (one family, every few weeks) and
narcotic treatment programs (methadone only). Seasons per buyer: winter peak,
summer low (college towns), summer high (resorts) or flat, plus a pre-holiday
stock-up in December.

Episodes (each on its own buyer; ``kind`` in the labels):

=================  ===========  =======================================================================
kind               label        what happens
=================  ===========  =======================================================================
``ramp``           suspicious   one family's demand climbs from 1x to 1.5-10x over 2-9 months (linear,
                                convex or stepped), stays there 1-4 months, then the account stops.
                                Orders are ``grey`` until the factor reaches 1.5x, suspicious after
``spike``          suspicious   one order of a family 3-12x its usual size (the extra is diverted)
``burst``          suspicious   for 1-3 weeks one or two extra orders of a family on every business day
``strength_shift`` suspicious   over 2-6 weeks a family's mix moves to its strongest product (80-95 %
                                of units) while units grow at most 1.4x; grey for the first 2 weeks
``new_mill``       suspicious   a new retail pharmacy opens ordering oxycodone/hydrocodone at 3-8x a
                                typical pharmacy's demand, mostly the strongest strengths, for 3-8 months
``growth``         normal       a legitimate logistic growth of all families to 1.3-2.5x over 2-10 months
``new_store``      normal       a new chain pharmacy opens (an opening stock order, then normal demand)
``season``         normal       a strongly seasonal buyer (+-35-50 %)
=================  ===========  =======================================================================

Output (:func:`write_heldout`): ``heldout-arcos.csv.gz`` in the ARCOS layout
(Washington Post columns; schedule II rows carry an order form number shared
by the order's schedule II lines, schedule III-V rows carry ``null``, as in
real ARCOS), ``heldout-labels.csv`` (``TRANSACTION_ID, suspicious, episode,
kind``: suspicious is 1, 0 or ``grey``) and ``heldout-episodes.csv``.
"""
from __future__ import annotations

import csv
import gzip
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Callable

from streams.domain.products import Product, ProductMaster

from connectors.sources.arcos_replay import ARCOS_COLUMNS
from streams.tools.product_catalog import DEFAULT_PATH, build_catalog

START = date(2013, 1, 7)
#: ARCOS columns written: the reader's (``connectors.sources.arcos_replay.ARCOS_COLUMNS``), so what it writes is what it reads.
COLUMNS = ARCOS_COLUMNS
LABEL_COLUMNS = ("TRANSACTION_ID", "suspicious", "episode", "kind")
SUSPICIOUS_KINDS = ("ramp", "spike", "burst", "strength_shift", "new_mill")
LEGIT_KINDS = ("growth", "new_store", "season")
DEFAULT_COUNTS = {"ramp": 16, "spike": 12, "burst": 10, "strength_shift": 10, "new_mill": 8,
                  "growth": 14, "new_store": 12, "season": 10}

#: DEA controlled substance codes per family (ARCOS DRUG_CODE).
DRUG_CODES = {"OXYCODONE": "9143", "HYDROCODONE": "9193", "MORPHINE": "9300", "METHADONE": "9250B",
              "FENTANYL": "9801", "HYDROMORPHONE": "9150", "OXYMORPHONE": "9652", "TAPENTADOL": "9780",
              "CODEINE": "9050", "BUPRENORPHINE": "9064", "AMPHETAMINE": "1100", "METHYLPHENIDATE": "1724",
              "LISDEXAMFETAMINE": "1205", "ALPRAZOLAM": "2882", "DIAZEPAM": "2765", "LORAZEPAM": "2885",
              "ZOLPIDEM": "2783", "TRAMADOL": "9752", "PREGABALIN": "2782", "KETAMINE": "7285",
              "TESTOSTERONE": "4000"}
_REPORTERS = (("PD0123455", "DISTRIBUTOR", "NORTHEAST DRUG SUPPLY"), ("RM0345674", "DISTRIBUTOR", "MIDWEST RX"))
_STATES = ("OH", "KY", "WV", "PA", "FL", "TN")
_ORAL = ("TAB", "CAP", "FILM")


# --------------------------------------------------------------------------- buyers
@dataclass
class Family:
    """A family a buyer dispenses: daily demand (dosage units), strength mix over products, stock policy."""

    name: str
    daily: float
    mix: list[tuple[Product, float]]
    stock: float = 0.0
    options: list[Product] = field(default_factory=list)  # every strength on offer (a shift may pick one)
    reorder_days: float = 5.0  # reorder point, in days of demand
    cover_days: float = 14.0  # order-up-to, in days of demand


@dataclass
class Buyer:
    dea: str
    activity: str
    state: str
    name: str
    order_weekdays: tuple[int, ...]
    families: dict[str, Family]
    season: Callable[[date], float]
    drift: float = 0.0  # log demand drift, a slow random walk
    first_day: int = 0
    last_day: int | None = None
    factor: dict[str, Callable[[int], float]] = field(default_factory=dict)  # family or "*" -> demand factor(day)
    mix_shift: dict[str, Callable[[int], float]] = field(default_factory=dict)  # family -> strongest share(day)


def _dea(r: random.Random, first: str, used: set[str]) -> str:
    while True:
        d = [r.randint(0, 9) for _ in range(6)]
        check = (d[0] + d[2] + d[4] + 2 * (d[1] + d[3] + d[5])) % 10
        dea = f"{first}{r.choice('ABCDEFGHJKLMNPRSTW')}{''.join(map(str, d))}{check}"
        if dea not in used:
            used.add(dea)
            return dea


def _season(kind: str, amp: float, peak_month: int = 1) -> Callable[[date], float]:
    """Seasonal demand factor: a raised cosine around a peak month, and a December stock-up for pharmacies."""
    def f(d: date) -> float:
        m = d.month - 1 + d.day / 31.0
        base = 1.0 + amp * math.cos(2 * math.pi * (m - (peak_month - 1)) / 12.0)
        return base if kind != "flat" else 1.0
    return f


def _mix(r: random.Random, products: list[Product], concentrate: bool) -> list[tuple[Product, float]]:
    """A buyer's split of a family over its strengths: Dirichlet-like weights, weaker strengths favoured."""
    ranked = sorted(products, key=lambda p: p.base_mg_per_unit)
    k = len(ranked) if not concentrate else 1
    chosen = ranked[:max(1, r.randint(1, k))] if k > 1 else ranked[:1]
    w = [r.gammavariate(1.5, 1.0) * (1.6 ** -i) for i in range(len(chosen))]
    tot = sum(w)
    return [(p, x / tot) for p, x in zip(chosen, w)]


_TYPES = (  # activity, share, families (name: (daily units median, p included)), weekdays per week
    ("CHAIN PHARMACY", 0.38, {"OXYCODONE": (70, 0.95), "HYDROCODONE": (110, 0.95), "MORPHINE": (12, 0.5),
                               "ALPRAZOLAM": (60, 0.45), "AMPHETAMINE": (30, 0.5), "CODEINE": (25, 0.3)}, 2),
    ("RETAIL PHARMACY", 0.32, {"OXYCODONE": (40, 0.85), "HYDROCODONE": (60, 0.6), "MORPHINE": (8, 0.3),
                                "METHYLPHENIDATE": (15, 0.3), "HYDROMORPHONE": (6, 0.25)}, 2),
    ("HOSPITAL/CLINIC", 0.14, {"MORPHINE": (40, 1.0), "HYDROMORPHONE": (30, 0.9), "FENTANYL": (20, 0.9),
                                "OXYCODONE": (45, 0.8), "LORAZEPAM": (25, 0.6), "KETAMINE": (10, 0.4)}, 4),
    ("PRACTITIONER", 0.10, {"BUPRENORPHINE": (6, 0.5), "TESTOSTERONE": (2, 0.3), "KETAMINE": (2, 0.2)}, 1),
    ("MAINT & DETOX", 0.06, {"METHADONE": (400, 1.0)}, 2),
)


def _products_by_family(pm: ProductMaster, activity: str) -> dict[str, list[Product]]:
    out: dict[str, list[Product]] = {}
    for p in pm:
        if activity == "HOSPITAL/CLINIC" or p.dosage_form in _ORAL + (("SOL",) if p.drug_family == "METHADONE" else ()):
            out.setdefault(p.drug_family, []).append(p)
    return out


def _make_buyer(r: random.Random, activity: str, spec: dict[str, tuple[float, float]], per_week: int,
                pm: ProductMaster, used: set[str], *, single_family: bool = False) -> Buyer:
    by_fam = _products_by_family(pm, activity)
    fams = [f for f, (_, p) in spec.items() if f in by_fam and r.random() < p]
    if not fams:
        fams = [max(spec, key=lambda f: spec[f][1])]
    if single_family:
        fams = fams[:1]
    size = r.lognormvariate(0.0, 0.55)  # the buyer's size against its type's median
    families = {}
    for f in fams:
        daily = spec[f][0] * size * r.lognormvariate(0.0, 0.25)
        fam = Family(f, daily, _mix(r, by_fam[f], concentrate=r.random() < 0.4), options=by_fam[f],
                     reorder_days=r.uniform(3, 8), cover_days=r.uniform(8, 24) if per_week < 3 else r.uniform(5, 12))
        fam.stock = daily * fam.cover_days * r.uniform(0.4, 1.0)
        families[f] = fam
    days = sorted(r.sample(range(5), min(per_week, 5))) if activity != "HOSPITAL/CLINIC" else sorted(r.sample(range(5), 3))
    kind = r.choices(("winter", "summer_low", "summer_high", "flat"), (0.35, 0.2, 0.15, 0.3))[0]
    amp = r.uniform(0.05, 0.18)
    peak = {"winter": 1, "summer_low": 1, "summer_high": 7, "flat": 1}[kind]
    first = {"CHAIN PHARMACY": "B", "RETAIL PHARMACY": "A", "HOSPITAL/CLINIC": "F", "PRACTITIONER": "M",
             "MAINT & DETOX": "R"}[activity]
    dea = _dea(r, first, used)
    return Buyer(dea, activity, r.choice(_STATES), f"{activity.split()[0]} {dea[2:6]}", tuple(days), families,
                 _season(kind, amp, peak))


# --------------------------------------------------------------------------- simulation
@dataclass
class _Line:
    product: Product
    packages: int
    label: str = "0"
    episode: str = ""
    kind: str = ""


@dataclass
class _Order:
    buyer: Buyer
    day: int
    lines: list[_Line]


def _family_products(fam: Family) -> list[Product]:
    """Every product of the family the buyer may order (its strengths), not only those in its usual mix."""
    return fam.options or [p for p, _ in fam.mix]


def _split(units: float, fam: Family, strongest_share: float) -> list[tuple[Product, int]]:
    """Units of a family as packages of its products, by the buyer's mix (shifted toward the strongest)."""
    weights: dict[str, list[Any]] = {p.ndc: [p, w * (1.0 - strongest_share)] for p, w in fam.mix}
    if strongest_share > 0:
        strongest = max(_family_products(fam), key=lambda p: p.base_mg_per_unit)
        weights.setdefault(strongest.ndc, [strongest, 0.0])[1] += strongest_share
    out: dict[str, list[Any]] = {}
    for p, w in weights.values():
        pk = units * w / p.units_per_package
        if pk < 0.35:
            continue
        e = out.setdefault(p.ndc, [p, 0.0])
        e[1] += pk
    return [(p, max(1, round(x))) for p, x in out.values()]


def _simulate(b: Buyer, days: int, r: random.Random) -> list[_Order]:
    """Dispense every day, replenish on ordering days below the reorder point (an (s, S) stock policy)."""
    orders = []
    last = days if b.last_day is None else min(days, b.last_day)
    for t in range(b.first_day, last):
        d = START + timedelta(days=t)
        if t % 30 == 0:
            b.drift = 0.9 * b.drift + r.gauss(0.0, 0.06)  # slow mean-reverting drift of demand
        wd = d.weekday()
        open_factor = 0.0 if wd == 6 else (0.55 if wd == 5 else 1.0)
        if b.activity == "HOSPITAL/CLINIC":
            open_factor = 0.8 if wd >= 5 else 1.0
        base = b.season(d) * math.exp(b.drift) * open_factor * b.factor.get("*", lambda _: 1.0)(t)
        for fam in b.families.values():
            mean = fam.daily * base * b.factor.get(fam.name, lambda _: 1.0)(t)
            fam.stock -= r.gammavariate(4.0, mean / 4.0) if mean > 0 else 0.0
        if wd not in b.order_weekdays:
            continue
        lines = []
        for fam in b.families.values():
            demand = fam.daily * b.season(d) * math.exp(b.drift) * b.factor.get("*", lambda _: 1.0)(t) \
                * b.factor.get(fam.name, lambda _: 1.0)(t)
            if fam.stock < fam.reorder_days * demand:
                want = fam.cover_days * demand - fam.stock
                if d.month == 12 and d.day >= 10 and b.activity.endswith("PHARMACY"):
                    want *= 1.25  # holiday stock-up
                share = b.mix_shift.get(fam.name, lambda _: 0.0)(t)
                for p, pk in _split(want, fam, share):
                    lines.append(_Line(p, pk))
                    fam.stock += pk * p.units_per_package
        if lines:
            orders.append(_Order(b, t, lines))
    return orders


# --------------------------------------------------------------------------- episodes
@dataclass
class HeldoutConfig:
    """Size of the held-out history; everything is deterministic in ``seed``."""

    seed: int = 1
    buyers: int = 300
    days: int = 730
    counts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COUNTS))


@dataclass
class HeldoutEpisode:
    episode: str
    kind: str
    buyer: str
    activity: str
    family: str
    onset_day: int
    detail: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"episode": self.episode, "kind": self.kind, "buyer_dea": self.buyer, "business_activity": self.activity,
                "family": self.family, "onset": (START + timedelta(days=self.onset_day)).isoformat(),
                "detail": ";".join(f"{k}={v}" for k, v in sorted(self.detail.items()))}


def _ramp_shape(r: random.Random, onset: int, length: int, target: float) -> tuple[Callable[[int], float], str]:
    shape = r.choice(("linear", "convex", "stepped"))

    def f(t: int) -> float:
        x = min(1.0, max(0.0, (t - onset) / length))
        if shape == "convex":
            return target ** x  # geometric: slow start, fast finish
        if shape == "stepped":
            x = math.floor(x * 4) / 4 if x < 1 else 1.0  # four monthly-ish steps
        return 1.0 + (target - 1.0) * x
    return f, shape


def _main_family(b: Buyer, opioid_only: bool = True) -> str | None:
    opioids = {"OXYCODONE", "HYDROCODONE", "MORPHINE", "HYDROMORPHONE", "METHADONE", "FENTANYL"}
    fams = [f for f in b.families.values() if not opioid_only or f.name in opioids]
    return max(fams, key=lambda f: f.daily).name if fams else None


@dataclass
class Heldout:
    """The generated history: orders (with per-line labels), buyers and episodes."""

    orders: list[_Order]
    buyers: list[Buyer]
    episodes: list[HeldoutEpisode]
    config: HeldoutConfig
    files: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One sentence for the CLI: what was generated and where it was written."""
        return _WRITTEN_SENTENCE.format_map(defaultdict(int, self.stats, episodes=len(self.episodes),
                                                        files=", ".join(self.files.values())))


_WRITTEN_SENTENCE = ("{buyers} buyers, {orders} orders, {transactions} ARCOS rows ({null_form_rows} schedule III-V "
                     "rows with ORDER_FORM_NO null), {suspicious_rows} suspicious and {grey_rows} grey rows in "
                     "{episodes} episodes; files: {files}")


def generate_heldout(config: HeldoutConfig | None = None) -> Heldout:
    """Generate the held-out history in memory (see the module docstring)."""
    cfg = config or HeldoutConfig()
    pm = ProductMaster.load(DEFAULT_PATH) if DEFAULT_PATH.exists() else ProductMaster(build_catalog())
    r = random.Random(f"heldout:{cfg.seed}")
    used: set[str] = set()
    buyers: list[Buyer] = []
    for i in range(cfg.buyers):
        act, _, spec, per_week = r.choices(_TYPES, [t[1] for t in _TYPES])[0]
        buyers.append(_make_buyer(r, act, spec, per_week, pm, used,
                                  single_family=act == "RETAIL PHARMACY" and r.random() < 0.33))
    episodes: list[HeldoutEpisode] = []
    free = list(buyers)
    r.shuffle(free)
    counts = {**{k: 0 for k in DEFAULT_COUNTS}, **cfg.counts}
    n = 0

    def take(pred: Callable[[Buyer], bool]) -> Buyer | None:
        for k, b in enumerate(free):
            if pred(b):
                return free.pop(k)
        return None

    def episode(kind: str, b: Buyer, fam: str, onset: int, **detail: Any) -> HeldoutEpisode:
        nonlocal n
        n += 1
        e = HeldoutEpisode(f"H{kind}-{n:03d}", kind, b.dea, b.activity, fam, onset, dict(detail))
        episodes.append(e)
        return e

    pharmacy = lambda b: b.activity.endswith("PHARMACY") and _main_family(b) is not None  # noqa: E731
    for _ in range(counts["ramp"]):
        b = take(pharmacy)
        if b is None:
            break
        fam = _main_family(b)
        target = math.exp(r.uniform(math.log(1.5), math.log(10.0)))
        length = r.randint(60, 270)
        onset = r.randint(200, max(201, cfg.days - length - 30))
        f, shape = _ramp_shape(r, onset, length, target)
        b.factor[fam] = f
        b.last_day = onset + length + r.randint(30, 120)
        episode("ramp", b, fam, onset, target=round(target, 2), months=round(length / 30.4, 1), shape=shape,
                single_family=len(b.families) == 1)
    for _ in range(counts["spike"]):
        b = take(lambda b: _main_family(b, False) is not None and b.activity != "PRACTITIONER")
        if b is None:
            break
        episode("spike", b, _main_family(b, False), r.randint(150, cfg.days - 20), multiple=round(r.uniform(3, 12), 1))
    for _ in range(counts["burst"]):
        b = take(lambda b: b.activity != "HOSPITAL/CLINIC")
        if b is None:
            break
        episode("burst", b, _main_family(b, False), r.randint(150, cfg.days - 30), days=r.randint(7, 21),
                per_day=r.choice((1, 1, 2)))
    for _ in range(counts["strength_shift"]):
        b = take(lambda b: any(len({p.base_mg_per_unit for p, _ in f.mix}) >= 1 and
                               len(_products_by_family(pm, b.activity)[f.name]) >= 2 for f in b.families.values())
                 and b.activity.endswith("PHARMACY"))
        if b is None:
            break
        fam = max((f for f in b.families.values() if len(_products_by_family(pm, b.activity)[f.name]) >= 2),
                  key=lambda f: f.daily)
        onset, length = r.randint(150, cfg.days - 90), r.randint(14, 42)
        share = r.uniform(0.8, 0.95)
        grow = r.uniform(1.0, 1.4)
        b.mix_shift[fam.name] = lambda t, o=onset, L=length, s=share: 0.0 if t < o else s * min(1.0, (t - o + 1) / L)
        b.factor[fam.name] = lambda t, o=onset, L=length, g=grow: 1.0 if t < o else 1 + (g - 1) * min(1.0, (t - o) / L)
        episode("strength_shift", b, fam.name, onset, strongest_share=round(share, 2), units_factor=round(grow, 2),
                weeks=round(length / 7, 1))
    for _ in range(counts["growth"]):
        b = take(lambda b: b.activity != "MAINT & DETOX")
        if b is None:
            break
        target, length = r.uniform(1.3, 2.5), r.randint(60, 300)
        onset = r.randint(120, cfg.days - 60)
        b.factor["*"] = lambda t, o=onset, L=length, g=target: 1 + (g - 1) / (1 + math.exp(-8 * ((t - o) / L - 0.5)))
        episode("growth", b, "*", onset, target=round(target, 2), months=round(length / 30.4, 1))
    for _ in range(counts["season"]):
        b = take(lambda b: True)
        if b is None:
            break
        amp = r.uniform(0.35, 0.5)
        peak = r.choice((1, 7, 10))
        b.season = _season("strong", amp, peak)
        episode("season", b, "*", 0, amplitude=round(amp, 2), peak_month=peak)
    chain = next(t for t in _TYPES if t[0] == "CHAIN PHARMACY")
    for _ in range(counts["new_store"]):
        b = _make_buyer(r, "CHAIN PHARMACY", chain[2], chain[3], pm, used)
        b.first_day = r.randint(90, cfg.days - 120)
        for fam in b.families.values():
            fam.stock = 0.0  # opening stock order
        buyers.append(b)
        episode("new_store", b, "*", b.first_day)
    for _ in range(counts["new_mill"]):
        spec = {"OXYCODONE": (40 * r.uniform(3, 8), 1.0), "HYDROCODONE": (60 * r.uniform(3, 8), 0.6)}
        b = _make_buyer(r, "RETAIL PHARMACY", spec, r.choice((2, 3, 4)), pm, used)
        b.first_day = r.randint(120, cfg.days - 150)
        b.last_day = b.first_day + r.randint(90, 240)
        for fam in b.families.values():
            fam.stock = 0.0
            b.mix_shift[fam.name] = lambda t, s=r.uniform(0.5, 0.8): s
        buyers.append(b)
        episode("new_mill", b, ",".join(b.families), b.first_day)

    orders: list[_Order] = []
    for b in buyers:
        orders += _simulate(b, cfg.days, random.Random(f"heldout-orders:{cfg.seed}:{b.dea}"))
    _label(orders, episodes, r)
    orders.sort(key=lambda o: (o.day, o.buyer.dea))
    return Heldout(orders, buyers, episodes, cfg)


def _label(orders: list[_Order], episodes: list[HeldoutEpisode], r: random.Random) -> None:
    """Attach episode labels to lines; add spike and burst orders (their extra units are diverted, not stocked)."""
    by_buyer: dict[str, list[_Order]] = {}
    for o in orders:
        by_buyer.setdefault(o.buyer.dea, []).append(o)
    for e in episodes:
        mine = by_buyer.get(e.buyer, [])
        if e.kind == "ramp":
            f = mine[0].buyer.factor[e.family] if mine else None
            for o in mine:
                if o.day < e.onset_day or f is None:
                    continue
                lab = "1" if f(o.day) >= 1.5 else "grey"
                for ln in o.lines:
                    if ln.product.drug_family == e.family:
                        ln.label, ln.episode, ln.kind = lab, e.episode, e.kind
        elif e.kind == "strength_shift":
            for o in mine:
                if o.day >= e.onset_day:
                    lab = "1" if o.day >= e.onset_day + 14 else "grey"
                    for ln in o.lines:
                        if ln.product.drug_family == e.family:
                            ln.label, ln.episode, ln.kind = lab, e.episode, e.kind
        elif e.kind == "new_mill":
            for o in mine:
                for ln in o.lines:
                    ln.label, ln.episode, ln.kind = "1", e.episode, e.kind
        elif e.kind in LEGIT_KINDS:
            for o in mine:
                if o.day >= e.onset_day:
                    for ln in o.lines:
                        ln.episode, ln.kind = e.episode, e.kind
        elif e.kind == "spike":
            o = next((x for x in mine if x.day >= e.onset_day
                      and any(ln.product.drug_family == e.family for ln in x.lines)), None)
            if o is None:
                continue
            for ln in o.lines:
                if ln.product.drug_family == e.family:
                    ln.packages = max(ln.packages + 1, round(ln.packages * e.detail["multiple"]))
                    ln.label, ln.episode, ln.kind = "1", e.episode, e.kind
        elif e.kind == "burst" and mine:
            b = mine[0].buyer
            fam = b.families[e.family]
            typical = [ln for o in mine for ln in o.lines if ln.product.drug_family == e.family]
            for k in range(e.detail["days"]):
                t = e.onset_day + k
                if (START + timedelta(days=t)).weekday() >= 5 or t >= (b.last_day or 10**6):
                    continue
                for _ in range(e.detail["per_day"]):
                    ref = r.choice(typical) if typical else _Line(fam.mix[0][0], 1)
                    orders.append(_Order(b, t, [_Line(ref.product, max(1, round(ref.packages * r.uniform(0.6, 1.1))),
                                                      "1", e.episode, e.kind)]))


# --------------------------------------------------------------------------- ARCOS files
def _form_number(day: date, n: int) -> str:
    return f"{day.year % 100:02d}X{n:06d}"


def write_heldout(out_dir: str | Path, config: HeldoutConfig | None = None) -> Heldout:
    """Generate and write ``heldout-arcos.csv.gz``, ``heldout-labels.csv`` and ``heldout-episodes.csv``."""
    h = generate_heldout(config)
    pm = ProductMaster.load(DEFAULT_PATH) if DEFAULT_PATH.exists() else ProductMaster(build_catalog())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arcos, labels, eps = out / "heldout-arcos.csv.gz", out / "heldout-labels.csv", out / "heldout-episodes.csv"
    stats = {"buyers": len({o.buyer.dea for o in h.orders}), "orders": len(h.orders), "transactions": 0,
             "null_form_rows": 0, "suspicious_rows": 0, "grey_rows": 0}
    forms: dict[str, int] = {}
    tx = 0
    with gzip.open(arcos, "wt", newline="", encoding="utf-8") as fa, open(labels, "w", newline="",
                                                                           encoding="utf-8") as fl:
        wa, wl = csv.DictWriter(fa, fieldnames=COLUMNS), csv.writer(fl)
        wa.writeheader()
        wl.writerow(LABEL_COLUMNS)
        for o in h.orders:
            b = o.buyer
            day = START + timedelta(days=o.day)
            rep = _REPORTERS[int(b.dea[-1]) % len(_REPORTERS)]
            form = None
            for ln in o.lines:
                p = ln.product
                tx += 1
                if pm.schedule(p, day) in ("2", "2N"):
                    if form is None:
                        forms[b.dea] = forms.get(b.dea, 0) + 1
                        form = _form_number(day, forms[b.dea])
                    form_no = form
                else:
                    form_no = "null"
                    stats["null_form_rows"] += 1
                units = ln.packages * p.units_per_package
                wa.writerow({
                    "REPORTER_DEA_NO": rep[0], "REPORTER_BUS_ACT": rep[1], "REPORTER_NAME": rep[2],
                    "BUYER_DEA_NO": b.dea, "BUYER_BUS_ACT": b.activity, "BUYER_NAME": b.name, "BUYER_CITY": "",
                    "BUYER_STATE": b.state, "TRANSACTION_CODE": "S", "DRUG_CODE": DRUG_CODES.get(p.drug_family, "9999"),
                    "NDC_NO": p.ndc.replace("-", ""), "DRUG_NAME": p.drug_family, "QUANTITY": ln.packages,
                    "ORDER_FORM_NO": form_no, "TRANSACTION_DATE": day.strftime("%m%d%Y"),
                    "CALC_BASE_WT_IN_GM": round(p.base_weight_g(units), 4), "DOSAGE_UNIT": units,
                    "TRANSACTION_ID": tx, "Product_Name": p.product_name, "Measure": p.dosage_form,
                    "MME_Conversion_Factor": p.mme_factor, "dos_str": p.strength, "MME": round(p.mme(units), 2),
                    "year": day.year})
                wl.writerow([tx, ln.label, ln.episode, ln.kind])
                stats["suspicious_rows"] += ln.label == "1"
                stats["grey_rows"] += ln.label == "grey"
    stats["transactions"] = tx
    with open(eps, "w", newline="", encoding="utf-8") as fe:
        w = csv.DictWriter(fe, fieldnames=list(h.episodes[0].row()) if h.episodes else ["episode"])
        w.writeheader()
        for e in h.episodes:
            w.writerow(e.row())
    h.files = {"arcos": str(arcos), "labels": str(labels), "episodes": str(eps)}
    h.stats = stats
    return h


__all__ = ["HeldoutConfig", "Heldout", "HeldoutEpisode", "generate_heldout", "write_heldout", "SUSPICIOUS_KINDS",
           "LEGIT_KINDS", "DEFAULT_COUNTS", "START"]

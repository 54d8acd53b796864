"""Seeded, labeled scenarios for evaluating suspicious order monitoring (21 CFR 1301.74(b)).

:func:`generate` produces verified-order dicts (the ``csos.orders.VerifiedOrder``
shape, lines enriched from the product master: ``drug_family``, ``dosage_units``,
``base_weight_g``, ``mme``, ``schedule``, ``ndc`` ...; ``signed_at`` /
``received_at`` tz-aware UTC) in time order, and one label per order.

The population is the simulator's (:class:`streams.tools.simulator.Population`:
retail and chain pharmacies, hospitals, practitioners, with their habits,
weekday factors and annual seasonality). On top of their normal ~15 months of
orders, episodes are injected, each on its own registrant:

==================  ===========  ==========================================================
kind                label        what happens
==================  ===========  ==========================================================
``ramp``            suspicious   pill-mill ramp-up: one opioid family grows 10-25 % a week
                                 for 20 weeks (capped at 12x); suspicious once it exceeds 2x the registrant's
                                 own early level (orders before that are ``grey``)
``spike``           suspicious   one order of a family at 4-8x the usual size
``burst``           suspicious   8-14 small extra orders (30-60 % of usual) of one family
                                 within ~2 days
``mme_shift``       suspicious   for ~6 weeks every order also carries a high-MME family
                                 (fentanyl, oxymorphone, hydromorphone ...) the registrant
                                 never ordered, at the volume of its main opioid
``surge_flu``       normal       a hospital's flu season: +40 % across all families,
                                 3 weeks up, 6 weeks plateau, 3 weeks down
``surge_expansion`` normal       a store expansion: all families grow to 2x over 4-6 weeks
                                 and stay there
``new_registrant``  normal       a new customer: first order mid-run, no history
``new_mill``        suspicious   a new retail pharmacy that orders its main opioid at 3-8x its
                                 habit from its first order, for 3-6 months (then closed)
``new_opening``     normal       a new pharmacy whose first order is an opening stock of 2-4x
                                 its habit, then normal demand
``strength_shift``  suspicious   for 6-10 weeks a buyer orders its main opioid's units (70-110 %)
                                 as the family's strongest tablet or capsule, not its usual mix
``multi_strength``  normal       from mid-run, a multi-strength buyer restocks one product of its
                                 main opioid per order (its share of units over time unchanged)
==================  ===========  ==========================================================

``strength_shift`` and ``multi_strength`` are drawn after the new customers, on registrants no other
episode uses, with their own random streams (the other episodes of a seed are unchanged).

``new_mill`` and ``new_opening`` are drawn after every other kind (their own registrants and
random streams), so adding them left the other episodes of a seed unchanged.

Every label is a dict ``{order_id, label, kind, episode, episode_start}``:
``label`` is ``suspicious`` (must be held), ``normal`` (must be released) or
``grey`` (an early ramp order, below 2x: neither counted as a miss nor as a
false hold); ``episode`` is the episode id (``None`` for plain normal orders);
``episode_start`` is when the episode became suspicious (or the surge began).

A default run (150 registrants + 10 new ones, 450 days) takes a few seconds.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping

from streams.domain.products import Product, ProductMaster

from streams.tools.simulator import (
    SHIFT_FAMILIES, SUPPLIER, Draft, Population, Registrant, default_product_master, habit_lines,
    normal_timeline,
)

SUSPICIOUS = "suspicious"
NORMAL = "normal"
GREY = "grey"

SUSPICIOUS_KINDS = ("ramp", "spike", "burst", "mme_shift", "new_mill", "strength_shift")
LEGIT_SURGE_KINDS = ("surge_flu", "surge_expansion")
LEGIT_KINDS = LEGIT_SURGE_KINDS + ("new_registrant", "new_opening", "multi_strength")
EPISODE_KINDS = SUSPICIOUS_KINDS + LEGIT_KINDS

#: Days from an episode's start by which the learned monitor is expected to hold it.
EXPECTED_HOLD_DAYS = {"ramp": 35.0, "spike": 0.5, "burst": 2.0, "mme_shift": 0.5, "new_mill": 31.0,
                      "strength_shift": 31.0}

#: Default number of episodes per kind (new_registrant: extra registrants).
DEFAULT_COUNTS = {"ramp": 8, "spike": 10, "burst": 8, "mme_shift": 8,
                  "surge_flu": 6, "surge_expansion": 8, "new_registrant": 10, "new_mill": 8, "new_opening": 6,
                  "strength_shift": 8, "multi_strength": 8}

DEFAULT_END = datetime(2026, 4, 1, tzinfo=timezone.utc)
_OPIOIDS = ("OXYCODONE", "HYDROCODONE", "MORPHINE", "HYDROMORPHONE", "METHADONE", "TRAMADOL", "CODEINE")
_PHARMACIES = ("RETAIL PHARMACY", "CHAIN PHARMACY")


@dataclass(frozen=True)
class ScenarioConfig:
    """Size and shape of a scenario run; everything is deterministic in ``seed``."""

    n_registrants: int = 150
    days: int = 450
    end: datetime = DEFAULT_END
    seed: int = 7
    counts: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_COUNTS))
    min_history_days: int = 150  # normal history before a suspicious episode starts


@dataclass
class Episode:
    """One injected episode and its ground truth."""

    episode_id: str
    kind: str
    purchaser_dea: str
    business_activity: str
    family: str  # the family concerned ("*" = all families)
    onset: datetime  # when the injection begins
    start: datetime | None = None  # when it became suspicious (first suspicious order), or the surge began
    suspicious: bool = True
    expected_hold_days: float | None = None
    orders: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scenario:
    """The generated stream: orders in time order, aligned labels, and the episodes."""

    orders: list[dict[str, Any]]
    labels: list[dict[str, Any]]
    episodes: dict[str, Episode]
    config: ScenarioConfig
    start: datetime
    end: datetime

    def label_map(self) -> dict[str, dict[str, Any]]:
        return {lab["order_id"]: lab for lab in self.labels}


# --------------------------------------------------------------------------- drafts
def _line_dicts(lines: list[tuple[Product, int]]) -> list[dict[str, Any]]:
    out = []
    merged: dict[str, list[Any]] = {}
    for p, packages in lines:
        if p.ndc in merged:
            merged[p.ndc][1] += packages
        else:
            merged[p.ndc] = [p, packages]
    for k, (p, packages) in enumerate(merged.values(), start=1):
        units = int(packages) * p.units_per_package
        out.append({
            "line_no": k, "ndc": p.ndc, "product_name": p.product_name, "strength": p.strength,
            "package_quantity": p.units_per_package, "packages": int(packages), "dosage_units": units,
            "schedule": p.schedule, "drug_family": p.drug_family,
            "base_weight_g": round(p.base_weight_g(units), 6), "mme": round(p.mme(units), 3),
        })
    return out


def _scale_lines(lines: list[tuple[Product, int]], factor: Callable[[str], float],
                 r: random.Random) -> list[tuple[Product, int]]:
    """Scale each line's packages by factor(family), rounding stochastically so small lines scale on average."""
    out = []
    for p, pk in lines:
        x = pk * factor(p.drug_family)
        n = int(x) + (1 if r.random() < x - int(x) else 0)
        out.append((p, max(1, n)))
    return out


def _family_lines(reg: Registrant, family: str, units: float, products: ProductMaster) -> list[tuple[Product, int]]:
    h = reg.habit(family)
    assert h is not None
    return habit_lines(h, units, products)


def _main_opioid(reg: Registrant) -> str | None:
    fams = [h for h in reg.habits if h.family in _OPIOIDS and h.p_order >= 0.5]
    if not fams:
        return None
    return max(fams, key=lambda h: h.mean_units * h.p_order).family


# --------------------------------------------------------------------------- episode injectors
def _inject_ramp(ep: Episode, tl: list[Draft], r: random.Random, products: ProductMaster) -> None:
    growth = r.uniform(1.10, 1.25)
    cap = 12.0
    stop = ep.onset + timedelta(days=140)
    ep.detail.update(weekly_growth=round(growth, 3), cap=cap, weeks=20)
    # After 20 weeks the account is closed: the registrant's later orders are dropped.
    tl[:] = [d for d in tl if d.signed_at < stop]
    for d in tl:
        if d.signed_at < ep.onset:
            continue
        f = min(cap, growth ** ((d.signed_at - ep.onset).total_seconds() / (7 * 86400)))
        if ep.family not in {p.drug_family for p, _ in d.lines}:
            d.lines += _family_lines(d.registrant, ep.family, d.registrant.habit(ep.family).mean_units, products)
        d.lines = _scale_lines(d.lines, lambda fam: f if fam == ep.family else 1.0, r)
        d.kind, d.episode = "ramp", ep.episode_id
        if f >= 2.0:
            d.label = SUSPICIOUS
            if ep.start is None:
                ep.start = d.signed_at
        else:
            d.label = GREY


def _inject_spike(ep: Episode, tl: list[Draft], r: random.Random, products: ProductMaster) -> None:
    d = next(x for x in tl if x.signed_at >= ep.onset)
    mult = r.uniform(4.0, 8.0)
    ep.detail.update(multiple=round(mult, 2))
    d.lines = [x for x in d.lines if x[0].drug_family != ep.family]
    d.lines += _family_lines(d.registrant, ep.family, d.registrant.habit(ep.family).mean_units * mult, products)
    d.label, d.kind, d.episode = SUSPICIOUS, "spike", ep.episode_id
    ep.start = d.signed_at


def _inject_burst(ep: Episode, tl: list[Draft], r: random.Random, products: ProductMaster) -> list[Draft]:
    reg = tl[0].registrant
    n = r.randint(8, 14)
    ep.detail.update(orders=n)
    extra = []
    t = ep.onset
    for _ in range(n):
        units = reg.habit(ep.family).mean_units * r.uniform(0.3, 0.6)
        extra.append(Draft(reg, t, _family_lines(reg, ep.family, units, products),
                           label=SUSPICIOUS, kind="burst", episode=ep.episode_id))
        t += timedelta(minutes=r.uniform(90, 330))
    ep.start = ep.onset
    return extra


def _inject_shift(ep: Episode, tl: list[Draft], r: random.Random, products: ProductMaster,
                  by_family: dict[str, list[Product]]) -> None:
    reg = tl[0].registrant
    main = reg.habit(ep.detail["from_family"])
    forms = ("TAB", "CAP", "PATCH", "FILM")
    cands = [p for p in by_family[ep.family] if p.schedule in reg.schedules and p.dosage_form in forms]
    prod = max(cands, key=lambda p: p.mme_factor * p.base_mg_per_unit)
    ep.detail.update(product=prod.ndc)
    end = ep.onset + timedelta(days=42)
    for d in tl:
        if ep.onset <= d.signed_at < end:
            units = main.mean_units * r.uniform(0.6, 1.0)
            d.lines = d.lines + [(prod, max(2, round(units / prod.units_per_package)))]
            d.label, d.kind, d.episode = SUSPICIOUS, "mme_shift", ep.episode_id
            if ep.start is None:
                ep.start = d.signed_at


def _inject_surge(ep: Episode, tl: list[Draft], r: random.Random, shape: Callable[[float], float]) -> None:
    for d in tl:
        days = (d.signed_at - ep.onset).total_seconds() / 86400
        if days < 0 or (ep.kind == "surge_flu" and days >= 84):
            continue
        f = shape(days)
        d.lines = _scale_lines(d.lines, lambda fam: f, r)
        d.kind, d.episode = ep.kind, ep.episode_id
    ep.start = ep.onset


def _flu_shape(days: float) -> float:
    """+40 %: 3 weeks up, 6 weeks plateau, 3 weeks down."""
    if days < 21:
        return 1.0 + 0.4 * days / 21
    if days < 63:
        return 1.4
    if days < 84:
        return 1.4 - 0.4 * (days - 63) / 21
    return 1.0


def _expansion_shape(ramp_days: float) -> Callable[[float], float]:
    return lambda days: 1.0 + min(1.0, max(0.0, days / ramp_days))


# --------------------------------------------------------------------------- generate
def generate(config: ScenarioConfig | None = None, **overrides: Any) -> Scenario:
    """Generate a labeled scenario stream (deterministic in ``config.seed``).

    ``overrides`` are :class:`ScenarioConfig` fields, e.g. ``n_registrants=60, days=400``.
    """
    cfg = config or ScenarioConfig()
    if overrides:
        cfg = ScenarioConfig(**{**cfg.__dict__, **overrides})
    counts = {**{k: 0 for k in EPISODE_KINDS}, **dict(cfg.counts)}
    products = default_product_master()
    by_family: dict[str, list[Product]] = {}
    for p in products:
        by_family.setdefault(p.drug_family, []).append(p)
    end = cfg.end
    start = end - timedelta(days=cfg.days)
    pop = Population.generate(cfg.n_registrants, seed=cfg.seed, products=products)
    rng = random.Random(f"scenario:{cfg.seed}")

    timelines: dict[str, list[Draft]] = {}
    for reg in pop.registrants:
        r = random.Random(f"scenario-orders:{cfg.seed}:{reg.dea_number}")
        timelines[reg.dea_number] = normal_timeline(reg, start, end, r, products)

    episodes: dict[str, Episode] = {}
    extra: list[Draft] = []
    used: set[str] = set()
    earliest = start + timedelta(days=cfg.min_history_days)

    def pick(pred: Callable[[Registrant], bool]) -> Registrant | None:
        cands = [g for g in pop.registrants if g.dea_number not in used and pred(g)
                 and len(timelines[g.dea_number]) >= 40]
        if not cands:
            return None
        g = rng.choice(cands)
        used.add(g.dea_number)
        return g

    def onset(latest_margin_days: int) -> datetime:
        span = (end - timedelta(days=latest_margin_days) - earliest).total_seconds()
        return earliest + timedelta(seconds=rng.uniform(0, max(0.0, span)))

    n_ep = 0

    def new_ep(kind: str, reg: Registrant, family: str, at: datetime, suspicious: bool) -> Episode:
        nonlocal n_ep
        n_ep += 1
        ep = Episode(f"{kind}-{n_ep:03d}", kind, reg.dea_number, reg.business_activity, family, at,
                     suspicious=suspicious, expected_hold_days=EXPECTED_HOLD_DAYS.get(kind))
        episodes[ep.episode_id] = ep
        return ep

    for kind in SUSPICIOUS_KINDS:
        if kind in ("new_mill", "strength_shift"):
            continue  # drawn last (below)
        for _ in range(counts[kind]):
            reg = pick(lambda g: g.business_activity in _PHARMACIES and _main_opioid(g) is not None
                       and (kind != "mme_shift" or any(f not in g.families and f in by_family
                                                       for f in SHIFT_FAMILIES)))
            if reg is None:
                break
            fam = _main_opioid(reg)
            r = random.Random(f"scenario-ep:{cfg.seed}:{n_ep}")
            tl = timelines[reg.dea_number]
            if kind == "ramp":
                ep = new_ep(kind, reg, fam, onset(150), True)
                _inject_ramp(ep, tl, r, products)
            elif kind == "spike":
                ep = new_ep(kind, reg, fam, onset(30), True)
                _inject_spike(ep, tl, r, products)
            elif kind == "burst":
                ep = new_ep(kind, reg, fam, onset(30), True)
                extra += _inject_burst(ep, tl, r, products)
            else:
                target = r.choice([f for f in SHIFT_FAMILIES if f not in reg.families and f in by_family])
                ep = new_ep(kind, reg, target, onset(60), True)
                ep.detail["from_family"] = fam
                _inject_shift(ep, tl, r, products, by_family)

    for _ in range(counts["surge_flu"]):
        reg = pick(lambda g: g.business_activity == "HOSPITAL/CLINIC")
        if reg is None:
            break
        # Flu season: onset between mid-October and late November of the last autumn with history.
        year = end.year if end.month >= 12 else end.year - 1
        at = datetime(year, 10, 15, tzinfo=timezone.utc) + timedelta(days=rng.uniform(0, 40))
        if at < earliest:
            at = onset(90)
        ep = new_ep("surge_flu", reg, "*", at, False)
        ep.detail.update(peak_factor=1.4)
        _inject_surge(ep, timelines[reg.dea_number], random.Random(f"scenario-ep:{cfg.seed}:{n_ep}"), _flu_shape)

    for _ in range(counts["surge_expansion"]):
        reg = pick(lambda g: g.business_activity in _PHARMACIES)
        if reg is None:
            break
        ramp_days = rng.uniform(28, 42)
        ep = new_ep("surge_expansion", reg, "*", onset(90), False)
        ep.detail.update(ramp_days=round(ramp_days, 1), final_factor=2.0)
        _inject_surge(ep, timelines[reg.dea_number], random.Random(f"scenario-ep:{cfg.seed}:{n_ep}"),
                      _expansion_shape(ramp_days))

    if counts["new_registrant"]:
        newcomers = Population.generate(counts["new_registrant"], seed=cfg.seed + 100_003, products=products)
        for reg in newcomers.registrants:
            if reg.dea_number in timelines:
                continue
            first = start + timedelta(days=rng.uniform(60, max(61, cfg.days - 60)))
            ep = new_ep("new_registrant", reg, "*", first, False)
            r = random.Random(f"scenario-orders:{cfg.seed}:new:{reg.dea_number}")
            tl = normal_timeline(reg, first, end, r, products)
            for d in tl:
                d.kind, d.episode = "new_registrant", ep.episode_id
            ep.start = tl[0].signed_at if tl else first
            timelines[reg.dea_number] = tl

    _add_new_customers(cfg, counts, start, end, products, timelines, new_ep)
    _add_strength_episodes(cfg, counts, pop.registrants, used, timelines, by_family, earliest, end, new_ep)

    drafts = [d for tl in timelines.values() for d in tl] + extra
    drafts.sort(key=lambda d: (d.signed_at, d.registrant.dea_number))
    return _finalize(drafts, episodes, cfg, start, end)


def _add_new_customers(cfg: ScenarioConfig, counts: Mapping[str, int], start: datetime, end: datetime,
                       products: ProductMaster, timelines: dict[str, list[Draft]],
                       new_ep: Callable[[str, Registrant, str, datetime, bool], Episode]) -> None:
    """New pill mills (big from the first order) and legitimate new pharmacies with an opening stock order.

    Their own population and random streams, so the episodes drawn before are the same as without them.
    """
    n = counts.get("new_mill", 0) + counts.get("new_opening", 0)
    if not n:
        return
    rng = random.Random(f"scenario-new:{cfg.seed}")
    pop = Population.generate(4 * n + 8, seed=cfg.seed + 200_003, products=products)
    cands = [g for g in pop.registrants if g.dea_number not in timelines and g.business_activity in _PHARMACIES
             and _main_opioid(g) is not None]
    for kind in ("new_mill", "new_opening"):
        for _ in range(counts.get(kind, 0)):
            if not cands:
                return
            reg = cands.pop(rng.randrange(len(cands)))
            first = start + timedelta(days=rng.uniform(120, max(121, cfg.days - 120)))
            fam = _main_opioid(reg)
            r = random.Random(f"scenario-orders:{cfg.seed}:{kind}:{reg.dea_number}")
            tl = normal_timeline(reg, first, end, r, products)
            if not tl:
                continue
            ep = new_ep(kind, reg, fam if kind == "new_mill" else "*", tl[0].signed_at, kind == "new_mill")
            ep.start = tl[0].signed_at
            if kind == "new_mill":
                mult = r.uniform(3.0, 8.0)
                stop = tl[0].signed_at + timedelta(days=r.uniform(90, 180))
                ep.detail.update(multiple=round(mult, 2), months=round((stop - tl[0].signed_at).days / 30.4, 1))
                tl[:] = [d for d in tl if d.signed_at < stop]
                for d in tl:
                    if fam not in d.families:
                        d.lines += _family_lines(reg, fam, reg.habit(fam).mean_units, products)
                    d.lines = _scale_lines(d.lines, lambda f: mult if f == fam else 1.0, r)
                    d.label, d.kind, d.episode = SUSPICIOUS, kind, ep.episode_id
            else:
                mult = r.uniform(2.0, 4.0)
                ep.detail.update(opening_multiple=round(mult, 2))
                tl[0].lines = _scale_lines(tl[0].lines, lambda f: mult, r)
                for d in tl:
                    d.kind, d.episode = kind, ep.episode_id
            timelines[reg.dea_number] = tl


def _strength_family(reg: Registrant, by_family: Mapping[str, list[Product]]) -> tuple[str, Product] | None:
    """(main opioid, its strongest tablet/capsule of the registrant's schedules) when that is >= 2x its usual mix."""
    fam = _main_opioid(reg)
    if fam is None:
        return None
    prods = {p.ndc: p for p in by_family.get(fam, ())}
    h = reg.habit(fam)
    usual = sum(share * prods[ndc].base_mg_per_unit for ndc, share in h.items if ndc in prods)
    cands = [p for p in prods.values() if p.schedule in reg.schedules and p.dosage_form in ("TAB", "CAP")]
    if not cands or usual <= 0:
        return None
    top = max(cands, key=lambda p: p.base_mg_per_unit)
    return (fam, top) if top.base_mg_per_unit >= 2.0 * usual else None


def _one_product(lines: list[tuple[Product, int]], family: str, r: random.Random) -> list[tuple[Product, int]]:
    """The family's lines replaced by one of them, drawn by its share of units, carrying all the family's units."""
    fam = [(p, pk) for p, pk in lines if p.drug_family == family]
    if len(fam) < 2:
        return lines
    units = sum(p.units_per_package * pk for p, pk in fam)
    p = r.choices([p for p, _ in fam], weights=[p.units_per_package * pk for p, pk in fam])[0]
    return [x for x in lines if x[0].drug_family != family] + [(p, max(1, round(units / p.units_per_package)))]


def _add_strength_episodes(cfg: ScenarioConfig, counts: Mapping[str, int], regs: list[Registrant], used: set[str],
                           timelines: dict[str, list[Draft]], by_family: Mapping[str, list[Product]],
                           earliest: datetime, end: datetime,
                           new_ep: Callable[[str, Registrant, str, datetime, bool], Episode]) -> None:
    """Shifts to the strongest product of a family (suspicious) and one-product restocks (normal).

    Their own random stream, on registrants no other episode uses, drawn after every other kind.
    """
    rng = random.Random(f"scenario-strength:{cfg.seed}")
    span = max(0.0, (end - timedelta(days=90) - earliest).total_seconds())
    for kind in ("strength_shift", "multi_strength"):
        for _ in range(counts.get(kind, 0)):
            cands = [g for g in regs if g.dea_number not in used and len(timelines[g.dea_number]) >= 40
                     and (_strength_family(g, by_family) if kind == "strength_shift"
                          else _main_opioid(g) and len(g.habit(_main_opioid(g)).items) >= 2)]
            if not cands:
                break
            reg = rng.choice(sorted(cands, key=lambda g: g.dea_number))
            used.add(reg.dea_number)
            at = earliest + timedelta(seconds=rng.uniform(0, span))
            r = random.Random(f"scenario-strength:{cfg.seed}:{reg.dea_number}")
            tl = timelines[reg.dea_number]
            if kind == "strength_shift":
                fam, top = _strength_family(reg, by_family)  # type: ignore[misc]
                ep = new_ep(kind, reg, fam, at, True)
                stop = at + timedelta(days=r.uniform(42, 70))
                ep.detail.update(product=top.ndc, weeks=round((stop - at).days / 7, 1))
                tl[:] = [d for d in tl if d.signed_at < stop]
                for d in tl:
                    if d.signed_at < at:
                        continue
                    units = sum(p.units_per_package * pk for p, pk in d.lines if p.drug_family == fam)
                    units = units or reg.habit(fam).mean_units
                    units *= r.uniform(0.7, 1.1)
                    d.lines = ([x for x in d.lines if x[0].drug_family != fam]
                               + [(top, max(1, round(units / top.units_per_package)))])
                    d.label, d.kind, d.episode = SUSPICIOUS, kind, ep.episode_id
                    if ep.start is None:
                        ep.start = d.signed_at
            else:
                fam = _main_opioid(reg)
                assert fam is not None
                ep = new_ep(kind, reg, fam, at, False)
                for d in tl:
                    if d.signed_at >= at:
                        d.lines = _one_product(d.lines, fam, r)
                        d.kind, d.episode = kind, ep.episode_id
                        if ep.start is None:
                            ep.start = d.signed_at


def _finalize(drafts: list[Draft], episodes: dict[str, Episode], cfg: ScenarioConfig,
              start: datetime, end: datetime) -> Scenario:
    r = random.Random(f"scenario-final:{cfg.seed}")
    counters: dict[str, int] = {}
    orders, labels = [], []
    for d in drafts:
        dea = d.registrant.dea_number
        counters[dea] = counters.get(dea, r.randint(1, 400)) + 1
        signed = d.signed_at.replace(microsecond=0)
        received = signed + timedelta(seconds=r.uniform(5, 300))
        oid = str(uuid.UUID(int=r.getrandbits(128), version=4))
        orders.append({
            "order_id": oid, "order_number": f"{signed.year % 100:02d}X{counters[dea]:06d}",
            "purchaser_dea": dea, "purchaser_name": d.registrant.name, "supplier_dea": SUPPLIER.dea_number,
            "signed_at": signed, "received_at": received, "verified_at": received + timedelta(milliseconds=50),
            "signer_serial": "5C", "signer_fingerprint": "00" * 32,
            "business_activity": d.registrant.business_activity, "purchaser_state": d.registrant.state,
            "lines": _line_dicts(d.lines),
        })
        ep = episodes.get(d.episode) if d.episode else None
        if ep is not None:
            ep.orders += 1
        labels.append({"order_id": oid, "label": d.label, "kind": d.kind, "episode": d.episode,
                       "episode_start": ep.start if ep else None})
    # Time order is the order of receipt (what the monitor sees).
    idx = sorted(range(len(orders)), key=lambda i: (orders[i]["received_at"], orders[i]["purchaser_dea"]))
    return Scenario([orders[i] for i in idx], [labels[i] for i in idx], episodes, cfg, start, end)


def episodes_table(scn: Scenario) -> list[dict[str, Any]]:
    """The episodes as plain rows (for a CSV or a report)."""
    return [{"episode": e.episode_id, "kind": e.kind, "purchaser_dea": e.purchaser_dea,
             "business_activity": e.business_activity, "family": e.family, "onset": e.onset.isoformat(),
             "start": e.start.isoformat() if e.start else "", "suspicious": e.suspicious,
             "expected_hold_days": e.expected_hold_days, "orders": e.orders,
             "detail": ";".join(f"{k}={v}" for k, v in sorted(e.detail.items()))}
            for e in scn.episodes.values()]


__all__ = ["ScenarioConfig", "Scenario", "Episode", "generate", "episodes_table", "SUSPICIOUS", "NORMAL",
           "GREY", "SUSPICIOUS_KINDS", "LEGIT_KINDS", "LEGIT_SURGE_KINDS", "EPISODE_KINDS",
           "EXPECTED_HOLD_DAYS", "DEFAULT_COUNTS"]

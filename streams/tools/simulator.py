"""A deterministic simulator of a distributor's customers and their CSOS orders.

Everything derives from a seed: the same ``(n_registrants, seed)`` gives the
same population, and the same population + :class:`SimulationConfig` gives the
same orders (signatures aside: certificates and keys are made when signing).

Population (:meth:`Population.generate`)
    Retail pharmacies, chain pharmacies, hospitals/clinics and practitioners
    (default mix 35/30/15/20 %, at least one of each from four registrants up).
    DEA numbers carry a valid check digit; first letter by kind as seen in the
    ARCOS sample (pharmacies B/F and some A, hospitals A/B, practitioners
    A/B/F), second letter the initial of the business or surname. Each
    registrant has authorized schedules (pharmacies and hospitals all of
    2, 2N, 3, 3N, 4, 5; practitioners by specialty, most without schedule 2)
    and ordering habits: which drug families, which NDCs within them, how
    many dosage units per order, how often a family is on an order, cadence
    (chains on fixed weekdays 2-3 times a week, retail pharmacies and
    hospitals every 2-4 days, practitioners every 3-5 weeks), a habitual hour,
    a weekday effect (bigger Monday/Friday orders), an annual seasonal swing
    of 3-12 %, log-normal noise (sigma 0.10-0.20) and an occasional
    legitimate restock (4 % of orders, 1.5-2x).

Orders (:func:`generate_orders` / :func:`iter_orders`)
    Over ``days`` (default 120) ending at ``end``, each registrant's normal
    orders (the first one carries every family it stocks, so a rarely ordered
    family is never "new" later), then:

    * suspicious ones (default 2 % of all orders), only late in the period
      (after ``inject_after`` of it) and only for registrants with history
      (at least ``min_history`` earlier normal orders, in the family for a
      size spike). ``size_spike``: one family at 5-15x the usual packages;
      ``frequency_burst``: extra normal-looking orders (4-7 per burst by
      default) 1-6 h apart right after a normal order (normal orders are at
      least ~18 h apart); each carries ``detail["position"]`` and
      ``detail["orders_in_24h"]`` so an evaluation can see how early in the
      burst a detector could have fired;
      ``family_shift``: a normal order plus a large order (10-30 bottles or
      20-60 boxes of patches) of a high-MME family the registrant never
      ordered (fentanyl, hydromorphone, oxymorphone, oxycodone, methadone).
      Expected outcome ``HOLD``.
    * bad ones (default 5 %), extra orders at random times, each with exactly
      one defect applied when signing (:func:`sign_simulated`); expected
      outcome ``REJECT:<code>`` or ``DLQ`` (see ``EXPECTED_OUTCOME``).

    Normal orders are expected to be released (``RELEASE``).

Signing (:class:`SigningKit`, :func:`sign_simulated`)
    Uses ``streams.tools.pki.TestPKI`` and ``streams.domain.cms.sign_order``. Each
    registrant gets one certificate (cached; reused from ``pki.registrants``
    when one with the same DEA number and schedules is already there, so a
    PKI written to disk and loaded again signs with the same certificates).
    Bad kinds get special certificates (expired, revoked, rogue CA) which are
    *not* recorded as the registrant's certificate.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import random
import uuid
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from streams.domain.identifiers import make_dea_number
from streams.domain.model import Order, OrderLine, Party
from streams.domain.order_document import encode_order
from streams.domain.products import Product, ProductMaster

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- labels
NORMAL = "normal"
SUSPICIOUS_KINDS: tuple[str, ...] = ("size_spike", "frequency_burst", "family_shift")
BAD_KINDS: tuple[str, ...] = (
    "tampered", "wrong_key", "expired_cert", "revoked_cert", "dea_mismatch",
    "schedule_not_authorized", "untrusted_cert", "malformed_bytes", "malformed_order",
)
LABELS: tuple[str, ...] = (NORMAL,) + SUSPICIOUS_KINDS + BAD_KINDS

#: label -> what the pipeline must do with the order.
EXPECTED_OUTCOME: dict[str, str] = {
    NORMAL: "RELEASE",
    "size_spike": "HOLD",
    "frequency_burst": "HOLD",
    "family_shift": "HOLD",
    "tampered": "REJECT:BAD_SIGNATURE",
    "wrong_key": "REJECT:BAD_SIGNATURE",
    "expired_cert": "REJECT:CERT_EXPIRED",
    "revoked_cert": "REJECT:CERT_REVOKED",
    "dea_mismatch": "REJECT:DEA_MISMATCH",
    "schedule_not_authorized": "REJECT:SCHEDULE_NOT_AUTHORIZED",
    "untrusted_cert": "REJECT:UNTRUSTED_CERTIFICATE",
    "malformed_bytes": "DLQ",
    "malformed_order": "REJECT:MALFORMED_ORDER",
}

BUSINESS_ACTIVITIES = ("RETAIL PHARMACY", "CHAIN PHARMACY", "HOSPITAL/CLINIC", "PRACTITIONER")
DEFAULT_MIX: dict[str, float] = {
    "RETAIL PHARMACY": 0.35, "CHAIN PHARMACY": 0.30, "HOSPITAL/CLINIC": 0.15, "PRACTITIONER": 0.20,
}
ALL_SCHEDULES: tuple[str, ...] = ("2", "2N", "3", "3N", "4", "5")
NO_CII_SCHEDULES: tuple[str, ...] = ("3", "3N", "4", "5")

#: The distributor receiving the orders (a simulated registrant, not a real one).
SUPPLIER = Party(
    dea_number=make_dea_number("PC", "482913"),
    name="CSOS TEST DISTRIBUTION CO (SIMULATED)",
    address="1200 COMMERCE WAY, NORWOOD, MA 02062",
)

#: High-MME families a "family shift" moves into.
SHIFT_FAMILIES = ("FENTANYL", "HYDROMORPHONE", "OXYMORPHONE", "OXYCODONE", "METHADONE")

# ----------------------------------------------------------------------------- habits tables
# family -> (P(registrant orders the family), P(family on an order) range,
#            dosage units per day range, allowed dosage forms or None = kind default)
_Fam = tuple[float, tuple[float, float], tuple[float, float], tuple[str, ...] | None]

_PHARMACY_FORMS = ("TAB", "CAP", "PATCH", "FILM", "GEL")
_RETAIL: dict[str, _Fam] = {
    "OXYCODONE": (0.95, (0.80, 1.00), (60, 200), None),
    "HYDROCODONE": (0.95, (0.80, 1.00), (80, 300), None),
    "ALPRAZOLAM": (0.90, (0.60, 0.95), (50, 150), None),
    "AMPHETAMINE": (0.85, (0.60, 0.95), (30, 120), None),
    "TRAMADOL": (0.80, (0.50, 0.90), (40, 150), None),
    "ZOLPIDEM": (0.70, (0.40, 0.80), (20, 80), None),
    "LORAZEPAM": (0.70, (0.40, 0.80), (20, 80), None),
    "METHYLPHENIDATE": (0.60, (0.40, 0.80), (15, 60), None),
    "CODEINE": (0.60, (0.30, 0.70), (20, 80), None),
    "PREGABALIN": (0.60, (0.40, 0.80), (15, 60), None),
    "LISDEXAMFETAMINE": (0.50, (0.40, 0.80), (10, 40), None),
    "DIAZEPAM": (0.50, (0.30, 0.70), (10, 50), None),
    "BUPRENORPHINE": (0.50, (0.40, 0.80), (15, 60), None),
    "MORPHINE": (0.50, (0.30, 0.70), (10, 40), None),
    "METHADONE": (0.35, (0.30, 0.70), (10, 50), ("TAB",)),
    "TESTOSTERONE": (0.30, (0.20, 0.50), (2, 6), ("INJ", "GEL")),
    "TAPENTADOL": (0.20, (0.20, 0.50), (5, 20), None),
    "HYDROMORPHONE": (0.15, (0.20, 0.50), (5, 20), None),
    "FENTANYL": (0.10, (0.20, 0.50), (1, 4), None),
    "OXYMORPHONE": (0.05, (0.20, 0.40), (5, 15), None),
}
_HOSPITAL: dict[str, _Fam] = {
    "MORPHINE": (0.95, (0.70, 1.00), (20, 80), None),
    "HYDROMORPHONE": (0.95, (0.70, 1.00), (15, 60), None),
    "FENTANYL": (0.90, (0.60, 0.95), (10, 50), None),
    "OXYCODONE": (0.90, (0.60, 0.95), (30, 120), None),
    "LORAZEPAM": (0.90, (0.60, 0.95), (10, 40), None),
    "HYDROCODONE": (0.60, (0.40, 0.80), (20, 80), None),
    "KETAMINE": (0.60, (0.30, 0.70), (10, 40), None),
    "METHADONE": (0.50, (0.30, 0.70), (5, 30), None),
    "DIAZEPAM": (0.50, (0.30, 0.60), (5, 20), None),
    "ALPRAZOLAM": (0.50, (0.30, 0.60), (5, 25), None),
    "ZOLPIDEM": (0.50, (0.30, 0.60), (5, 20), None),
    "TRAMADOL": (0.50, (0.30, 0.60), (10, 40), None),
    "BUPRENORPHINE": (0.30, (0.20, 0.50), (3, 15), None),
    "OXYMORPHONE": (0.10, (0.20, 0.40), (3, 10), None),
}
# Practitioners: specialty -> (P(authorized for schedule 2/2N), families).
_PRACTITIONER: dict[str, tuple[float, dict[str, _Fam]]] = {
    "ADDICTION MEDICINE": (0.0, {
        "BUPRENORPHINE": (1.0, (0.90, 1.00), (10, 40), None),
    }),
    "MEN'S HEALTH": (0.0, {
        "TESTOSTERONE": (1.0, (0.90, 1.00), (2, 8), ("INJ", "GEL")),
    }),
    "VETERINARY": (0.0, {
        "KETAMINE": (1.0, (0.70, 1.00), (5, 20), None),
        "DIAZEPAM": (0.8, (0.50, 0.90), (2, 10), None),
        "TRAMADOL": (0.6, (0.40, 0.80), (3, 15), None),
    }),
    "FAMILY MEDICINE": (0.5, {
        "TRAMADOL": (0.8, (0.60, 0.90), (5, 20), None),
        "CODEINE": (0.7, (0.50, 0.80), (3, 15), None),
        "DIAZEPAM": (0.6, (0.40, 0.80), (2, 10), None),
        "TESTOSTERONE": (0.5, (0.40, 0.80), (1, 4), ("INJ",)),
        "HYDROCODONE": (0.8, (0.50, 0.90), (5, 20), None),
        "OXYCODONE": (0.5, (0.40, 0.80), (3, 10), None),
    }),
    "ANESTHESIA/PAIN": (1.0, {
        "KETAMINE": (1.0, (0.70, 1.00), (5, 20), ("INJ",)),
        "FENTANYL": (0.9, (0.60, 0.90), (5, 20), ("INJ",)),
        "MORPHINE": (0.7, (0.50, 0.80), (2, 8), ("INJ",)),
        "LORAZEPAM": (0.7, (0.50, 0.80), (2, 8), ("INJ",)),
    }),
}
_SPECIALTY_WEIGHTS = {"FAMILY MEDICINE": 3, "ADDICTION MEDICINE": 2, "MEN'S HEALTH": 2,
                      "VETERINARY": 2, "ANESTHESIA/PAIN": 1}

_SURNAMES = ("ADAMS", "BAKER", "CARTER", "DOYLE", "ELLIS", "FOSTER", "GRANT", "HAYES", "IRWIN",
             "JENSEN", "KELLY", "LOPEZ", "MURPHY", "NGUYEN", "OSBORNE", "PATEL", "QUINN", "RIVERA",
             "SULLIVAN", "TORRES", "UPTON", "VARGAS", "WALSH", "YOUNG", "ZIMMERMAN")
_FIRST = ("ANNA", "BRIAN", "CLAIRE", "DAVID", "ELENA", "FRANK", "GRACE", "HENRY", "IRIS", "JAMES",
          "KAREN", "LUIS", "MARIA", "NATHAN", "OLIVIA", "PAUL", "RITA", "SAMUEL", "TINA", "VICTOR")
_CHAINS = ("MERIDIAN DRUG", "BAYSIDE PHARMACY", "PATRIOT DRUG", "KEYSTONE PHARMACY", "PIONEER DRUG",
           "SUMMIT PHARMACY")
_PLACES = (("BOSTON", "MA", "02118"), ("WORCESTER", "MA", "01608"), ("SPRINGFIELD", "MA", "01103"),
           ("LOWELL", "MA", "01852"), ("BROCKTON", "MA", "02301"), ("PROVIDENCE", "RI", "02903"),
           ("HARTFORD", "CT", "06103"), ("NEW HAVEN", "CT", "06510"), ("ALBANY", "NY", "12207"),
           ("SYRACUSE", "NY", "13202"), ("MANCHESTER", "NH", "03101"), ("PORTLAND", "ME", "04101"),
           ("BURLINGTON", "VT", "05401"), ("NEWARK", "NJ", "07102"), ("SCRANTON", "PA", "18503"))
_STREETS = ("MAIN ST", "WASHINGTON ST", "ELM ST", "CENTRAL AVE", "PARK AVE", "HIGHLAND AVE",
            "BROADWAY", "PLEASANT ST", "MAPLE AVE", "TREMONT ST", "COLUMBIA RD", "UNION ST")


# ----------------------------------------------------------------------------- dataclasses
@dataclass(frozen=True)
class FamilyHabit:
    """How a registrant orders one drug family."""

    family: str
    items: tuple[tuple[str, float], ...]  # (NDC, share of the family's dosage units)
    mean_units: float  # typical dosage units of the family on an order that carries it
    p_order: float  # probability that an order carries the family


@dataclass(frozen=True)
class Registrant:
    """A simulated customer of the distributor and its ordering habits."""

    dea_number: str
    name: str
    address: str
    state: str
    business_activity: str  # one of BUSINESS_ACTIVITIES
    schedules: tuple[str, ...]  # authorized schedules (what its certificate carries)
    habits: tuple[FamilyHabit, ...]
    specialty: str = ""  # practitioners only
    mean_gap_days: float = 3.0  # mean days between orders
    gap_shape: float = 4.0  # gamma shape of the gaps (higher = more regular)
    order_weekdays: tuple[int, ...] = (0, 1, 2, 3, 4)  # Monday = 0
    fixed_schedule: bool = False  # chains: order on every order_weekday
    order_hour: float = 10.0  # habitual hour of day (UTC)
    hour_sd: float = 1.0
    noise_sigma: float = 0.15  # log-normal noise on a family's units
    seasonal_amplitude: float = 0.05
    seasonal_peak_doy: int = 15  # day of the year with the highest demand
    weekday_factors: tuple[float, ...] = (1.0,) * 7
    restock_prob: float = 0.04  # chance of a legitimate 1.5-2x restock order

    @property
    def party(self) -> Party:
        return Party(self.dea_number, self.name, self.address)

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(h.family for h in self.habits)

    def habit(self, family: str) -> FamilyHabit | None:
        return next((h for h in self.habits if h.family == family), None)

    def may_order(self, schedule: str) -> bool:
        return schedule in self.schedules

    def modulation(self, t: datetime) -> float:
        """Seasonal x weekday demand multiplier at ``t``."""
        doy = t.timetuple().tm_yday
        season = 1.0 + self.seasonal_amplitude * math.cos(2 * math.pi * (doy - self.seasonal_peak_doy) / 365.25)
        return season * self.weekday_factors[t.weekday()]


def default_product_master() -> ProductMaster:
    """The product master the simulator draws NDCs from (``streams/tools/data/product_master.csv``)."""
    from streams.tools.product_catalog import DEFAULT_PATH, build_catalog
    if DEFAULT_PATH.exists():
        return ProductMaster.load(DEFAULT_PATH)
    return ProductMaster(build_catalog())


@dataclass(frozen=True)
class Population:
    """The distributor's customers; :meth:`generate` is deterministic in its seed."""

    registrants: tuple[Registrant, ...]
    supplier: Party
    products: ProductMaster
    seed: int

    def __len__(self) -> int:
        return len(self.registrants)

    def __iter__(self) -> Iterator[Registrant]:
        return iter(self.registrants)

    def by_dea(self, dea_number: str) -> Registrant | None:
        return next((r for r in self.registrants if r.dea_number == dea_number), None)

    @classmethod
    def generate(cls, n_registrants: int = 50, seed: int = 0, *, products: ProductMaster | None = None,
                 mix: Mapping[str, float] | None = None, supplier: Party = SUPPLIER) -> "Population":
        if n_registrants < 1:
            raise ValueError("n_registrants must be at least 1")
        products = products or default_product_master()
        by_family: dict[str, list[Product]] = {}
        for p in products:
            by_family.setdefault(p.drug_family, []).append(p)
        rng = random.Random(f"population:{seed}")
        kinds = _allocate(n_registrants, dict(mix or DEFAULT_MIX), rng)
        used: set[str] = set()
        registrants = []
        first_practitioner = True
        for i, kind in enumerate(kinds):
            r = random.Random(f"population:{seed}:{i}")
            specialty = ""
            if kind == "PRACTITIONER":
                # The first practitioner has no schedule-2 authority, so every
                # population of four or more can exercise SCHEDULE_NOT_AUTHORIZED.
                specialty = "ADDICTION MEDICINE" if first_practitioner else _weighted(r, _SPECIALTY_WEIGHTS)
                first_practitioner = False
            registrants.append(_make_registrant(kind, specialty, r, by_family, used))
        return cls(tuple(registrants), supplier, products, seed)

    def write_registrant_master(self, path: str | Path) -> Path:
        """CSV of dea_number, name, address, state, business_activity, schedules (';'-joined)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["dea_number", "name", "address", "state", "business_activity", "schedules"])
            for reg in self.registrants:
                w.writerow([reg.dea_number, reg.name, reg.address, reg.state, reg.business_activity,
                            ";".join(reg.schedules)])
        return path


@dataclass(frozen=True)
class SimulatedOrder:
    """One message of the simulated feed and its ground truth."""

    seq: int  # position in the stream (signed-time order)
    sim_id: str  # deterministic UUID; use it as the intake order_id
    order: Order  # the order as the purchaser meant to sign it (defects are applied when signing)
    label: str  # one of LABELS
    expected_outcome: str  # "RELEASE", "HOLD", "REJECT:<REASON_CODE>" or "DLQ"
    registrant: Registrant  # who really sent/signed it
    received_at: datetime
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def signed_at(self) -> datetime:
        return self.order.signed_at

    @property
    def order_number(self) -> str:
        return self.order.order_number

    @property
    def claimed_purchaser_dea(self) -> str:
        """The purchaser DEA number written in the document (differs from the signer's for dea_mismatch)."""
        return self.order.purchaser.dea_number

    @property
    def is_bad(self) -> bool:
        return self.label in BAD_KINDS

    @property
    def is_suspicious(self) -> bool:
        return self.label in SUSPICIOUS_KINDS

    @property
    def reason_code(self) -> str | None:
        return self.expected_outcome.split(":", 1)[1] if self.expected_outcome.startswith("REJECT:") else None

    def family_units(self, products: ProductMaster) -> dict[str, int]:
        """Dosage units per drug family on the order (as signed, before any defect)."""
        out: dict[str, int] = {}
        for ln in self.order.lines:
            p = products.get(ln.ndc)
            fam = p.drug_family if p else "UNKNOWN"
            out[fam] = out.get(fam, 0) + ln.dosage_units
        return out


@dataclass(frozen=True)
class SimulationConfig:
    """Knobs of the order stream. ``end`` None = today 00:00 UTC (pass it for reproducibility)."""

    days: int = 120
    end: datetime | None = None
    seed: int | None = None  # None = the population's seed
    bad_fraction: float = 0.05  # of all orders
    suspicious_fraction: float = 0.02  # of all orders
    bad_counts: Mapping[str, int] | None = None  # exact orders per bad kind (overrides bad_fraction)
    suspicious_counts: Mapping[str, int] | None = None  # exact orders per suspicious kind
    bad_kinds: tuple[str, ...] = BAD_KINDS  # kinds bad_fraction is spread over
    suspicious_kinds: tuple[str, ...] = SUSPICIOUS_KINDS
    min_history: int = 15  # earlier normal orders (in the family, for spikes) before an injection
    inject_after: float = 0.5  # suspicious injections only after this fraction of the period
    spike_factor: tuple[float, float] = (5.0, 15.0)
    burst_size: tuple[int, int] = (4, 7)  # orders per frequency burst
    burst_gap_hours: tuple[float, float] = (1.0, 6.0)
    max_events_per_registrant: int = 2
    receipt_delay_seconds: tuple[float, float] = (2.0, 900.0)

    def resolved_end(self) -> datetime:
        if self.end is None:
            now = datetime.now(timezone.utc)
            return now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.end.tzinfo is None:
            raise ValueError("end must be timezone-aware")
        return self.end.astimezone(timezone.utc)


@dataclass
class SimulationResult:
    """The generated stream (iterable, in signed-time order) plus what could not be placed."""

    orders: list[SimulatedOrder]
    population: Population
    config: SimulationConfig
    start: datetime
    end: datetime
    shortfall: dict[str, int] = field(default_factory=dict)  # requested but not placeable, by label

    def __iter__(self) -> Iterator[SimulatedOrder]:
        return iter(self.orders)

    def __len__(self) -> int:
        return len(self.orders)

    def __getitem__(self, i: int) -> SimulatedOrder:
        return self.orders[i]

    def label_counts(self) -> Counter:
        return Counter(o.label for o in self.orders)


# ----------------------------------------------------------------------------- population helpers
def _weighted(r: random.Random, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    return r.choices(keys, weights=[weights[k] for k in keys])[0]


def _allocate(n: int, mix: dict[str, float], rng: random.Random) -> list[str]:
    unknown = set(mix) - set(BUSINESS_ACTIVITIES)
    if unknown:
        raise ValueError(f"unknown business activities in mix: {sorted(unknown)}")
    kinds = [k for k in BUSINESS_ACTIVITIES if mix.get(k, 0) > 0]
    total = sum(mix[k] for k in kinds)
    exact = {k: n * mix[k] / total for k in kinds}
    counts = {k: int(exact[k]) for k in kinds}
    for k in sorted(kinds, key=lambda k: (-(exact[k] - counts[k]), kinds.index(k)))[: n - sum(counts.values())]:
        counts[k] += 1
    if n >= len(kinds):  # at least one of each kind
        for k in kinds:
            while counts[k] == 0:
                donor = max(kinds, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[k] += 1
    out = [k for k in kinds for _ in range(counts[k])]
    rng.shuffle(out)
    return out


def _dea(prefix_letter: str, name_initial: str, r: random.Random, used: set[str]) -> str:
    second = name_initial if name_initial.isalpha() else "9"
    while True:
        dea = make_dea_number(prefix_letter + second, f"{r.randrange(10 ** 6):06d}")
        if dea not in used:
            used.add(dea)
            return dea


def _make_registrant(kind: str, specialty: str, r: random.Random,
                     by_family: dict[str, list[Product]], used: set[str]) -> Registrant:
    city, state, zipcode = r.choice(_PLACES)
    address = f"{r.randint(10, 2999)} {r.choice(_STREETS)}, {city}, {state} {zipcode}"
    weekday_factors = [1.0] * 7
    weekday_factors[0] = round(1.0 + r.uniform(0.05, 0.15), 3)  # Monday: restock after the weekend
    weekday_factors[4] = round(1.0 + r.uniform(0.0, 0.10), 3)  # Friday: stock for the weekend
    common: dict[str, Any] = dict(
        noise_sigma=round(r.uniform(0.10, 0.20), 3),
        seasonal_amplitude=round(r.uniform(0.03, 0.12), 3),
        seasonal_peak_doy=r.randint(1, 365),
        weekday_factors=tuple(weekday_factors),
        restock_prob=0.04,
    )
    scale = 1.0
    if kind == "RETAIL PHARMACY":
        word = r.choice(_SURNAMES)
        name = r.choice((f"{word} DRUG", f"{word} PHARMACY", f"{word}'S APOTHECARY", f"{city} {word} PHARMACY"))
        letter = r.choices("BFA", weights=(6, 3, 1))[0]
        schedules, table = ALL_SCHEDULES, _RETAIL
        cadence = dict(mean_gap_days=round(r.uniform(2.0, 4.0), 2), gap_shape=4.0,
                       order_weekdays=(0, 1, 2, 3, 4, 5), order_hour=round(r.uniform(9, 16), 2), hour_sd=1.0)
    elif kind == "CHAIN PHARMACY":
        word = r.choice(_CHAINS)
        name = f"{word} #{r.randint(100, 9999):04d}"
        letter = r.choices("BF", weights=(8, 2))[0]
        schedules, table = ALL_SCHEDULES, _RETAIL
        days = r.choice(((0, 3), (1, 4), (0, 2, 4), (0, 2, 4), (1, 3, 5)))
        cadence = dict(mean_gap_days=round(7 / len(days), 2), gap_shape=50.0, order_weekdays=days,
                       fixed_schedule=True, order_hour=round(r.uniform(5, 8), 2), hour_sd=0.4)
        scale = r.uniform(1.5, 3.0)
    elif kind == "HOSPITAL/CLINIC":
        word = r.choice(_SURNAMES + tuple(p[0] for p in _PLACES))
        name = r.choice((f"{word} GENERAL HOSPITAL", f"{word} MEDICAL CENTER", f"{word} COMMUNITY HEALTH CENTER"))
        letter = r.choices("AB", weights=(6, 4))[0]
        schedules, table = ALL_SCHEDULES, _HOSPITAL
        cadence = dict(mean_gap_days=round(r.uniform(2.0, 4.0), 2), gap_shape=5.0,
                       order_weekdays=(0, 1, 2, 3, 4), order_hour=round(r.uniform(8, 14), 2), hour_sd=1.5)
    elif kind == "PRACTITIONER":
        word = r.choice(_SURNAMES)
        degree = "DVM" if specialty == "VETERINARY" else r.choice(("MD", "DO"))
        name = f"{r.choice(_FIRST)} {word}, {degree}"
        letter = r.choices("AFB", weights=(4, 5, 1))[0]
        p_cii, table = _PRACTITIONER[specialty]
        schedules = ALL_SCHEDULES if r.random() < p_cii else NO_CII_SCHEDULES
        cadence = dict(mean_gap_days=round(r.uniform(21, 35), 1), gap_shape=4.0,
                       order_weekdays=(0, 1, 2, 3, 4), order_hour=round(r.uniform(9, 17), 2), hour_sd=2.0)
    else:  # pragma: no cover - _allocate refuses unknown kinds
        raise ValueError(kind)
    dea = _dea(letter, word[0], r, used)
    habits = _habits(kind, table, schedules, r, by_family, cadence["mean_gap_days"], scale)
    return Registrant(dea_number=dea, name=name, address=address, state=state, business_activity=kind,
                      schedules=tuple(schedules), habits=habits, specialty=specialty, **cadence, **common)


def _forms(kind: str, family: str, override: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if override:
        return override
    if kind in ("RETAIL PHARMACY", "CHAIN PHARMACY"):
        return _PHARMACY_FORMS
    return None  # any form


def _habits(kind: str, table: Mapping[str, _Fam], schedules: Sequence[str], r: random.Random,
            by_family: dict[str, list[Product]], mean_gap: float, scale: float) -> tuple[FamilyHabit, ...]:
    habits: list[FamilyHabit] = []
    fallback: FamilyHabit | None = None
    for family, (p_has, (po_lo, po_hi), (d_lo, d_hi), forms_override) in table.items():
        forms = _forms(kind, family, forms_override)
        candidates = [p for p in by_family.get(family, ())
                      if p.schedule in schedules and (forms is None or p.dosage_form in forms)]
        has = r.random() < p_has
        p_order = round(r.uniform(po_lo, po_hi), 3)
        demand = math.exp(r.uniform(math.log(d_lo), math.log(d_hi))) * scale
        if not candidates:
            continue
        mean_units = demand * mean_gap
        # Integer packages make small lines jumpy (1 -> 2 packages is a doubling), so prefer
        # package sizes giving >= 2 packages per order, and keep every line at >= 1.5 packages
        # on average: a registrant's normal orders then vary smoothly around their habit.
        roomy = [p for p in candidates if mean_units / p.units_per_package >= 2.0]
        if roomy:
            candidates = roomy
        else:
            smallest = min(p.units_per_package for p in candidates)
            candidates = [p for p in candidates if p.units_per_package == smallest]
            mean_units = max(mean_units, 1.5 * smallest)
        n_items = 1 if len(candidates) == 1 or r.random() < 0.5 else 2
        items = r.sample(candidates, n_items)
        if n_items == 2:
            s = r.uniform(0.55, 0.8)
            shares = [s, 1.0 - s]
            # Drop an item that would get less than ~1.5 packages: keep the habit stable.
            keep = [(p, sh) for p, sh in zip(items, shares) if mean_units * sh / p.units_per_package >= 1.5]
            if len(keep) < 2:
                best = keep[0][0] if keep else min(items, key=lambda p: p.units_per_package)
                items, shares = [best], [1.0]
        else:
            shares = [1.0]
        habit = FamilyHabit(family, tuple((p.ndc, round(sh, 3)) for p, sh in zip(items, shares)),
                            round(mean_units, 1), p_order)
        if fallback is None:
            fallback = FamilyHabit(habit.family, habit.items, habit.mean_units, max(p_order, 0.9))
        if has:
            habits.append(habit)
    if not habits:
        if fallback is None:
            raise ValueError("the product master has no products for this registrant's schedules")
        habits.append(fallback)
    return tuple(habits)


# ----------------------------------------------------------------------------- order generation
@dataclass
class Draft:
    """An order before it is numbered and signed: who, when, which lines, and what the generator made of it.

    The one draft both generators build on (this module's stream and the labelled
    scenarios of ``streams/tools/scenarios.py``): the same normal timelines, then each
    injects its episodes by changing drafts or adding some.
    """

    registrant: Registrant
    signed_at: datetime
    lines: list[tuple[Product, int]]
    label: str = NORMAL
    detail: dict[str, Any] = field(default_factory=dict)
    purchaser_dea: str | None = None  # document purchaser, when not the registrant's (dea_mismatch)
    kind: str = NORMAL  # the episode kind (labelled scenarios)
    episode: str | None = None  # the episode id (labelled scenarios)

    @property
    def families(self) -> set[str]:
        return {p.drug_family for p, _ in self.lines}


def habit_lines(habit: FamilyHabit, units: float, products: ProductMaster) -> list[tuple[Product, int]]:
    """``units`` dosage units of a family split over the habit's products (whole packages, at least one each)."""
    out = []
    for ndc, share in habit.items:
        p = products.get(ndc)
        assert p is not None, ndc
        out.append((p, max(1, round(units * share / p.units_per_package))))
    return out


def _typical_packages(habit: FamilyHabit, products: ProductMaster) -> list[tuple[Product, int]]:
    return habit_lines(habit, habit.mean_units, products)


def _normal_lines(reg: Registrant, t: datetime, r: random.Random, products: ProductMaster,
                  *, all_families: bool = False) -> list[tuple[Product, int]]:
    m = reg.modulation(t)
    chosen = [h for h in reg.habits if r.random() < h.p_order or all_families]
    if not chosen:
        chosen = [max(reg.habits, key=lambda h: h.p_order)]
    restock = r.uniform(1.5, 2.0) if r.random() < reg.restock_prob else 1.0
    lines = []
    for h in chosen:
        lines += habit_lines(h, h.mean_units * m * restock * math.exp(r.gauss(0.0, reg.noise_sigma)), products)
    return lines


def _at_hour(day: datetime, reg: Registrant, r: random.Random) -> datetime:
    dev = max(-2.0, min(2.0, r.gauss(0.0, 1.0))) * reg.hour_sd
    hour = max(0.25, min(23.75, reg.order_hour + dev))
    seconds = int(hour * 3600) + r.randrange(60)
    return day + timedelta(seconds=seconds)


def _order_days(reg: Registrant, start: datetime, end: datetime, r: random.Random) -> list[datetime]:
    """Midnights (UTC) of the registrant's normal order days in [start, end)."""
    first = start.replace(hour=0, minute=0, second=0, microsecond=0)
    days: list[datetime] = []
    if reg.fixed_schedule:
        d = first
        while d < end:
            if d.weekday() in reg.order_weekdays and r.random() >= 0.03:  # 3 %: skipped (holiday, closure)
                days.append(d)
            d += timedelta(days=1)
        return days
    d = first + timedelta(days=int(r.uniform(0, reg.mean_gap_days)))
    while d < end:
        while d.weekday() not in reg.order_weekdays:
            d += timedelta(days=1)
        if d >= end:
            break
        days.append(d)
        gap = max(1, round(r.gammavariate(reg.gap_shape, reg.mean_gap_days / reg.gap_shape)))
        d += timedelta(days=gap)
    return days


def normal_timeline(reg: Registrant, start: datetime, end: datetime, r: random.Random,
                    products: ProductMaster) -> list[Draft]:
    """The registrant's normal orders signed in [start, end), in time order, drawn from ``r``."""
    drafts: list[Draft] = []
    for day in _order_days(reg, start, end, r):
        t = _at_hour(day, reg, r)
        if start <= t < end:
            # The first order of the period stocks every family the registrant carries, so a
            # rarely ordered family never shows up later as "new" to the monitor.
            drafts.append(Draft(reg, t, _normal_lines(reg, t, r, products, all_families=not drafts)))
    return drafts


def _distribute(total: int, kinds: Sequence[str], r: random.Random) -> dict[str, int]:
    kinds = list(kinds)
    if not kinds:
        return {}
    base, rem = divmod(total, len(kinds))
    order = kinds[:]
    r.shuffle(order)
    return {k: base + (1 if order.index(k) < rem else 0) for k in kinds}


def generate_orders(population: Population, config: SimulationConfig | None = None,
                    **overrides: Any) -> SimulationResult:
    """Generate the whole stream in signed-time order (see the module docstring).

    ``overrides`` are :class:`SimulationConfig` fields, e.g. ``days=60, end=...``.
    """
    cfg = config or SimulationConfig()
    if overrides:
        cfg = SimulationConfig(**{**cfg.__dict__, **overrides})
    _check_config(cfg)
    products = population.products
    seed = population.seed if cfg.seed is None else cfg.seed
    end = cfg.resolved_end()
    start = end - timedelta(days=cfg.days)

    # 1. normal timelines, one RNG stream per registrant
    timelines = [normal_timeline(reg, start, end, random.Random(f"orders:{seed}:{reg.dea_number}"), products)
                 for reg in population.registrants]
    n_normal = sum(len(t) for t in timelines)

    rng = random.Random(f"inject:{seed}")
    denom = max(1e-9, 1.0 - cfg.bad_fraction - cfg.suspicious_fraction)
    if cfg.suspicious_counts is not None:
        susp = {k: int(v) for k, v in cfg.suspicious_counts.items() if v}
    else:
        susp = _distribute(round(n_normal * cfg.suspicious_fraction / denom), cfg.suspicious_kinds, rng)
    if cfg.bad_counts is not None:
        bad = {k: int(v) for k, v in cfg.bad_counts.items() if v}
    else:
        bad = _distribute(round(n_normal * cfg.bad_fraction / denom), cfg.bad_kinds, rng)

    shortfall: dict[str, int] = {}
    extras = _inject_suspicious(population, timelines, susp, cfg, start, end, rng, shortfall)
    extras += _make_bad(population, timelines, bad, start, end, rng, shortfall)

    drafts = [d for tl in timelines for d in tl] + extras
    drafts.sort(key=lambda d: (d.signed_at, d.registrant.dea_number, d.label))
    orders = _finalize(drafts, population, cfg, seed)
    if shortfall:
        log.warning("simulator could not place %s (not enough eligible registrants/history)", shortfall)
    return SimulationResult(orders, population, cfg, start, end, shortfall)


def iter_orders(population: Population, config: SimulationConfig | None = None,
                **overrides: Any) -> Iterator[SimulatedOrder]:
    """Yield the simulated orders in signed-time order."""
    yield from generate_orders(population, config, **overrides).orders


def _check_config(cfg: SimulationConfig) -> None:
    if cfg.days <= 0:
        raise ValueError("days must be positive")
    if cfg.bad_fraction < 0 or cfg.suspicious_fraction < 0 or cfg.bad_fraction + cfg.suspicious_fraction >= 1:
        raise ValueError("bad_fraction and suspicious_fraction must be >= 0 and sum to less than 1")
    for counts, kinds, what in ((cfg.bad_counts, BAD_KINDS, "bad"), (cfg.suspicious_counts, SUSPICIOUS_KINDS,
                                                                     "suspicious")):
        unknown = set(counts or ()) - set(kinds)
        if unknown:
            raise ValueError(f"unknown {what} kinds {sorted(unknown)}; expected some of {list(kinds)}")
    for kinds, allowed in ((cfg.bad_kinds, BAD_KINDS), (cfg.suspicious_kinds, SUSPICIOUS_KINDS)):
        if set(kinds) - set(allowed):
            raise ValueError(f"unknown kinds {sorted(set(kinds) - set(allowed))}")
    if not 0 <= cfg.inject_after < 1:
        raise ValueError("inject_after must be in [0, 1)")


def _inject_suspicious(population: Population, timelines: list[list[Draft]], counts: Mapping[str, int],
                       cfg: SimulationConfig, start: datetime, end: datetime, rng: random.Random,
                       shortfall: dict[str, int]) -> list[Draft]:
    """Convert some late normal orders into spikes/shifts and add bursts after others."""
    products = population.products
    late = start + timedelta(days=cfg.days * cfg.inject_after)
    margin = max(0, cfg.max_events_per_registrant - 1)  # other events of the registrant may precede
    need = cfg.min_history + margin
    by_family: dict[str, list[Product]] = {}
    for p in products:
        by_family.setdefault(p.drug_family, []).append(p)

    # history counts on the untouched timelines
    fam_before: list[list[Counter]] = []
    for tl in timelines:
        running: Counter = Counter()
        rows = []
        for d in tl:
            rows.append(running.copy())
            running.update(d.families)
        fam_before.append(rows)

    def shift_targets(reg: Registrant) -> list[str]:
        return [f for f in SHIFT_FAMILIES if f not in reg.families and "2" in reg.schedules
                and any(p.schedule in reg.schedules for p in by_family.get(f, ()))]

    cands: dict[str, list[tuple[int, int]]] = {k: [] for k in SUSPICIOUS_KINDS}
    for ri, tl in enumerate(timelines):
        reg = population.registrants[ri]
        targets = shift_targets(reg)
        for i, d in enumerate(tl):
            if d.signed_at < late or i < need:
                continue
            if any(fam_before[ri][i][f] >= need for f in reg.families):
                cands["size_spike"].append((ri, i))
            if targets:
                cands["family_shift"].append((ri, i))
            cands["frequency_burst"].append((ri, i))
    for k in cands:
        rng.shuffle(cands[k])
    cursor = {k: 0 for k in cands}
    events: dict[int, list[int]] = {}  # registrant index -> timeline indexes used
    extras: list[Draft] = []

    def free(ri: int, i: int) -> bool:
        used = events.get(ri, [])
        return len(used) < cfg.max_events_per_registrant and all(abs(i - j) >= 4 for j in used)

    # plan: (kind, orders in the event)
    plan: list[tuple[str, int]] = []
    for kind in SUSPICIOUS_KINDS:
        n = counts.get(kind, 0)
        if kind == "frequency_burst":
            while n > 0:
                size = min(n, rng.randint(*cfg.burst_size))
                if 0 < n - size < 2:  # avoid a trailing burst of one order
                    size = n if n <= cfg.burst_size[1] else size - 1
                plan.append((kind, size))
                n -= size
        else:
            plan.extend((kind, 1) for _ in range(n))
    rng.shuffle(plan)

    for kind, size in plan:
        placed = False
        lst = cands[kind]
        while cursor[kind] < len(lst):
            ri, i = lst[cursor[kind]]
            cursor[kind] += 1
            if not free(ri, i):
                continue
            tl = timelines[ri]
            d = tl[i]
            reg = d.registrant
            if kind == "size_spike":
                fams = [f for f in reg.families if fam_before[ri][i][f] >= need]
                fams_on = [f for f in fams if f in d.families]
                family = rng.choice(fams_on or fams)
                factor = rng.uniform(*cfg.spike_factor)
                habit = reg.habit(family)
                assert habit is not None
                spiked = [(p, max(1, round(pk * factor))) for p, pk in _typical_packages(habit, products)]
                d.lines = [(p, pk) for p, pk in d.lines if p.drug_family != family] + spiked
                d.label = "size_spike"
                usual = sum(p.units_per_package * pk for p, pk in _typical_packages(habit, products))
                d.detail = {"family": family, "factor": round(factor, 2), "usual_units": usual,
                            "units": sum(p.units_per_package * pk for p, pk in spiked),
                            "history": fam_before[ri][i][family]}
            elif kind == "family_shift":
                family = rng.choice(shift_targets(reg))
                options = [p for p in by_family[family]
                           if p.schedule in reg.schedules and p.dosage_form in ("TAB", "PATCH")]
                options = options or [p for p in by_family[family] if p.schedule in reg.schedules]
                prod = max(options, key=lambda p: (p.base_mg_per_unit * p.mme_factor, p.ndc))
                packages = rng.randint(20, 60) if prod.dosage_form == "PATCH" else rng.randint(10, 30)
                d.lines = list(d.lines) + [(prod, packages)]
                d.label = "family_shift"
                d.detail = {"family": family, "ndc": prod.ndc, "units": prod.units_per_package * packages,
                            "mme": round(prod.mme(prod.units_per_package * packages), 1), "history": i}
            else:  # frequency_burst
                gaps = [rng.uniform(*cfg.burst_gap_hours) for _ in range(size)]
                times, t = [], d.signed_at
                for g in gaps:
                    t = t + timedelta(hours=g, seconds=rng.randrange(60))
                    times.append(t)
                limit = tl[i + 1].signed_at - timedelta(hours=24) if i + 1 < len(tl) else end
                if times[-1] >= min(limit, end):
                    continue
                burst_id = f"burst-{reg.dea_number}-{i}"
                r2 = random.Random(f"burst:{rng.random()}")
                for n_in, t in enumerate(times, start=1):
                    extras.append(Draft(reg, t, _normal_lines(reg, t, r2, products), "frequency_burst",
                                         {"burst": burst_id, "position": n_in, "burst_size": size,
                                          "after_normal_at": d.signed_at.isoformat(), "history": i}))
            events.setdefault(ri, []).append(i)
            placed = True
            break
        if not placed:
            shortfall[kind] = shortfall.get(kind, 0) + size
    return extras


def _make_bad(population: Population, timelines: list[list[Draft]], counts: Mapping[str, int],
              start: datetime, end: datetime, rng: random.Random, shortfall: dict[str, int]) -> list[Draft]:
    """Extra orders, each to receive one defect at signing time."""
    products = population.products
    regs = population.registrants
    weights = [max(1, len(tl)) for tl in timelines]
    no_cii = [i for i, reg in enumerate(regs) if "2" not in reg.schedules]
    cii_products = sorted((p for p in products if p.schedule == "2" and p.dosage_form in ("TAB", "CAP")),
                          key=lambda p: p.ndc)
    extras: list[Draft] = []
    for kind in BAD_KINDS:
        for _ in range(counts.get(kind, 0)):
            if kind == "schedule_not_authorized":
                if not no_cii or not cii_products:
                    shortfall[kind] = shortfall.get(kind, 0) + 1
                    continue
                ri = rng.choices(no_cii, weights=[weights[i] for i in no_cii])[0]
            else:
                ri = rng.choices(range(len(regs)), weights=weights)[0]
            reg = regs[ri]
            r = random.Random(f"bad:{rng.random()}")
            t = None
            for _attempt in range(20):
                day = (start + timedelta(days=r.randrange(max(1, (end - start).days)))).replace(
                    hour=0, minute=0, second=0, microsecond=0)
                cand = _at_hour(day, reg, r)
                if day.weekday() in reg.order_weekdays and start <= cand < end:
                    t = cand
                    break
            if t is None:
                t = start + (end - start) * r.random()
            d = Draft(reg, t, _normal_lines(reg, t, r, products), kind)
            if kind == "schedule_not_authorized":
                p = r.choice(cii_products)
                d.lines.append((p, r.randint(1, 3)))
                d.detail = {"ndc": p.ndc, "schedule": p.schedule, "authorized": list(reg.schedules)}
            elif kind == "dea_mismatch":
                others = [o.dea_number for o in regs if o.dea_number != reg.dea_number]
                other = r.choice(others) if others else _fresh_dea(r, {reg.dea_number})
                d.purchaser_dea = other
                d.detail = {"document_dea": other, "certificate_dea": reg.dea_number}
            elif kind == "malformed_order":
                d.detail = {"defect": r.choice(("supplier.dea_number", "lines", "signed_at"))}
            elif kind == "tampered":
                d.detail = {"altered": "packages"}
            extras.append(d)
    return extras


def _fresh_dea(r: random.Random, avoid: set[str]) -> str:
    while True:
        dea = make_dea_number("BZ", f"{r.randrange(10 ** 6):06d}")
        if dea not in avoid:
            return dea


def _finalize(drafts: list[Draft], population: Population, cfg: SimulationConfig,
              seed: int) -> list[SimulatedOrder]:
    r = random.Random(f"finalize:{seed}")
    counters: dict[str, int] = {}
    recent: dict[str, list[datetime]] = {}  # non-bad order times per registrant
    orders = []
    for seq, d in enumerate(drafts):
        reg = d.registrant
        if d.label not in BAD_KINDS:
            times = recent.setdefault(reg.dea_number, [])
            times.append(d.signed_at)
            if d.label == "frequency_burst":
                # How unusual the burst is by this order: the registrant's orders in the last 24 h.
                d.detail["orders_in_24h"] = sum(1 for x in times if d.signed_at - x < timedelta(hours=24))
        purchaser_dea = d.purchaser_dea or reg.dea_number
        if purchaser_dea not in counters:
            counters[purchaser_dea] = random.Random(f"numbers:{seed}:{purchaser_dea}").randint(1, 400)
        counters[purchaser_dea] += 1
        number = f"{d.signed_at.year % 100:02d}X{counters[purchaser_dea]:06d}"
        lines = tuple(OrderLine(line_no=k, ndc=p.ndc, product_name=p.product_name, strength=p.strength,
                                package_quantity=p.units_per_package, packages=pk)
                      for k, (p, pk) in enumerate(d.lines, start=1))
        order = Order(number, Party(purchaser_dea, reg.name, reg.address), population.supplier,
                      d.signed_at.replace(microsecond=0), lines)
        sim_id = str(uuid.UUID(int=r.getrandbits(128), version=4))
        delay = r.uniform(*cfg.receipt_delay_seconds)
        orders.append(SimulatedOrder(seq, sim_id, order, d.label, EXPECTED_OUTCOME[d.label], reg,
                                     d.signed_at + timedelta(seconds=delay), dict(d.detail)))
    return orders


# ----------------------------------------------------------------------------- labels file
LABEL_COLUMNS = ("seq", "order_id", "order_number", "purchaser_dea", "signer_dea", "business_activity",
                 "signed_at", "received_at", "label", "expected_outcome", "detail")


def label_row(o: SimulatedOrder) -> dict[str, Any]:
    return {
        "seq": o.seq, "order_id": o.sim_id, "order_number": o.order_number,
        "purchaser_dea": o.claimed_purchaser_dea, "signer_dea": o.registrant.dea_number,
        "business_activity": o.registrant.business_activity,
        "signed_at": o.signed_at.isoformat(), "received_at": o.received_at.isoformat(),
        "label": o.label, "expected_outcome": o.expected_outcome, "detail": dict(o.detail),
    }


def write_labels(path: str | Path, orders: Iterable[SimulatedOrder]) -> Path:
    """Write ground truth as CSV (``.csv``; detail JSON-encoded) or JSON Lines (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [label_row(o) for o in orders]
    if path.suffix.lower() == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS)
            w.writeheader()
            for row in rows:
                w.writerow(dict(row, detail=json.dumps(row["detail"], sort_keys=True)))
    else:
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def read_labels(path: str | Path) -> list[dict[str, Any]]:
    """Read back :func:`write_labels` output (either format)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            row["seq"] = int(row["seq"])
            row["detail"] = json.loads(row["detail"]) if row.get("detail") else {}
        return rows
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------- signing
class MalformedBytes(bytes):
    """Marker: not an order at all. Publish these bytes raw (not Avro-encoded) to test the DLQ."""


def is_malformed(signature: bytes) -> bool:
    return isinstance(signature, MalformedBytes)


def _cms_sign(document: bytes, cred: Any, *, signing_time: datetime, detached: bool, hash: Any,
              key: Any = None) -> bytes:
    """The one place the simulator calls the CMS signer."""
    from streams.domain.cms import sign_order
    kwargs: dict[str, Any] = {"signing_time": signing_time, "detached": detached,
                              "intermediates": tuple(cred.chain)}
    if hash is not None:
        kwargs["hash"] = hash
    return sign_order(document, cred.cert, key if key is not None else cred.key, **kwargs)


def _tamper(document: bytes) -> bytes:
    """Change one digit of the first ``packages`` quantity (same length, so DER stays well-formed)."""
    marker = b'"packages":'
    i = document.find(marker)
    if i < 0:
        raise ValueError("document has no packages element to tamper with")
    j = i + len(marker)
    digit = document[j] - 48
    new = (digit + 5) % 10 or 7  # never 0: a leading zero would be unreadable JSON, not "tampered"
    return document[:j] + bytes([48 + new]) + document[j + 1:]


def _malformed_document(order: Order, defect: str) -> bytes:
    doc = json.loads(encode_order(order))
    if defect == "supplier.dea_number":
        doc["supplier"].pop("dea_number", None)
    elif defect == "lines":
        doc["lines"] = []
    elif defect == "signed_at":
        doc.pop("signed_at", None)
    else:
        raise ValueError(f"unknown defect {defect!r}")
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _malformed_payload(sim_id: str) -> MalformedBytes:
    r = random.Random(f"malformed:{sim_id}")
    data = bytearray(r.randbytes(r.randint(24, 400)))
    if data[:2] == b"\xc3\x01":  # never a valid Avro single-object header
        data[0] = 0x7B
    return MalformedBytes(bytes(data))


class SigningKit:
    """Certificates for a population, cached, on a ``streams.tools.pki.TestPKI``.

    * one certificate per registrant (``pki.issue_registrant``, recorded in
      ``pki.registrants`` so ``pki.write_pki`` saves it), valid ``validity``
      around the first order it signs (default 400 days either side);
    * bad-kind material: an expired certificate (notAfter 2 days before the
      order's signing date), a revoked one (revoked 2 days before signing, on
      the next CRL), one from a look-alike rogue CA (same names, own root) and
      an impostor key for ``wrong_key``. Special certificates reuse the
      registrant's key (fast; the verifier judges certificates, not keys).

    ``key_pool=N`` draws registrant keys from N shared keys (fast for big
    populations; N=None gives every registrant its own key).
    Call :meth:`prepare` with the whole stream before publishing so the CRL
    already lists every revoked certificate.
    """

    def __init__(self, pki: Any, *, key_type: str = "rsa", key_pool: int | None = None,
                 validity: timedelta = timedelta(days=400), hash: Any = None) -> None:
        self.pki = pki
        self.key_type = key_type
        self.key_pool = key_pool
        self.validity = validity
        self.hash = hash
        self._primary: dict[str, Any] = {}
        self._expired: dict[str, Any] = {}
        self._revoked: dict[str, tuple[Any, datetime]] = {}
        self._rogue: dict[str, Any] = {}
        self._rogue_ca: Any = None
        self._impostor: Any = None

    # -- keys
    def _key(self, reg: Registrant) -> Any:
        if not self.key_pool:
            return None
        from streams.tools.pki import pooled_key
        return pooled_key(self.key_type, slot=("simulator-pool", int(reg.dea_number[2:8]) % self.key_pool))

    def impostor_key(self) -> Any:
        if self._impostor is None:
            from streams.tools.pki import generate_key
            self._impostor = generate_key(self.key_type)
        return self._impostor

    # -- certificates
    def credential(self, reg: Registrant, at: datetime | None = None) -> Any:
        """The registrant's own certificate (issued on first use, or reused from ``pki.registrants``)."""
        cred = self._primary.get(reg.dea_number)
        if cred is not None:
            return cred
        at = at or datetime.now(timezone.utc)
        existing = self.pki.registrants.get(reg.dea_number)
        if existing is not None and self._fits(existing, reg, at):
            cred = existing
        else:
            cred = self.pki.issue_registrant(reg.dea_number, reg.name, reg.schedules,
                                             not_before=at - self.validity, not_after=at + self.validity,
                                             key_type=self.key_type, key=self._key(reg))
        self._primary[reg.dea_number] = cred
        return cred

    def _fits(self, cred: Any, reg: Registrant, at: datetime) -> bool:
        from streams.domain.cert_profile import read_registration
        try:
            dea, schedules = read_registration(cred.cert, self.pki.oids)
        except ValueError:
            return False
        nb, na = cred.cert.not_valid_before_utc, cred.cert.not_valid_after_utc
        return (dea == reg.dea_number and schedules == frozenset(reg.schedules)
                and nb <= at - timedelta(days=30) and na >= at + timedelta(days=180))

    def expired_credential(self, reg: Registrant, signed_at: datetime) -> Any:
        cred = self._expired.get(reg.dea_number)
        if cred is None or cred.cert.not_valid_after_utc >= signed_at:
            own = self.credential(reg, signed_at)
            cred = self.pki.issue_registrant(reg.dea_number, reg.name, reg.schedules,
                                             not_before=signed_at - timedelta(days=400),
                                             not_after=signed_at - timedelta(days=2),
                                             key_type=self.key_type, key=own.key, record=False)
            self._expired[reg.dea_number] = cred
        return cred

    def revoked_credential(self, reg: Registrant, signed_at: datetime) -> Any:
        entry = self._revoked.get(reg.dea_number)
        if entry is None or entry[1] >= signed_at - timedelta(hours=1):
            own = self.credential(reg, signed_at)
            cred = self.pki.issue_registrant(reg.dea_number, reg.name, reg.schedules,
                                             not_before=signed_at - self.validity,
                                             not_after=signed_at + self.validity,
                                             key_type=self.key_type, key=own.key, record=False)
            when = signed_at - timedelta(days=2)
            self.pki.revoke(cred.serial, when)
            entry = (cred, when)
            self._revoked[reg.dea_number] = entry
        return entry[0]

    def rogue_credential(self, reg: Registrant, signed_at: datetime) -> Any:
        cred = self._rogue.get(reg.dea_number)
        if cred is None:
            own = self.credential(reg, signed_at)
            if self._rogue_ca is None:
                self._rogue_ca = _rogue_ca(self.pki, self.key_type, signed_at)
            cred = self.pki.issue_registrant(reg.dea_number, reg.name, reg.schedules,
                                             not_before=signed_at - self.validity,
                                             not_after=signed_at + self.validity,
                                             key_type=self.key_type, key=own.key,
                                             issuer=self._rogue_ca, record=False)
            self._rogue[reg.dea_number] = cred
        return cred

    def prepare(self, orders: Iterable[SimulatedOrder], *, build_crl: bool = True,
                crl_this_update: datetime | None = None, crl_next_update: datetime | None = None) -> "SigningKit":
        """Issue every certificate the stream needs (chronologically) and rebuild the CRL.

        The CRL is issued now (thisUpdate = now - 5 min) and, unless told
        otherwise, stays current until 7 days after the later of now and the
        last simulated receipt, so the verifier can judge every simulated
        receipt time against it. Reload it into a running verifier afterwards
        (``pki.write_pki`` writes it to ``crl/``).
        """
        orders = list(orders)
        for o in sorted(orders, key=lambda o: o.signed_at):
            self.credential(o.registrant, o.signed_at)
            if o.label == "expired_cert":
                self.expired_credential(o.registrant, o.signed_at)
            elif o.label == "revoked_cert":
                self.revoked_credential(o.registrant, o.signed_at)
            elif o.label == "untrusted_cert":
                self.rogue_credential(o.registrant, o.signed_at)
        if build_crl:
            now = datetime.now(timezone.utc).replace(microsecond=0)
            this_update = crl_this_update or now - timedelta(minutes=5)
            last = max((o.received_at for o in orders), default=now)
            next_update = crl_next_update or max(now, last) + timedelta(days=7)
            self.pki.build_crl(this_update, next_update)
        return self

    # -- signing
    def sign(self, sim: SimulatedOrder, *, detached: bool = False,
             hash: Any = None, encode: Callable[[Order], bytes] = encode_order) -> tuple[bytes | None, bytes]:
        """Wire bytes ``(document or None, signature)`` with the order's defect applied.

        Attached (default): the document travels inside the CMS and the first
        element is None. ``malformed_bytes`` returns ``(None, MalformedBytes)``.
        ``encode`` writes the document (canonical JSON by default; e.g. X12 850).
        The tampered and malformed-order defects are applied to canonical JSON.
        """
        if sim.label == "malformed_bytes":
            return None, _malformed_payload(sim.sim_id)
        hash = hash if hash is not None else self.hash
        reg, t = sim.registrant, sim.signed_at
        if sim.label == "malformed_order":
            document = _malformed_document(sim.order, sim.detail.get("defect", "supplier.dea_number"))
        elif sim.label == "tampered":
            document = encode_order(sim.order)
        else:
            document = encode(sim.order)
        cred = self.credential(reg, t)
        key = None
        if sim.label == "expired_cert":
            cred = self.expired_credential(reg, t)
        elif sim.label == "revoked_cert":
            cred = self.revoked_credential(reg, t)
        elif sim.label == "untrusted_cert":
            cred = self.rogue_credential(reg, t)
        elif sim.label == "wrong_key":
            key = self.impostor_key()
        signature = _cms_sign(document, cred, signing_time=t, detached=detached, hash=hash, key=key)
        if sim.label == "tampered":
            altered = _tamper(document)
            if detached:
                document = altered
            else:
                assert signature.count(document) == 1
                signature = signature.replace(document, altered, 1)
        return (document if detached else None), signature


def _rogue_ca(pki: Any, key_type: str, at: datetime) -> Any:
    """A look-alike CA: self-signed root and sub-CA with the real ones' names, not trusted."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from streams.tools.pki import Credential, generate_key

    def ca(subject: x509.Name, key: Any, issuer_name: x509.Name, signer: Any, pathlen: int | None) -> Any:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(at - timedelta(days=730)).not_valid_after(at + timedelta(days=1825))
                .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(signer, hashes.SHA256()))

    root_key, sub_key = generate_key(key_type), generate_key(key_type)
    root = ca(pki.root.cert.subject, root_key, pki.root.cert.subject, root_key, None)
    sub = ca(pki.sub_ca.cert.subject, sub_key, root.subject, root_key, 0)
    return Credential(sub, sub_key, (sub, root))


_KITS: "weakref.WeakKeyDictionary[Any, SigningKit]" = weakref.WeakKeyDictionary()


def signing_kit(pki: Any, **kwargs: Any) -> SigningKit:
    """The cached :class:`SigningKit` of ``pki`` (created with ``kwargs`` on first use)."""
    kit = _KITS.get(pki)
    if kit is None:
        kit = _KITS[pki] = SigningKit(pki, **kwargs)
    return kit


def sign_simulated(sim_order: SimulatedOrder, pki: Any, *, detached: bool = False, hash: Any = None,
                   kit: SigningKit | None = None) -> tuple[bytes | None, bytes]:
    """Wire bytes for one simulated order: ``(document | None, signature)``.

    ``pki`` is a ``streams.tools.pki.TestPKI`` (its cached :class:`SigningKit`
    is used unless ``kit`` is given). For ``malformed_bytes`` the signature is
    a :class:`MalformedBytes` marker holding random non-Avro bytes: publish it
    raw (``OrderIntake.submit_raw``).
    """
    kit = kit or signing_kit(pki)
    return kit.sign(sim_order, detached=detached, hash=hash)


__all__ = [
    "BAD_KINDS", "BUSINESS_ACTIVITIES", "EXPECTED_OUTCOME", "FamilyHabit", "LABELS", "LABEL_COLUMNS",
    "MalformedBytes", "NORMAL", "Population", "Registrant", "SUPPLIER", "SUSPICIOUS_KINDS", "SigningKit",
    "SimulatedOrder", "SimulationConfig", "SimulationResult", "default_product_master", "generate_orders",
    "is_malformed", "iter_orders", "read_labels", "sign_simulated", "signing_kit", "write_labels",
]

"""The product master: NDC -> schedule, drug family, dosage units and strength.

Verification needs the schedule of every line (1311.55(c)(9)); monitoring needs
dosage units, base weight and MME to compare orders across package sizes. The
master is a CSV file so a distributor can load its own item master.
"""
from __future__ import annotations

import csv
import fnmatch
import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from streams.domain.identifiers import normalize_ndc

#: Columns of the product master CSV, in order.
COLUMNS = (
    "ndc", "product_name", "strength", "drug_family", "schedule",
    "dosage_form", "units_per_package", "base_mg_per_unit", "mme_factor",
)
SCHEDULES = ("1", "2", "2N", "3", "3N", "4", "5")
#: Columns of the schedule-change table (``schedule_changes.csv`` next to the product master).
CHANGE_COLUMNS = ("ndc", "drug_family", "product_pattern", "from", "to", "schedule", "note")
#: File name of the schedule-change table, looked up next to the product master CSV.
CHANGES_FILE = "schedule_changes.csv"


@dataclass(frozen=True)
class Product:
    ndc: str  # 11-digit 5-4-2
    product_name: str
    strength: str
    drug_family: str  # e.g. OXYCODONE
    schedule: str  # one of SCHEDULES
    dosage_form: str  # TAB, CAP, SOL, ...
    units_per_package: int
    base_mg_per_unit: float  # mg of base drug per dosage unit
    mme_factor: float  # CDC MME conversion factor, 0 for non-opioids

    def base_weight_g(self, dosage_units: int) -> float:
        return dosage_units * self.base_mg_per_unit / 1000.0

    def mme(self, dosage_units: int) -> float:
        return dosage_units * self.base_mg_per_unit * self.mme_factor


def _day(at: date | datetime) -> date:
    return at.date() if isinstance(at, datetime) else at


@dataclass(frozen=True)
class ScheduleChange:
    """A schedule that applied to matching products for a period: ``from`` <= date < ``to``.

    Why a table and not a column: a product's schedule is a fact *of a date*
    (DEA reschedules products: hydrocodone combination products were schedule
    III until 2014-10-06, then II), and the master keeps the current one.
    Replaying history (ARCOS) or verifying an order signed before a change must
    use the schedule in force on that day. A rule matches a product when every
    non-empty criterion matches: ``ndc`` (glob on the 11-digit 5-4-2 NDC),
    ``drug_family`` (exact), ``product_pattern`` (case-insensitive regular
    expression searched in the product name).
    """

    schedule: str
    start: date | None = None  # inclusive; None = since always
    end: date | None = None  # exclusive; None = still in force
    ndc: str = ""
    drug_family: str = ""
    product_pattern: str = ""
    note: str = ""

    def matches(self, ndc: str, family: str, product_name: str, on: date) -> bool:
        if (self.start and on < self.start) or (self.end and on >= self.end):
            return False
        if self.ndc and not fnmatch.fnmatch(ndc, self.ndc):
            return False
        if self.drug_family and family.strip().upper() != self.drug_family:
            return False
        return not self.product_pattern or re.search(self.product_pattern, product_name, re.I) is not None


def load_schedule_changes(path: str | Path) -> list[ScheduleChange]:
    """Read a ``schedule_changes.csv`` (columns :data:`CHANGE_COLUMNS`; dates ISO ``YYYY-MM-DD``)."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = set(CHANGE_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: schedule changes lack columns {sorted(missing)}")
        for n, row in enumerate(reader, start=2):
            schedule = row["schedule"].strip().upper()
            if schedule not in SCHEDULES:
                raise ValueError(f"{path} line {n}: unknown schedule {schedule!r}")
            if row["product_pattern"].strip():
                re.compile(row["product_pattern"].strip())  # fail at load, not on the first order
            out.append(ScheduleChange(
                schedule=schedule,
                start=date.fromisoformat(row["from"].strip()) if row["from"].strip() else None,
                end=date.fromisoformat(row["to"].strip()) if row["to"].strip() else None,
                ndc=row["ndc"].strip(), drug_family=row["drug_family"].strip().upper(),
                product_pattern=row["product_pattern"].strip(), note=row["note"].strip()))
    return out


def save_schedule_changes(changes: list[ScheduleChange], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CHANGE_COLUMNS)
        for c in changes:
            w.writerow([c.ndc, c.drug_family, c.product_pattern, c.start.isoformat() if c.start else "",
                        c.end.isoformat() if c.end else "", c.schedule, c.note])


def schedule_on(changes: list[ScheduleChange], ndc: str, family: str, product_name: str, current: str,
                at: date | datetime) -> str:
    """The schedule in force on ``at``: the first matching change, else ``current`` (the master's)."""
    on = _day(at)
    for c in changes:
        if c.matches(ndc, family, product_name, on):
            return c.schedule
    return current


class ProductMaster:
    """An in-memory NDC index loaded from CSV, with the schedule changes that apply by date."""

    def __init__(self, products: list[Product], schedule_changes: list[ScheduleChange] | None = None) -> None:
        self._by_ndc = {p.ndc: p for p in products}
        #: Dated schedule rules (:class:`ScheduleChange`); the product's ``schedule`` is the current one.
        self.schedule_changes: list[ScheduleChange] = list(schedule_changes or ())

    def __len__(self) -> int:
        return len(self._by_ndc)

    def __iter__(self):
        return iter(self._by_ndc.values())

    def get(self, ndc: str) -> Product | None:
        try:
            return self._by_ndc.get(normalize_ndc(ndc))
        except ValueError:
            return None

    def schedule(self, product: Product, at: date | datetime) -> str:
        """The product's schedule on ``at`` (an order's signing date, an ARCOS transaction date)."""
        return schedule_on(self.schedule_changes, product.ndc, product.drug_family, product.product_name,
                           product.schedule, at)

    @classmethod
    def load(cls, path: str | Path, schedule_changes: str | Path | None = None) -> "ProductMaster":
        """Load the master CSV and its schedule changes.

        ``schedule_changes`` defaults to :data:`CHANGES_FILE` in the master's
        directory when that file exists (none: every date uses the master's schedule).
        """
        changes_path = Path(schedule_changes) if schedule_changes else Path(path).parent / CHANGES_FILE
        changes = load_schedule_changes(changes_path) if schedule_changes or changes_path.exists() else []
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = set(COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: product master lacks columns {sorted(missing)}")
            products = []
            for row in reader:
                schedule = row["schedule"].strip().upper()
                if schedule not in SCHEDULES:
                    raise ValueError(f"{path}: NDC {row['ndc']} has unknown schedule {schedule!r}")
                products.append(Product(
                    ndc=normalize_ndc(row["ndc"]),
                    product_name=row["product_name"],
                    strength=row["strength"],
                    drug_family=row["drug_family"].strip().upper(),
                    schedule=schedule,
                    dosage_form=row["dosage_form"],
                    units_per_package=int(row["units_per_package"]),
                    base_mg_per_unit=float(row["base_mg_per_unit"]),
                    mme_factor=float(row["mme_factor"]),
                ))
        return cls(products, changes)

    def save(self, path: str | Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            for p in self._by_ndc.values():
                w.writerow([getattr(p, c) for c in COLUMNS])

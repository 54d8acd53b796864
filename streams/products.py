"""The product master: NDC -> schedule, drug family, dosage units and strength.

Verification needs the schedule of every line (1311.55(c)(9)); monitoring needs
dosage units, base weight and MME to compare orders across package sizes. The
master is a CSV file so a distributor can load its own item master.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .identifiers import normalize_ndc

#: Columns of the product master CSV, in order.
COLUMNS = (
    "ndc", "product_name", "strength", "drug_family", "schedule",
    "dosage_form", "units_per_package", "base_mg_per_unit", "mme_factor",
)
SCHEDULES = ("1", "2", "2N", "3", "3N", "4", "5")


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


class ProductMaster:
    """An in-memory NDC index loaded from CSV."""

    def __init__(self, products: list[Product]) -> None:
        self._by_ndc = {p.ndc: p for p in products}

    def __len__(self) -> int:
        return len(self._by_ndc)

    def __iter__(self):
        return iter(self._by_ndc.values())

    def get(self, ndc: str) -> Product | None:
        try:
            return self._by_ndc.get(normalize_ndc(ndc))
        except ValueError:
            return None

    @classmethod
    def load(cls, path: str | Path) -> "ProductMaster":
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
        return cls(products)

    def save(self, path: str | Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            for p in self._by_ndc.values():
                w.writerow([getattr(p, c) for c in COLUMNS])

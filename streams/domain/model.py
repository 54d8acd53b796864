"""The order as the pipeline understands it: the 21 CFR 1305.21(b) data elements.

Plain dataclasses with no transport concerns; the order document module turns
them into the exact bytes that are signed, and back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Party:
    """A registrant named on the order (purchaser or supplier)."""

    dea_number: str
    name: str
    address: str


@dataclass(frozen=True)
class OrderLine:
    """One item: 1305.21(b)(7)-(9): product name and strength or NDC, package size, packages."""

    line_no: int
    ndc: str
    product_name: str
    strength: str
    package_quantity: int  # dosage units in a single package
    packages: int  # number of packages ordered

    @property
    def dosage_units(self) -> int:
        return self.package_quantity * self.packages


@dataclass(frozen=True)
class Order:
    """A CSOS purchase order: what the purchaser signs."""

    order_number: str
    purchaser: Party
    supplier: Party
    signed_at: datetime  # timezone-aware UTC; the "date the order was signed"
    lines: tuple[OrderLine, ...] = field(default_factory=tuple)

"""Which products are a family's "high-strength" ones, from the product master (issue 11, strength_shift).

A shift to the strongest products of a family does not always move the
family's mg per unit much: hydrocodone combinations come in 5, 7.5 and 10 mg,
so a pharmacy whose usual mix averages 7.5 mg that moves nearly everything to
10 mg gains 1.3x in mg per unit. What does move is the share of its units in
the strongest products. A product is high-strength when its mg of base drug per
unit is at least ``fraction`` of the strongest product the master lists for the
same family and dosage form (a 40 mg tablet is not compared with a 10 mg/mL
solution). The monitor counts the units of these NDCs per order
(``order_facts``' ``high_ndcs``).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable

from streams.domain.products import Product, ProductMaster

#: The product master the pipeline verifies with (``CSOS_PRODUCTS``; the same default as ``Settings.products_path``).
DEFAULT_PRODUCTS = Path(__file__).resolve().parents[1] / "tools" / "data" / "product_master.csv"


def high_strength_ndcs(products: Iterable[Product], fraction: float) -> frozenset[str]:
    """NDCs whose strength is at least ``fraction`` x the strongest of their family and dosage form."""
    items = list(products)
    top: dict[tuple[str, str], float] = {}
    for p in items:
        key = (p.drug_family.strip().upper(), p.dosage_form)
        top[key] = max(top.get(key, 0.0), p.base_mg_per_unit)
    return frozenset(p.ndc for p in items
                     if p.base_mg_per_unit > 0
                     and p.base_mg_per_unit >= fraction * top[(p.drug_family.strip().upper(), p.dosage_form)])


@functools.lru_cache(maxsize=8)
def _load(path: str, fraction: float) -> frozenset[str]:
    return high_strength_ndcs(ProductMaster.load(path), fraction)


def default_high_strength_ndcs(fraction: float) -> frozenset[str]:
    """:func:`high_strength_ndcs` of the product master in ``CSOS_PRODUCTS`` (else the bundled one).

    Empty when there is no such file: strength_shift then judges mg per unit only.
    """
    path = os.environ.get("CSOS_PRODUCTS", "").strip() or str(DEFAULT_PRODUCTS)
    if not Path(path).is_file():
        return frozenset()
    return _load(str(Path(path).resolve()), fraction)

"""Replay ARCOS transactions (Washington Post format) as verified orders.

ARCOS records are DEA reports of *shipped* orders: they carry no CSOS
signatures. This replay therefore **skips verification explicitly**: it builds
``csos.orders.VerifiedOrder`` dicts directly (``signer_serial`` =
``ARCOS-REPLAY-UNVERIFIED``, ``signer_fingerprint`` empty) so that real order
history can be run through suspicious order monitoring, offline
(:func:`read_arcos`) or on Kafka (:func:`publish_arcos`, topic
``csos.orders.verified`` keyed by buyer DEA number, like the verifier's output).

Mapping (see ``/work/shared/data/arcos/README.md`` for the columns):

* only ``TRANSACTION_CODE == "S"`` (sales to the buyer) rows are kept;
* rows are grouped into orders by ``(BUYER_DEA_NO, ORDER_FORM_NO)``, or
  ``(BUYER_DEA_NO, TRANSACTION_DATE)`` when the order form number is empty; the
  order's time is its earliest ``TRANSACTION_DATE`` at 12:00 UTC (ARCOS has dates only);
* each row is one line: the NDC (11 digits) is looked up in the product master;
  when present, it gives product name, strength, schedule, drug family, package
  size and MME; otherwise the family comes from ``DRUG_NAME``, the schedule from
  ``DRUG_CODE`` (``2`` for the narcotic codes ARCOS reports), and MME from the ``MME``
  column. Dosage units are ARCOS's ``DOSAGE_UNIT`` (DEA's own conversion); where it
  is empty (liquids measured in ML) they are packages x the master's package size,
  and a line with no master entry and no ``DOSAGE_UNIT`` is dropped. Base weight
  is ``CALC_BASE_WT_IN_GM``;
* ``BUYER_BUS_ACT`` is the business activity.
"""
from __future__ import annotations

import csv
import gzip
import io
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from streams.products import ProductMaster

UNVERIFIED_SERIAL = "ARCOS-REPLAY-UNVERIFIED"
_NS = uuid.UUID("6f1d8f5e-3c1a-4b7e-9a52-2b1f0c9a7e11")


def _open(path: str | Path) -> io.TextIOBase:
    p = Path(path)
    with open(p, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", newline="")
    return open(p, encoding="utf-8", newline="")


def _ndc11(raw: str) -> str:
    d = "".join(ch for ch in raw if ch.isdigit())
    if len(d) < 11:
        d = d.zfill(11)
    return f"{d[:5]}-{d[5:9]}-{d[9:11]}"


def _float(raw: Any, default: float = 0.0) -> float:
    try:
        return float(raw) if raw not in (None, "") else default
    except ValueError:
        return default


def _date(raw: str) -> datetime:
    s = raw.strip().zfill(8)
    return datetime(int(s[4:8]), int(s[0:2]), int(s[2:4]), 12, 0, tzinfo=timezone.utc)


def _schedule(drug_code: str) -> str:
    # ARCOS reports schedule I/II and narcotic III substances; DEA drug codes 9xxx are narcotics.
    code = drug_code.strip().upper()
    return "2" if code[:1] == "9" else "3N" if code[:1] == "7" else "2"


def _line(no: int, row: dict[str, str], products: ProductMaster | None) -> dict[str, Any]:
    ndc = _ndc11(row.get("NDC_NO", ""))
    packages = max(1, round(_float(row.get("QUANTITY"), 1.0)))
    p = products.get(ndc) if products is not None else None
    units = round(_float(row.get("DOSAGE_UNIT")))
    if units <= 0 and p is not None:
        units = packages * p.units_per_package
    base_g = _float(row.get("CALC_BASE_WT_IN_GM"))
    if p is not None:
        return {
            "line_no": no, "ndc": p.ndc, "product_name": p.product_name, "strength": p.strength,
            "package_quantity": p.units_per_package, "packages": packages, "dosage_units": int(units),
            "schedule": p.schedule, "drug_family": p.drug_family,
            "base_weight_g": base_g if base_g > 0 else p.base_weight_g(units), "mme": p.mme(units),
        }
    return {
        "line_no": no, "ndc": ndc, "product_name": row.get("Product_Name") or row.get("DRUG_NAME", ""),
        "strength": (row.get("dos_str") or row.get("STRENGTH") or "").strip(),
        "package_quantity": max(1, round(units / packages)) if units > 0 else 1, "packages": packages,
        "dosage_units": int(units), "schedule": _schedule(row.get("DRUG_CODE", "")),
        "drug_family": (row.get("DRUG_NAME") or "UNKNOWN").strip().upper(),
        "base_weight_g": base_g, "mme": _float(row.get("MME")),
    }


def read_arcos(path: str | Path, *, product_master: ProductMaster | None = None,
               use_product_master: bool = True) -> list[dict[str, Any]]:
    """Read an ARCOS file (gzip or plain CSV) into verified-order dicts, in date order.

    ``product_master`` defaults to ``connectors/data/product_master.csv``
    (pass ``use_product_master=False`` to map from the ARCOS columns only).
    Rows with no positive dosage units are skipped.
    """
    if product_master is None and use_product_master:
        from .simulator import default_product_master
        product_master = default_product_master()
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    with _open(path) as fh:
        for row in csv.DictReader(fh):
            if (row.get("TRANSACTION_CODE") or "").strip().upper() != "S":
                continue
            if _float(row.get("DOSAGE_UNIT")) <= 0 and _float(row.get("QUANTITY")) <= 0:
                continue
            buyer = (row.get("BUYER_DEA_NO") or "").strip().upper()
            if not buyer or not (row.get("TRANSACTION_DATE") or "").strip():
                continue
            form = (row.get("ORDER_FORM_NO") or "").strip().upper()
            key = (buyer, form or "D" + row["TRANSACTION_DATE"].strip())
            groups.setdefault(key, []).append(row)
    orders = []
    for (buyer, form), rows in groups.items():
        rows.sort(key=lambda r: (_date(r["TRANSACTION_DATE"]), r.get("TRANSACTION_ID", "")))
        lines = [_line(i, r, product_master) for i, r in enumerate(rows, start=1)]
        lines = [ln for ln in lines if ln["dosage_units"] > 0]
        if not lines:
            continue
        first = rows[0]
        at = _date(first["TRANSACTION_DATE"])
        oid = str(uuid.uuid5(_NS, f"{buyer}|{form}"))
        # A deterministic offset within the day keeps same-day orders of a buyer apart and ordered.
        received = at + timedelta(seconds=int(oid.replace("-", "")[:6], 16) % 3600)
        orders.append({
            "order_id": oid, "order_number": form if not form.startswith("D") else f"ARCOS-{form[1:]}",
            "purchaser_dea": buyer, "purchaser_name": (first.get("BUYER_NAME") or "").strip(),
            "supplier_dea": (first.get("REPORTER_DEA_NO") or "").strip().upper(),
            "signed_at": received, "received_at": received, "verified_at": received,
            "signer_serial": UNVERIFIED_SERIAL, "signer_fingerprint": "",
            "business_activity": (first.get("BUYER_BUS_ACT") or "").strip() or None,
            "purchaser_state": (first.get("BUYER_STATE") or "").strip().upper() or None,  # peer region
            "lines": lines,
        })
    orders.sort(key=lambda o: (o["received_at"], o["purchaser_dea"], o["order_number"]))
    return orders


def iter_arcos(path: str | Path, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Like :func:`read_arcos`, as an iterator."""
    yield from read_arcos(path, **kwargs)


def publish_arcos(path: str | Path, publisher: Any, *, topic: str | None = None,
                  product_master: ProductMaster | None = None, flush: bool = True) -> int:
    """Publish an ARCOS file's orders to ``csos.orders.verified`` (Avro ``csos.orders.VerifiedOrder``).

    Keyed by buyer DEA number, so they reach the monitor agent exactly like the
    verifier's output. ``publisher`` is a :class:`connectors.kafka_io.Publisher`
    (anything with ``publish(topic, key, value)`` and ``flush()``). Verification
    is skipped (ARCOS has no signatures). Returns the number of orders published.
    """
    from streams.avro_codec import default_codec
    from streams.topic_names import VERIFIED
    codec = default_codec()
    topic = topic or VERIFIED
    n = 0
    for rec in read_arcos(path, product_master=product_master):
        publisher.publish(topic, rec["purchaser_dea"].encode(), codec.encode("csos.orders.VerifiedOrder", rec))
        n += 1
    if flush:
        publisher.flush()
    return n


__all__ = ["read_arcos", "iter_arcos", "publish_arcos", "UNVERIFIED_SERIAL"]

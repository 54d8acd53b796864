"""Replay ARCOS transactions (Washington Post format) as verified orders.

ARCOS records are DEA reports of *shipped* orders: they carry no CSOS
signatures. This replay therefore **skips verification explicitly**: it builds
``csos.orders.VerifiedOrder`` dicts directly (``signer_serial`` =
``ARCOS-REPLAY-UNVERIFIED``, ``signer_fingerprint`` empty) so that real order
history can be run through suspicious order monitoring, offline
(:func:`read_arcos`) or on Kafka (:func:`publish_arcos`, topic
``csos.orders.verified`` keyed by buyer DEA number, like the verifier's output).

Mapping (see ``data/arcos/README.md`` in the shared data folder for the columns):

* only ``TRANSACTION_CODE == "S"`` (sales to the buyer) rows are kept;
* rows are grouped into orders by ``(BUYER_DEA_NO, ORDER_FORM_NO)``. Schedule
  III-V shipments need no DEA-222 form, so ARCOS reports their
  ``ORDER_FORM_NO`` as ``null`` (or empty): such a row is **one order by
  itself** (order number ``ARCOS-T<TRANSACTION_ID>``), never merged with the
  buyer's other "null" rows (which would make one giant order of years of
  shipments). :attr:`ArcosRead.stats` counts them (``null_form_rows``);
* the order's time is its earliest ``TRANSACTION_DATE`` at 12:00 UTC (ARCOS has dates only);
* each row is one line: the NDC (11 digits) is looked up in the product master;
  when present, it gives product name, strength, drug family, package size and
  MME; otherwise the family comes from ``DRUG_NAME`` and MME from the ``MME``
  column. The **schedule is the one in force on the transaction date**
  (:meth:`streams.domain.products.ProductMaster.schedule`, the master's
  ``schedule_changes.csv``: hydrocodone combination products are III before
  2014-10-06); without a master entry it comes from ``DRUG_CODE`` and the same
  dated rules. Dosage units are ARCOS's ``DOSAGE_UNIT`` (DEA's own conversion);
  where it is empty (liquids measured in ML) they are packages x the master's
  package size, and a line with no master entry and no ``DOSAGE_UNIT`` is
  dropped. Base weight is ``CALC_BASE_WT_IN_GM``;
* ``BUYER_BUS_ACT`` is the business activity, ``BUYER_STATE`` the peer region.

:func:`read_arcos_detailed` also returns which ARCOS transactions make up
each order (``TRANSACTION_ID`` -> order id, line, family): the backtest writes
its verdicts per transaction with it.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from streams.domain.products import ProductMaster, schedule_on

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


#: Environment variable naming the folder of shared ARCOS files (test data, examples).
ARCOS_DIR_ENV = "CSOS_ARCOS_DIR"
#: The shared methadone sample (Washington Post release), found by :func:`arcos_data_dir`.
METHADONE_SAMPLE = "methadone-ma-2006-2014.csv.gz"


def arcos_data_dir() -> Path | None:
    """The shared ARCOS folder: ``$CSOS_ARCOS_DIR``, else ``shared/data/arcos`` beside the repository.

    The repository is normally checked out next to ``shared/`` (``../shared/data/arcos``);
    a checkout nested deeper (a git worktree) finds it in the nearest folder above
    that has one. None when there is none (tests that need it are skipped).
    """
    env = os.environ.get(ARCOS_DIR_ENV, "").strip()
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for up in repo.parents:
        cand = up / "shared" / "data" / "arcos"
        if cand.is_dir():
            return cand
    return None


#: The ARCOS columns of the Washington Post layout this reader uses, plus the context a reader shows (reporter,
#: buyer, year), in the Post's order: the held-out generator writes exactly these.
ARCOS_COLUMNS = ("REPORTER_DEA_NO", "REPORTER_BUS_ACT", "REPORTER_NAME", "BUYER_DEA_NO", "BUYER_BUS_ACT",
                 "BUYER_NAME", "BUYER_CITY", "BUYER_STATE", "TRANSACTION_CODE", "DRUG_CODE", "NDC_NO", "DRUG_NAME",
                 "QUANTITY", "ORDER_FORM_NO", "TRANSACTION_DATE", "CALC_BASE_WT_IN_GM", "DOSAGE_UNIT",
                 "TRANSACTION_ID", "Product_Name", "Measure", "MME_Conversion_Factor", "dos_str", "MME", "year")

#: ORDER_FORM_NO values ARCOS uses for "no order form" (schedule III-V shipments).
NULL_FORMS = frozenset({"", "NULL", "NONE", "NA", "N/A"})
_NULL_PREFIX = "\x00T"  # cannot occur in a real form number: keeps null-form keys apart from real forms


def _line(no: int, row: dict[str, str], products: ProductMaster | None) -> dict[str, Any]:
    ndc = _ndc11(row.get("NDC_NO", ""))
    packages = max(1, round(_float(row.get("QUANTITY"), 1.0)))
    p = products.get(ndc) if products is not None else None
    units = round(_float(row.get("DOSAGE_UNIT")))
    if units <= 0 and p is not None:
        units = packages * p.units_per_package
    base_g = _float(row.get("CALC_BASE_WT_IN_GM"))
    on = _date(row["TRANSACTION_DATE"])
    if p is not None:
        return {
            "line_no": no, "ndc": p.ndc, "product_name": p.product_name, "strength": p.strength,
            "package_quantity": p.units_per_package, "packages": packages, "dosage_units": int(units),
            "schedule": products.schedule(p, on), "drug_family": p.drug_family,  # type: ignore[union-attr]
            "base_weight_g": base_g if base_g > 0 else p.base_weight_g(units), "mme": p.mme(units),
        }
    family = (row.get("DRUG_NAME") or "UNKNOWN").strip().upper()
    name = row.get("Product_Name") or row.get("DRUG_NAME", "")
    current = _schedule(row.get("DRUG_CODE", ""))
    changes = products.schedule_changes if products is not None else []
    return {
        "line_no": no, "ndc": ndc, "product_name": name,
        "strength": (row.get("dos_str") or row.get("STRENGTH") or "").strip(),
        "package_quantity": max(1, round(units / packages)) if units > 0 else 1, "packages": packages,
        "dosage_units": int(units), "schedule": schedule_on(changes, ndc, family, name, current, on),
        "drug_family": family, "base_weight_g": base_g, "mme": _float(row.get("MME")),
    }


#: The product master bundled with the repository (generated by ``streams/tools/product_catalog.py``), read as a
#: file: a source does not import the tools that generate it.
BUNDLED_PRODUCT_MASTER = Path(__file__).resolve().parents[2] / "streams/tools/data/product_master.csv"

@dataclass
class ArcosRead:
    """An ARCOS file read as orders, with the transactions behind each order and what was counted on the way.

    ``transactions``: ``{order_id: [(TRANSACTION_ID, line_no, drug_family), ...]}``
    (line_no 0: the row gave no dosage units and was dropped from the order).
    ``stats``: ``rows``, ``sales_rows`` (code S), ``skipped_rows`` (no buyer, date or
    quantity), ``null_form_rows`` (schedule III-V rows without an order form number:
    one order each), ``orders``, ``orders_from_null_forms``, ``lines_dropped``,
    ``lines_without_master``, ``lines_schedule_by_date`` (lines whose schedule on
    their date differs from the current one).
    """

    orders: list[dict[str, Any]]
    transactions: dict[str, list[tuple[str, int, str]]]
    stats: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One sentence for the CLI: what was read and the quirks met."""
        return _READ_SENTENCE.format_map(defaultdict(int, self.stats))


_READ_SENTENCE = ("{sales_rows} sales rows -> {orders} orders; {null_form_rows} rows with a 'null'/empty "
                  "ORDER_FORM_NO (schedule III-V) became one order each; {lines_schedule_by_date} lines took an "
                  "earlier schedule by date; {lines_without_master} lines not in the product master; "
                  "{lines_dropped} lines dropped (no dosage units); {skipped_rows} rows skipped (no buyer, date or "
                  "quantity)")


def _order_key(row: dict[str, str], buyer: str, index: int) -> tuple[tuple[str, str], bool]:
    """(buyer, order key) and whether the row had no order form number (its own order)."""
    form = (row.get("ORDER_FORM_NO") or "").strip().upper()
    if form not in NULL_FORMS:
        return (buyer, form), False
    txid = (row.get("TRANSACTION_ID") or "").strip() or f"row{index}"
    return (buyer, f"{_NULL_PREFIX}{txid}"), True


def read_arcos_detailed(path: str | Path, *, product_master: ProductMaster | None = None,
                        use_product_master: bool = True) -> ArcosRead:
    """Read an ARCOS file (gzip or plain CSV) into verified-order dicts in date order, with counts.

    ``product_master`` defaults to ``streams/tools/data/product_master.csv`` (and
    its ``schedule_changes.csv``); pass ``use_product_master=False`` to map from
    the ARCOS columns only. Rows with no positive dosage units are skipped.
    """
    if product_master is None and use_product_master:
        product_master = ProductMaster.load(BUNDLED_PRODUCT_MASTER)
    stats = dict.fromkeys(("rows", "sales_rows", "skipped_rows", "null_form_rows", "orders",
                           "orders_from_null_forms", "lines_dropped", "lines_without_master",
                           "lines_schedule_by_date"), 0)
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    null_keys: set[tuple[str, str]] = set()
    with _open(path) as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            stats["rows"] += 1
            if (row.get("TRANSACTION_CODE") or "").strip().upper() != "S":
                continue
            stats["sales_rows"] += 1
            buyer = (row.get("BUYER_DEA_NO") or "").strip().upper()
            if (_float(row.get("DOSAGE_UNIT")) <= 0 and _float(row.get("QUANTITY")) <= 0) or not buyer \
                    or not (row.get("TRANSACTION_DATE") or "").strip():
                stats["skipped_rows"] += 1
                continue
            key, null = _order_key(row, buyer, i)
            if null:
                stats["null_form_rows"] += 1
                null_keys.add(key)
            groups.setdefault(key, []).append(row)
    orders: list[dict[str, Any]] = []
    transactions: dict[str, list[tuple[str, int, str]]] = {}
    for key, rows in groups.items():
        order, txs = _order(key, rows, product_master, stats)
        if order is None:
            continue
        orders.append(order)
        transactions[order["order_id"]] = txs
        stats["orders_from_null_forms"] += key in null_keys
    stats["orders"] = len(orders)
    orders.sort(key=lambda o: (o["received_at"], o["purchaser_dea"], o["order_number"]))
    return ArcosRead(orders, transactions, stats)


def _order(key: tuple[str, str], rows: list[dict[str, str]], products: ProductMaster | None,
           stats: dict[str, int]) -> tuple[dict[str, Any] | None, list[tuple[str, int, str]]]:
    buyer, form = key
    rows.sort(key=lambda r: (_date(r["TRANSACTION_DATE"]), r.get("TRANSACTION_ID", "")))
    lines, txs = [], []
    for r in rows:
        ln = _line(len(lines) + 1, r, products)
        txid = (r.get("TRANSACTION_ID") or "").strip()
        p = products.get(ln["ndc"]) if products is not None else None
        stats["lines_without_master"] += p is None
        if p is not None and ln["schedule"] != p.schedule:
            stats["lines_schedule_by_date"] += 1
        if ln["dosage_units"] <= 0:
            stats["lines_dropped"] += 1
            txs.append((txid, 0, ln["drug_family"]))
            continue
        lines.append(ln)
        txs.append((txid, ln["line_no"], ln["drug_family"]))
    if not lines:
        return None, txs
    first = rows[0]
    at = _date(first["TRANSACTION_DATE"])
    oid = str(uuid.uuid5(_NS, f"{buyer}|{form}"))
    # A deterministic offset within the day keeps same-day orders of a buyer apart and ordered.
    received = at + timedelta(seconds=int(oid.replace("-", "")[:6], 16) % 3600)
    # A row without an order form is its own order, numbered after its transaction.
    number = f"ARCOS-T{form[len(_NULL_PREFIX):]}" if form.startswith(_NULL_PREFIX) else form
    return {
        "order_id": oid, "order_number": number,
        "purchaser_dea": buyer, "purchaser_name": (first.get("BUYER_NAME") or "").strip(),
        "supplier_dea": (first.get("REPORTER_DEA_NO") or "").strip().upper(),
        "signed_at": received, "received_at": received, "verified_at": received,
        "signer_serial": UNVERIFIED_SERIAL, "signer_fingerprint": "",
        "business_activity": (first.get("BUYER_BUS_ACT") or "").strip() or None,
        "purchaser_state": (first.get("BUYER_STATE") or "").strip().upper() or None,  # peer region
        "lines": lines,
    }, txs


def read_arcos(path: str | Path, *, product_master: ProductMaster | None = None,
               use_product_master: bool = True) -> list[dict[str, Any]]:
    """The orders of :func:`read_arcos_detailed` (verified-order dicts, in date order)."""
    return read_arcos_detailed(path, product_master=product_master, use_product_master=use_product_master).orders


def iter_arcos(path: str | Path, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Like :func:`read_arcos`, as an iterator."""
    yield from read_arcos(path, **kwargs)


def publish_arcos(path: str | Path, publisher: Any, *, topic: str | None = None,
                  product_master: ProductMaster | None = None, flush: bool = True) -> int:
    """Publish an ARCOS file's orders to ``csos.orders.verified`` (Avro ``csos.orders.VerifiedOrder``).

    Keyed by buyer DEA number, so they reach the monitor agent exactly like the
    verifier's output. ``publisher`` is a :class:`connectors.kafka.io.Publisher`
    (anything with ``publish(topic, key, value)`` and ``flush()``). Verification
    is skipped (ARCOS has no signatures). Returns the number of orders published.
    """
    from streams.core.avro_codec import default_codec
    from connectors.kafka.catalogue import VERIFIED
    codec = default_codec()
    topic = topic or VERIFIED
    n = 0
    for rec in read_arcos(path, product_master=product_master):
        publisher.publish(topic, rec["purchaser_dea"].encode(), codec.encode("csos.orders.VerifiedOrder", rec))
        n += 1
    if flush:
        publisher.flush()
    return n


__all__ = ["ARCOS_COLUMNS", "arcos_data_dir", "ARCOS_DIR_ENV", "METHADONE_SAMPLE", "read_arcos", "read_arcos_detailed", "ArcosRead", "NULL_FORMS", "iter_arcos", "publish_arcos", "UNVERIFIED_SERIAL"]

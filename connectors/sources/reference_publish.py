"""Load reference data onto its compacted topics: CRL files and the registrant file.

Workers read both topics whole (``connectors.sources.reference_data``), so publishing a
fresh CRL here reaches every worker within a poll interval, and orders parked
for "revocation status unknown" are re-verified against it.
"""
from __future__ import annotations

import csv
from datetime import date, datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from connectors.kafka import catalogue as t
from streams.core.avro_codec import default_codec
from streams.domain.identifiers import is_valid_dea_number
from connectors.sources.reference_data import crl_record_key

from connectors.kafka.io import Publisher
from streams.domain.crl import load_crl


def publish_crls(publisher: Publisher, paths: list[Path]) -> list[str]:
    """Publish each CRL file (DER or PEM); returns the issuers.

    Keyed by issuer, CRL number and digest (``crl_record_key``), not by issuer
    alone: on the compacted topic every distinct CRL stays, so a later refused
    or older record of the same issuer can never compact the CRL in force away.
    """
    codec = default_codec()
    issuers = []
    for path in paths:
        crl = load_crl(Path(path).read_bytes())
        issuer = crl.issuer.rfc4514_string()
        publisher.publish(t.CRL, crl_record_key(crl), codec.encode("pki.CrlPublished", {
            "issuer": issuer, "crl_der": crl.public_bytes(Encoding.DER),
            "this_update": crl.last_update_utc, "next_update": crl.next_update_utc,
            "published_at": datetime.now(timezone.utc), "source": str(path),
        }))
        issuers.append(issuer)
    publisher.flush()
    return issuers


def read_registrant_file(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a registrant CSV as ``csos.registry.Registrant`` records, and the rows refused.

    Columns: dea_number, name, and optionally business_activity, state,
    schedules (``;``-separated), status (default ACTIVE), expires_on (YYYY-MM-DD).
    """
    now = datetime.now(timezone.utc)
    records, refused = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            dea = (row.get("dea_number") or "").strip()
            if not is_valid_dea_number(dea):
                refused.append(f"line {i}: {dea!r} is not a valid DEA number")
                continue
            expires = (row.get("expires_on") or "").strip()
            try:
                expires_on = date.fromisoformat(expires) if expires else None
            except ValueError:
                refused.append(f"line {i}: expires_on {expires!r} is not YYYY-MM-DD")
                continue
            records.append({
                "dea_number": dea, "name": (row.get("name") or "").strip() or dea,
                "business_activity": (row.get("business_activity") or "").strip() or None,
                "state": (row.get("state") or "").strip() or None,
                "schedules": [s for s in (row.get("schedules") or "").split(";") if s],
                "status": (row.get("status") or "ACTIVE").strip().upper(),
                "expires_on": expires_on, "updated_at": now,
            })
    return records, refused


def publish_registrants(publisher: Publisher, records: list[dict]) -> int:
    codec = default_codec()
    for rec in records:
        publisher.publish(t.REGISTRANTS, rec["dea_number"], codec.encode("csos.registry.Registrant", rec))
    publisher.flush()
    return len(records)

"""What each message becomes in ClickHouse: its rows, per table, in the tables' column order.

The sink (``connectors.clickhouse.sink``) decodes a message, maps it here, checks
every value against its column's type (:func:`checked_rows`, so a value the
table cannot hold dead-letters its message instead of failing a whole insert),
and inserts. Pure functions of the decoded record: the same message always gives
the same rows, which the sink's deduplication relies on.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import Any

from cryptography.hazmat.primitives import serialization

from streams.domain.cms import SignatureError, parse_signed_data
from streams.domain.order_document import FORMAT as CANONICAL_FORMAT
from streams.domain.x12_850 import FORMAT as X12_850_FORMAT, claimed_identifiers

from connectors.clickhouse.audit_chain import AUDIT_FIELDS, CHAIN_COLUMNS
from connectors.clickhouse.column_types import check_rows

log = logging.getLogger(__name__)
_DER = serialization.Encoding.DER

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "order_lines": (
        "order_id", "order_number", "purchaser_dea", "purchaser_name", "supplier_dea", "signed_at",
        "received_at", "verified_at", "signer_serial", "line_no", "ndc", "product_name", "strength",
        "package_quantity", "packages", "dosage_units", "schedule", "drug_family", "base_weight_g", "mme",
        "business_activity", "purchaser_state",  # the peer group, for the dashboards (017_dashboard_aggregates.sql)
    ),
    "verdicts": (
        "order_id", "order_number", "purchaser_dea", "verdict", "decided_at", "received_at", "signed_at",
        "model_version", "total_dosage_units", "fired_detectors", "summary",
    ),
    "verdict_reasons": (
        "order_id", "purchaser_dea", "decided_at", "verdict", "detector", "dimension", "drug_family",
        "value", "baseline", "threshold", "window", "fired", "explanation", "enforced",
    ),
    "rejections": (
        "order_id", "received_at", "rejected_at", "reason_code", "reason", "order_number",
        "purchaser_dea", "signer_subject", "checks",
    ),
    "pending_orders": (
        "order_id", "received_at", "parked_at", "reason_code", "reason", "order_number", "purchaser_dea",
    ),
    "audit_events": AUDIT_FIELDS + CHAIN_COLUMNS,  # chain columns appended by ChainSealer (audit_chain.py)
    "dead_letters": (
        "dead_letter_id", "failed_at", "stage", "source_topic", "source_partition", "source_offset",
        "reason", "payload_base64",
    ),
    "case_events": (
        "event_id", "order_id", "order_number", "purchaser_dea", "kind", "status", "version", "at", "held_at",
        "due_at", "escalated_at", "actor", "decision_id", "rationale", "evidence_notes", "error", "summary",
        "drug_families", "total_dosage_units",
    ),
    "cases": (
        "order_id", "order_number", "purchaser_dea", "status", "version", "updated_at", "held_at", "due_at",
        "escalated_at", "decided_by", "decision_id", "rationale", "evidence_notes", "summary", "drug_families",
        "total_dosage_units",
    ),
    "suspicious_order_reports": (
        "report_id", "order_id", "transaction_id", "order_form_number", "ordering_registrant_dea",
        "ordering_registrant_name", "reporting_registrant_dea", "date_received", "reported_at", "reported_by",
        "circumstances", "line_no", "ndc", "product_name", "strength", "unit", "package_quantity", "quantity",
        "dosage_units", "drug_family", "schedule",
    ),
    "shipments": (
        "shipment_id", "order_id", "order_number", "purchaser_dea", "supplier_dea", "shipped_at", "line_no", "ndc",
        "packages_shipped",
    ),
    "order_archive": (
        "order_id", "received_at", "source", "format", "document", "signature", "certificates",
        "signer_fingerprint", "order_number", "purchaser_dea",
    ),
    "crl_archive": (
        "crl_sha256", "issuer", "this_update", "next_update", "published_at", "source", "crl_der",
    ),
}


def verdict_summary(verdict: dict[str, Any]) -> str:
    """One sentence an analyst or a warehouse clerk can read (deciding findings; others are in verdict_reasons)."""
    fired = [r for r in verdict["reasons"] if r["fired"] and r.get("enforced", True)]
    if not fired:
        return "Released: no detector fired." if verdict["verdict"] == "RELEASE" else "Held."
    return ("Held: " if verdict["verdict"] == "HOLD" else "Released: ") + " ".join(r["explanation"] for r in fired)


def rows_for(schema: str, rec: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """Map one decoded message to rows per table."""
    if schema == "csos.orders.VerifiedOrder":
        head = [rec["order_id"], rec["order_number"], rec["purchaser_dea"], rec["purchaser_name"],
                rec["supplier_dea"], rec["signed_at"], rec["received_at"], rec["verified_at"], rec["signer_serial"]]
        return {"order_lines": [
            head + [ln["line_no"], ln["ndc"], ln["product_name"], ln["strength"], ln["package_quantity"],
                    ln["packages"], ln["dosage_units"], ln["schedule"], ln["drug_family"], ln["base_weight_g"], ln["mme"],
                    rec.get("business_activity") or "", rec.get("purchaser_state") or ""]
            for ln in rec["lines"]
        ]}
    if schema == "som.Verdict":
        # Only the detectors that decide; findings of the others are in verdict_reasons (enforced = false).
        fired = [r["detector"] for r in rec["reasons"] if r["fired"] and r.get("enforced", True)]
        return {
            "verdicts": [[rec["order_id"], rec["order_number"], rec["purchaser_dea"], rec["verdict"], rec["decided_at"],
                          rec["received_at"], rec["signed_at"], rec["model_version"], rec["total_dosage_units"],
                          sorted(set(fired)), verdict_summary(rec)]],
            "verdict_reasons": [
                [rec["order_id"], rec["purchaser_dea"], rec["decided_at"], rec["verdict"], r["detector"], r["dimension"],
                 r["drug_family"], r["value"], r["baseline"], r["threshold"], r["window"], r["fired"], r["explanation"],
                 r.get("enforced", True)]
                for r in rec["reasons"]
            ],
        }
    if schema == "csos.orders.Rejection":
        return {"rejections": [[
            rec["order_id"], rec["received_at"], rec["rejected_at"], rec["reason_code"], rec["reason"],
            rec["order_number"], rec["purchaser_dea"], rec["signer_subject"],
            [(c["check"], c["passed"], c["detail"]) for c in rec["checks"]],
        ]]}
    if schema == "csos.orders.PendingOrder":
        return {"pending_orders": [[rec[c] for c in TABLE_COLUMNS["pending_orders"]]]}
    if schema == "audit.AuditEvent":
        return {"audit_events": [[rec[c] for c in AUDIT_FIELDS]]}
    if schema == "dlq.DeadLetter":
        return {"dead_letters": [[
            rec["dead_letter_id"], rec["failed_at"], rec["stage"], rec["source_topic"], rec["source_partition"],
            rec["source_offset"], rec["reason"], base64.b64encode(rec["payload"]).decode("ascii"),
        ]]}
    if schema == "csos.orders.ReceivedOrder":
        return {"order_archive": [archive_row(rec)]}
    if schema == "pki.CrlPublished":  # as published; the workers verify it (022_crl_archive.sql)
        der = bytes(rec["crl_der"])
        return {"crl_archive": [[hashlib.sha256(der).hexdigest(), rec["issuer"], rec["this_update"],
                                 rec["next_update"], rec["published_at"], rec["source"], der]]}
    if schema == "som.CaseEvent":
        return case_rows(rec)
    if schema == "som.SuspiciousOrderReport":
        return {"suspicious_order_reports": [
            [ln[c] if c in ln else rec[c] for c in TABLE_COLUMNS["suspicious_order_reports"]] for ln in rec["lines"]]}
    if schema == "warehouse.ShipmentConfirmation":
        head = [rec[c] for c in TABLE_COLUMNS["shipments"][:6]]
        return {"shipments": [head + [ln["line_no"], ln["ndc"], ln["packages_shipped"]] for ln in rec["lines"]]}
    return {}


def checked_rows(schema: str, rec: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """:func:`rows_for`, each value checked against its column's type in the DDL.

    Raises :class:`connectors.clickhouse.column_types.RowRejected` naming the table,
    column and value that the column cannot hold (a line number of 70,000 in a
    ``UInt16``, a negative count in a ``UInt32``): ClickHouse would refuse the
    whole insert for it, so the message is dead-lettered instead.
    """
    rows = rows_for(schema, rec)
    for table, table_rows in rows.items():
        check_rows(table, TABLE_COLUMNS[table], table_rows)
    return rows


#: Case events that decide a case: the actor is who decided.
CLOSING_KINDS = frozenset({"RELEASED", "REPORTED", "CANCELLED"})
#: Case events that do not change the case: a refused decision, and decisions about the registrant made from it.
UNCHANGED_KINDS = frozenset({"REFUSED", "LIMIT_SET", "TERMINATED", "ONBOARDED"})


def case_rows(rec: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """A ``case_events`` row, and unless the case is unchanged (:data:`UNCHANGED_KINDS`) a new ``cases`` version."""
    rows: dict[str, list[list[Any]]] = {"case_events": [[rec[c] for c in TABLE_COLUMNS["case_events"]]]}
    if rec["kind"] not in UNCHANGED_KINDS:
        closing = rec["kind"] in CLOSING_KINDS
        rows["cases"] = [[
            rec["order_id"], rec["order_number"], rec["purchaser_dea"], rec["status"], rec["version"], rec["at"],
            rec["held_at"], rec["due_at"], rec["escalated_at"], rec["actor"] if closing else "",
            rec["decision_id"] if closing else None, rec["rationale"] if closing else "",
            rec["evidence_notes"] if closing else "", rec["summary"], rec["drug_families"], rec["total_dosage_units"],
        ]]
    return rows


# ---------------------------------------------------------------------------- the order archive
def archive_row(rec: dict[str, Any]) -> list[Any]:
    """An ``order_archive`` row (1311.55(c)(11)) for a ``csos.orders.ReceivedOrder``. Never raises.

    The document and signature are stored exactly as received. The certificates
    and the lookup fields (order number, purchaser DEA number) are read from
    the CMS and the signed content on a best-effort basis: an unreadable
    signature is archived with no certificates, an unreadable document with
    NULL lookup fields. This is not verification; the verdict is in the
    ``rejections``/``verdicts`` tables.
    """
    document = rec.get("document")
    signature = rec.get("signature") or b""
    certs: list[bytes] = []
    fingerprint = ""
    content: bytes | None = None
    try:
        certs, fingerprint, content = extract_certificates(document, signature)
    except Exception:  # noqa: BLE001 - hostile input: archive the bytes whatever happens
        log.warning("order %s: certificates not extracted from its signature", rec.get("order_id"), exc_info=True)
    order_number, purchaser_dea = lookup_fields(document if document is not None else content,
                                                rec.get("format") or CANONICAL_FORMAT)
    return [rec["order_id"], rec["received_at"], rec.get("source") or "", rec.get("format") or "",
            None if document is None else bytes(document), bytes(signature), certs, fingerprint,
            order_number, purchaser_dea]


def extract_certificates(document: bytes | None, signature: bytes) -> tuple[list[bytes], str, bytes | None]:
    """(DER of every certificate in the CMS, signer's first; SHA-256 hex of the signer's; attached content).

    The signer is identified with :func:`streams.domain.cms.parse_signed_data` (no
    signature check). When the CMS cannot be parsed that way (e.g. several
    signers, a detached signature received without its document), the
    certificates are read with asn1crypto in CMS order and the fingerprint is
    empty; when nothing can be read the list is empty.
    """
    # The received document first (what the verifier saw); then without it, which still reads an attached
    # signature whose embedded content differs; then with an empty one, which reads a detached signature
    # that arrived without its document.
    for detached in dict.fromkeys((document, None, b"")):
        try:
            parsed = parse_signed_data(signature, detached)
        except SignatureError:
            continue
        signer = parsed.signer_cert_der
        # cryptography only loads strict DER, so re-encoding a loaded certificate gives its exact bytes.
        others = [c.public_bytes(_DER) for c in parsed.other_certs]
        attached = None if parsed.detached else parsed.content
        return [signer] + [d for d in others if d != signer], hashlib.sha256(signer).hexdigest(), attached
    try:
        from asn1crypto import cms as asn1_cms

        sd = asn1_cms.ContentInfo.load(bytes(signature))["content"]
        return [c.chosen.dump() for c in (sd["certificates"] or ()) if c.name == "certificate"], "", None
    except Exception:  # noqa: BLE001 - not CMS at all
        return [], "", None


def lookup_fields(content: bytes | None, fmt: str = CANONICAL_FORMAT) -> tuple[str | None, str | None]:
    """(order number, purchaser DEA number) from the signed content, best effort; NULLs if unreadable.

    Not validated (the verdict is in ``rejections``/``verdicts``): read directly, since a full parse of every
    order was the largest part of the sink's work per order.
    """
    if not content:
        return None, None
    if fmt == X12_850_FORMAT:  # the two elements, not a full parse (valid: the same values; defective: as claimed)
        number, dea = claimed_identifiers(content)
        return (number if number is not None and len(number) <= 64 else None,
                dea if dea is not None and len(dea) <= 64 else None)
    # The canonical JSON: a valid document's number and DEA number are its fields exactly as written (the parser
    # validates, never rewrites them), and a defective one is filed under the fields it claims; so no full parse.
    try:
        doc = json.loads(bytes(content).decode("utf-8"))
        number = doc.get("order_number") if isinstance(doc, dict) else None
        purchaser = doc.get("purchaser") if isinstance(doc, dict) else None
        dea = purchaser.get("dea_number") if isinstance(purchaser, dict) else None
        return (number if isinstance(number, str) and len(number) <= 64 else None,
                dea if isinstance(dea, str) and len(dea) <= 64 else None)
    except Exception:  # noqa: BLE001
        return None, None

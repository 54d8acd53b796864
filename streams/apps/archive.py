"""The order archive (21 CFR 1311.55(c)(11), 1305.27): find an archived order and export it.

Every order received on ``csos.orders.received``, accepted or rejected, is kept
in the ClickHouse table ``order_archive`` (schemas/clickhouse/007_order_archive.sql)
for two years and 90 days: the exact bytes received, the CMS signature and every
certificate the signature carried. This module reads it back:

* :func:`find_archived` lists the archived orders with an order number
  (optionally of one purchaser DEA number); the same number can be there
  several times (a replayed or re-sent order keeps its own order id).
* :func:`export_order` writes each of them to a directory an auditor can take
  away: the document, the signature (``.p7s``, DER), the certificates
  (``.chain.pem``) and a ``manifest.json`` with the outcome recorded at the time
  (rejection reason / monitor verdict) and SHA-256 of every file. The exported
  document and signature re-verify offline with
  :func:`streams.apps.offline_verify.reverify` (``csos verify-offline``).

With the embedded engine the store belongs to one process: run the export while
``csos sink`` is stopped (or against a ClickHouse server).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client
from cryptography import x509
from cryptography.x509.oid import NameOID

from streams.domain.cms import SignatureError, parse_signed_data
from streams.core.errors import CsosError

ARCHIVE_TABLE = "order_archive"
_BYTES = {"document": "bytes", "signature": "bytes", "certificates": "bytes"}
_COLUMNS = ("order_id", "received_at", "source", "format", "document", "signature", "certificates",
            "signer_fingerprint", "order_number", "purchaser_dea", "archived_at")


class ArchiveNotFound(CsosError, LookupError):
    """No archived order matches the order number (and purchaser DEA number)."""
    code = "ARCHIVE_NOT_FOUND"


@dataclass(frozen=True)
class ArchivedOrder:
    """One row of ``order_archive``: an order exactly as it was received."""

    order_id: str
    received_at: datetime
    source: str
    format: str
    document: bytes | None  # None: the signature is attached (carries the document)
    signature: bytes  # DER CMS SignedData
    certificates: tuple[bytes, ...]  # DER, the signer's first when it could be identified
    signer_fingerprint: str  # SHA-256 hex of the signer certificate, "" if unidentified
    order_number: str | None
    purchaser_dea: str | None
    archived_at: datetime

    @property
    def attached(self) -> bool:
        return self.document is None

    def signed_content(self) -> bytes | None:
        """The order document: as received beside the signature, else the content inside it."""
        if self.document is not None:
            return self.document
        try:
            return parse_signed_data(self.signature, None).content
        except SignatureError:
            return None


def find_archived(client: Client, order_number: str, purchaser_dea: str | None = None) -> list[ArchivedOrder]:
    """Every archived order with ``order_number`` (and ``purchaser_dea`` if given), oldest first.

    The lookup fields were read from the signed content when the order was
    archived; an order whose content was unreadable has none and can be found
    by order id only (``SELECT ... FROM order_archive WHERE order_id = ...``).
    """
    where = "order_number = {number:String}"
    params: dict[str, Any] = {"number": order_number}
    if purchaser_dea:
        where += " AND purchaser_dea = {dea:String}"
        params["dea"] = purchaser_dea
    result = client.query(
        f"SELECT {', '.join(_COLUMNS)} FROM {ARCHIVE_TABLE} FINAL WHERE {where} ORDER BY received_at, order_id",
        parameters=params, column_formats=_BYTES)
    return [_row(r) for r in result.result_rows]


def archived_by_id(client: Client, order_id: str) -> ArchivedOrder | None:
    """The archived order with this order id, or None."""
    result = client.query(f"SELECT {', '.join(_COLUMNS)} FROM {ARCHIVE_TABLE} FINAL WHERE order_id = {{id:String}}",
                          parameters={"id": order_id}, column_formats=_BYTES)
    return _row(result.result_rows[0]) if result.result_rows else None


def _row(r: tuple) -> ArchivedOrder:
    v = dict(zip(_COLUMNS, r))
    return ArchivedOrder(
        order_id=v["order_id"], received_at=_aware(v["received_at"]), source=v["source"], format=v["format"],
        document=None if v["document"] is None else bytes(v["document"]), signature=bytes(v["signature"]),
        certificates=tuple(bytes(c) for c in v["certificates"]), signer_fingerprint=v["signer_fingerprint"],
        order_number=v["order_number"], purchaser_dea=v["purchaser_dea"], archived_at=_aware(v["archived_at"]))


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


# ---------------------------------------------------------------------------- outcome at the time
def recorded_outcome(client: Client, order_id: str) -> dict[str, Any]:
    """What the pipeline decided about the order, from ``rejections``, ``verdicts`` and ``order_lines``.

    ``status`` is REJECTED, RELEASE or HOLD (verified, then the monitor's verdict),
    VERIFIED (verified, no verdict recorded yet) or NOT_RECORDED.
    """
    out: dict[str, Any] = {"status": "NOT_RECORDED"}
    p = {"id": order_id}
    rej = _query(client, "SELECT reason_code, reason, rejected_at, checks FROM rejections FINAL "
                         "WHERE order_id = {id:String} ORDER BY rejected_at DESC LIMIT 1", p)
    if rej:
        code, reason, at, checks = rej[0]
        out.update(status="REJECTED", reason_code=code, reason=reason, rejected_at=_iso(at),
                   checks=[_check(c) for c in checks])
        return out
    ver = _query(client, "SELECT verdict, summary, decided_at, fired_detectors FROM verdicts FINAL "
                         "WHERE order_id = {id:String} ORDER BY decided_at DESC LIMIT 1", p)
    if ver:
        verdict, summary, at, fired = ver[0]
        out.update(status=verdict, verified=True, verdict=verdict, summary=summary, decided_at=_iso(at),
                   fired_detectors=list(fired))
        return out
    if _query(client, "SELECT 1 FROM order_lines WHERE order_id = {id:String} LIMIT 1", p):
        out.update(status="VERIFIED", verified=True)
    return out


def _check(c: Any) -> dict[str, Any]:
    """A named Tuple(check, passed, detail) comes back as a dict or a tuple depending on the driver."""
    if isinstance(c, dict):
        return {"check": c.get("check"), "passed": bool(c.get("passed")), "detail": c.get("detail")}
    return {"check": c[0], "passed": bool(c[1]), "detail": c[2]}


def _query(client: Client, sql: str, params: dict[str, Any]) -> list[tuple]:
    try:
        return list(client.query(sql, parameters=params).result_rows)
    except Exception as exc:  # noqa: BLE001 - a table missing (archive-only store): no outcome
        if "UNKNOWN_TABLE" in str(exc) or "doesn't exist" in str(exc):
            return []
        raise


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else _aware(dt).isoformat()


# ---------------------------------------------------------------------------- the CRLs of the time
CRL_TABLE = "crl_archive"


@dataclass(frozen=True)
class ArchivedCrl:
    """One row of ``crl_archive``: a CRL exactly as it was published to the pipeline."""

    issuer: str
    this_update: datetime
    next_update: datetime | None
    published_at: datetime
    source: str
    crl_der: bytes
    sha256: str


def crls_held_at(client: Client, when: datetime) -> list[ArchivedCrl]:
    """Each issuer's CRL the workers had in force at ``when``, from ``crl_archive``.

    Why that one: an offline re-verification judges revocation against the CRLs
    it is given, and a later CRL that lists the certificate rejects the order
    whatever the revocation date (the verifier fails closed), so only the CRLs
    the workers had when they decided reproduce the decision. Which they had is
    in the audit trail: each worker audits every CRL it installs (``crl.loaded``,
    with the CRL's SHA-256), and never one it refused (a forged signature) or
    found older than the one in force (a rollback), though both were published:
    so per issuer, the last CRL loaded at or before ``when``. A store whose audit
    trail predates the digest falls back to each issuer's last CRL published by
    then. Empty when the store has no CRL archive (installed before
    ``022_crl_archive.sql``) or nothing was published by then.
    """
    at = {"at": _aware(when).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]}
    until = "toDateTime64({at:String}, 3, 'UTC')"
    chosen = _query(client, "SELECT argMax(JSONExtractString(detail, 'crl_sha256'), occurred_at) FROM audit_events "
                            f"WHERE action = 'crl.loaded' AND occurred_at <= {until} "
                            "AND JSONExtractString(detail, 'crl_sha256') != '' "
                            "GROUP BY JSONExtractString(detail, 'issuer')", at)
    if not chosen:
        chosen = _query(client, f"SELECT argMax(crl_sha256, (published_at, this_update)) FROM {CRL_TABLE} FINAL "
                                f"WHERE published_at <= {until} GROUP BY issuer", at)
    if not chosen:
        return []
    rows = client.query(f"SELECT issuer, this_update, next_update, published_at, source, crl_der, crl_sha256 "
                        f"FROM {CRL_TABLE} FINAL WHERE crl_sha256 IN {{ids:Array(String)}} ORDER BY issuer",
                        parameters={"ids": [c[0] for c in chosen]}, column_formats={"crl_der": "bytes"}).result_rows
    seen: set[str] = set()
    out = []
    for issuer, this_update, next_update, published_at, source, der, digest in rows:
        if digest not in seen:  # one row per CRL even if the same bytes were published twice
            seen.add(digest)
            out.append(ArchivedCrl(issuer, _aware(this_update), None if next_update is None else _aware(next_update),
                                   _aware(published_at), source, bytes(der), digest))
    return out


def verification_time(client: Client, order_id: str, outcome: dict[str, Any], received_at: datetime) -> datetime:
    """When the pipeline verified the order (rejected it, or verified it), as recorded; else its receipt.

    A parked order (REVOCATION_UNKNOWN) is verified again when a newer CRL arrives, so this can be well after
    receipt; the CRLs held then are the ones its decision rests on."""
    if outcome.get("rejected_at"):
        return datetime.fromisoformat(outcome["rejected_at"])
    verified = _query(client, "SELECT min(verified_at) FROM order_lines WHERE order_id = {id:String}",
                      {"id": order_id})
    if verified and verified[0][0] is not None and _aware(verified[0][0]).year > 1970:  # min() of no rows: 1970
        return _aware(verified[0][0])
    return received_at


# ---------------------------------------------------------------------------- export
def export_order(client: Client, order_number: str, purchaser_dea: str | None, out_dir: Path) -> list[Path]:
    """Export every archived order with this number (and purchaser) to ``out_dir``; return the files written.

    One directory per archived order, ``<out_dir>/<order number>_<order id>/``, holding

    * ``<order number>.document``: the order document, exactly the bytes received
      beside the signature, or the content carried inside an attached signature
      (``manifest.json`` says which); absent if neither can be read;
    * ``<order number>.p7s``: the CMS signature exactly as received (DER);
    * ``<order number>.chain.pem``: every certificate the signature carried, signer first;
    * ``manifest.json``: order id, number, purchaser, received_at, source, format,
      signer fingerprint, the certificates (subject, issuer, serial, validity),
      the outcome recorded then (reason code / verdict), SHA-256 of each file,
      and the command that re-verifies it offline.

    Raises :class:`ArchiveNotFound` if nothing is archived under that number.
    """
    orders = find_archived(client, order_number, purchaser_dea)
    if not orders:
        who = f" for purchaser {purchaser_dea}" if purchaser_dea else ""
        raise ArchiveNotFound(f"no archived order with order number {order_number!r}{who}; the archive keeps "
                              f"orders received on csos.orders.received for 2 years and 90 days")
    out_dir = Path(out_dir)
    written: list[Path] = []
    for a in orders:
        d = out_dir / f"{_safe(a.order_number or order_number)}_{_safe(a.order_id)}"
        d.mkdir(parents=True, exist_ok=True)
        stem = _safe(a.order_number or order_number)
        files: dict[str, str] = {}

        def put(name: str, data: bytes) -> Path:
            path = d / name
            path.write_bytes(data)
            files[name] = hashlib.sha256(data).hexdigest()
            written.append(path)
            return path

        content = a.signed_content()
        doc_name = None
        if content is not None:
            doc_name = put(f"{stem}.document", content).name
        sig_name = put(f"{stem}.p7s", a.signature).name
        chain_name = put(f"{stem}.chain.pem", b"".join(_pem(c) for c in a.certificates)).name
        outcome = recorded_outcome(client, a.order_id)
        held_at = verification_time(client, a.order_id, outcome, a.received_at)
        crls = crls_held_at(client, held_at)
        (d / "crls").mkdir(exist_ok=True)
        crl_files = [put(f"crls/{_safe(_issuer_cn(c.crl_der))}-{c.sha256[:12]}.crl", c.crl_der).name for c in crls]
        manifest = {
            "order_id": a.order_id,
            "order_number": a.order_number,
            "purchaser_dea": a.purchaser_dea,
            "received_at": a.received_at.isoformat(),
            "archived_at": a.archived_at.isoformat(),
            "source": a.source,
            "format": a.format,
            "signature_attached": a.attached,
            "document_file": doc_name,
            "document_origin": (None if doc_name is None else
                                "content carried inside the attached signature" if a.attached
                                else "bytes received beside the (detached) signature"),
            "signature_file": sig_name,
            "certificates_file": chain_name,
            "signer_fingerprint_sha256": a.signer_fingerprint or None,
            "certificates": [_describe(c) for c in a.certificates],
            "outcome": outcome,
            "crls_held_at": held_at.isoformat(),
            "crls": [{"issuer": c.issuer, "this_update": c.this_update.isoformat(),
                      "next_update": None if c.next_update is None else c.next_update.isoformat(),
                      "published_at": c.published_at.isoformat(), "source": c.source, "sha256": c.sha256,
                      "file": f"crls/{name}"} for c, name in zip(crls, crl_files)],
            "files_sha256": files,
            "reverify": _reverify_hint(a, doc_name, sig_name, [f"crls/{name}" for name in crl_files]),
        }
        written.append(_write_json(d / "manifest.json", manifest))
    return written


def _reverify_hint(a: ArchivedOrder, doc_name: str | None, sig_name: str, crl_files: list[str]) -> str:
    doc = "" if a.attached or doc_name is None else f" --document {doc_name}"
    fmt = f" --format {a.format}" if a.format and a.format != "csos-order/1" else ""
    crls = ("".join(f" --crl {f}" for f in crl_files) if crl_files
            else " --crl <sub-CA CRL current at receipt> --crl <root CRL>")  # a store without its CRL archive
    return (f"csos verify-offline{doc} --signature {sig_name} --trust <trust dir>{crls} "
            f"--received-at {a.received_at.isoformat()}{fmt}")


def _issuer_cn(crl_der: bytes) -> str:
    """The common name of a CRL's issuer, for a file name ("crl" if the CRL or its issuer has none readable)."""
    try:
        names = x509.load_der_x509_crl(crl_der).issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return "crl"
    return str(names[0].value) if names else "crl"


def _describe(der: bytes) -> dict[str, Any]:
    info: dict[str, Any] = {"sha256": hashlib.sha256(der).hexdigest()}
    try:
        c = x509.load_der_x509_certificate(der)
        info.update(subject=c.subject.rfc4514_string(), issuer=c.issuer.rfc4514_string(),
                    serial=format(c.serial_number, "x"), not_before=c.not_valid_before_utc.isoformat(),
                    not_after=c.not_valid_after_utc.isoformat())
    except Exception as exc:  # noqa: BLE001 - kept as received even if unreadable
        info["unreadable"] = str(exc)
    return info


def _pem(der: bytes) -> bytes:
    b64 = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


def _safe(name: str) -> str:
    """A file-name-safe form of an identifier taken from an untrusted document."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80].lstrip(".")
    return s or "order"


def _write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return path


__all__ = ["ARCHIVE_TABLE", "ArchiveNotFound", "ArchivedOrder", "archived_by_id", "export_order",
           "find_archived", "recorded_outcome"]

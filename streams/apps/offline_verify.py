"""Re-verify one CSOS order offline, e.g. an order exported from the archive for an audit.

The same :class:`streams.verification.Verifier` the pipeline runs, built from
trust material given on the command line instead of the worker's PKI
directory, and judged at the original receipt time:

* certificate validity is judged at the signing time, as at receipt (1311.50);
* revocation is judged at ``received_at`` against the CRLs you supply. Give the
  CRL that was current when the order was received to reproduce the original
  decision; a CRL whose nextUpdate is before ``received_at`` gives
  REVOCATION_UNKNOWN, and a later CRL that lists the certificate gives
  CERT_REVOKED whatever the revocation date (the verifier fails closed);
* the 60-day order age is measured from signing to ``received_at``.

:func:`render` prints every check, its result and the final finding in words a
compliance officer can sign off on.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from streams.domain.cert_profile import ExtensionOids
from streams.domain.order_document import FORMAT
from streams.domain.products import ProductMaster
from streams.verification import ADVICE, CHECKS, CertificateFinding, Outcome, Refusal, Verifier

#: What each check establishes, in the order the verifier makes them.
CHECK_DESCRIPTIONS: dict[str, str] = {
    "signature_format": "The signature is a readable CMS/PKCS#7 SignedData with one signer and the signer's certificate",
    "algorithms": "SHA-256 or stronger; RSA key of 2048+ bits or ECDSA P-256+ (DEA since 2014)",
    "signature": "Integrity: the document is unaltered and was signed with the certificate's private key "
                 "(1311.55)",
    "order_document": "Every element required by 21 CFR 1305.21(b) is present and well formed",
    "signing_time": "The signature time and the order's signed date agree (24 h), and it was signed before receipt",
    "certificate_path": "The certificate chains to the trusted CSOS root and is a registrant signing "
                        "certificate (RFC 5280; 1311.55)",
    "certificate_validity": "Every certificate in the path was valid on the date the order was signed (1311.50)",
    "revocation": "Every certificate of the path (yours and each CA's) is covered by a current revocation "
                  "list and not on it at receipt (RFC 5280 6.3; 1311.55)",
    "dea_number": "The DEA number in the order is the one bound to the certificate (1311.55)",
    "products": "Every item (NDC) is in the supplier's product master",
    "schedules": "Every item's schedule is authorized by the certificate; otherwise the whole order is "
                 "invalid (1311.55(c)(9))",
    "order_age": "Received no more than 60 days after signing (1305.22(e))",
}


def build_verifier(trust_dir: Path, crl_paths: list[Path], products_path: Path | None,
                   oids: ExtensionOids | None = None) -> Verifier:
    """A Verifier from a trust directory, CRL files and a product master.

    ``trust_dir``: PEM files; ``root*.pem`` are the trust anchors (the CSOS root),
    every other ``*.pem`` an intermediate CA (a PKI directory written by
    ``csos pki init`` is accepted too: its ``trust/`` is used). ``crl_paths``: CRL
    files, DER or PEM, for the CSOS sub-CA and for the root (every certificate of
    the path needs one). ``products_path``: the product master CSV (NDC, schedule,
    ...); None for an empty one (certificate checks only).

    A CRL or certificate file that cannot be used does not stop it: it is listed in
    the verifier's ``refusals`` (printed by :func:`render`). Raises ``ValueError`` /
    ``OSError`` only when nothing can be verified (no readable trust anchor).
    """
    d = Path(trust_dir)
    if (d / "trust").is_dir():
        d = d / "trust"
    if not d.is_dir():
        raise FileNotFoundError(f"trust directory {d} does not exist")
    products = ProductMaster.load(products_path) if products_path is not None else ProductMaster([])
    return Verifier.from_files(sorted(d.glob("*.pem")), [Path(p) for p in crl_paths], products, oids)


def reverify(document: bytes | None, signature: bytes, trust_dir: Path, crl_paths: list[Path],
             products_path: Path, received_at: datetime, fmt: str = FORMAT) -> Outcome:
    """Re-verify one order offline, as the pipeline would have on receipt.

    ``document``: the order bytes if they travelled beside the signature, None if
    the signature is attached (carries them). ``signature``: the DER CMS
    SignedData. ``trust_dir``: the CSOS root (``root*.pem``) and intermediate CA
    certificates (other ``*.pem``). ``crl_paths``: the CRLs current at receipt.
    ``products_path``: the product master CSV. ``received_at``: when the order was
    received (timezone-aware). ``fmt``: the document format (``csos-order/1`` or
    ``x12-850``). Returns the Outcome: ``ok``, ``reason_code``, ``reason`` and
    every check made with its result; ``outcome.refusals`` lists the trust material
    that could not be used.
    """
    if received_at.tzinfo is None:
        raise ValueError("received_at must include a time zone (e.g. 2026-03-02T12:00:00+00:00)")
    verifier = build_verifier(trust_dir, crl_paths, products_path)
    outcome = verifier.verify(document, signature, received_at, fmt)
    outcome.refusals = list(verifier.refusals)
    return outcome


def check_certificate_offline(certificate: bytes, trust_dir: Path, crl_paths: list[Path], at: datetime,
                              received_at: datetime | None = None) -> tuple[CertificateFinding, list[Refusal]]:
    """Judge one certificate without an order (``csos verify-offline --certificate``).

    The verifier's checks 6-8 exactly as for an order: RFC 5280 path to the trust
    anchors, validity of every certificate of the path at ``at`` (the signing time),
    revocation of every certificate of the path at ``received_at`` (default ``at``)
    against ``crl_paths``. For certificates whose private key you do not have (the
    NIST PKITS conformance cases run this way). ``certificate``: DER or PEM.
    """
    if at.tzinfo is None or (received_at is not None and received_at.tzinfo is None):
        raise ValueError("times must include a time zone (e.g. 2026-03-02T12:00:00+00:00)")
    verifier = build_verifier(trust_dir, crl_paths, None)
    if certificate.lstrip().startswith(b"-----BEGIN"):
        try:
            certificate = x509.load_pem_x509_certificate(certificate).public_bytes(serialization.Encoding.DER)
        except ValueError:
            pass  # judged (and reported unreadable) below
    finding = verifier.check_certificate(certificate, signed_at=at, received_at=received_at or at)
    return finding, list(verifier.refusals)


def render_refusals(refusals: list[Refusal]) -> list[str]:
    """One line per CRL or certificate file the verifier could not use."""
    return [f"{'CRL' if r.kind == 'crl' else 'Certificate'} refused{f' ({r.source})' if r.source else ''}: "
            f"{r.reason}" for r in refusals]


def render_certificate(finding: CertificateFinding, refusals: list[Refusal], *, at: datetime) -> str:
    """The certificate checks as a report, like :func:`render` for an order."""
    out = ["CSOS certificate check (RFC 5280 path, validity, revocation)", "=" * 60, f"Judged at:        {at.isoformat()}"]
    out += render_refusals(refusals)
    out.append("")
    for c in finding.checks:
        out.append(f"    {c.check:<21} {'PASS' if c.passed else 'FAIL':<11} -> {c.detail}")
    out.append("")
    out.append("RESULT: VALID. The certificate path is trusted, valid and unrevoked." if finding.ok
               else f"RESULT: INVALID ({finding.reason_code}).\nReason: {finding.reason}")
    return "\n".join(out) + "\n"


def render(outcome: Outcome, *, received_at: datetime | None = None) -> str:
    """The outcome as a report: every check (passed, failed, or not reached) and the final finding."""
    out: list[str] = ["CSOS order verification (21 CFR 1305.22, 1311.50, 1311.55)", "=" * 60]
    order = outcome.order
    if order is not None:
        out.append(f"Order number:     {order.order_number}")
        out.append(f"Purchaser:        {order.purchaser.dea_number} {order.purchaser.name}")
        out.append(f"Supplier:         {order.supplier.dea_number} {order.supplier.name}")
        out.append(f"Items:            {len(order.lines)}")
    if outcome.signed_at is not None:
        out.append(f"Signed:           {outcome.signed_at.isoformat()}")
    if received_at is not None:
        out.append(f"Received:         {received_at.isoformat()}")
    if outcome.signer_subject:
        out.append(f"Signer:           {outcome.signer_subject}")
    if outcome.signer_serial:
        out.append(f"Signer serial:    {outcome.signer_serial}")
    if outcome.signer_fingerprint:
        out.append(f"Signer SHA-256:   {outcome.signer_fingerprint}")
    out += render_refusals(getattr(outcome, "refusals", []))
    out += ["", "Checks, in the order they are made (verification stops at the first failure):", ""]
    made = {c.check: c for c in outcome.checks}
    stopped = False
    for i, name in enumerate(CHECKS, 1):
        c = made.get(name)
        if c is None:
            result = "NOT CHECKED"
            detail = ("not reached: verification stopped at the failure above" if stopped or not outcome.ok
                      else "not made")
        else:
            result = "PASS" if c.passed else "FAIL"
            detail = c.detail
            stopped = stopped or not c.passed
        out.append(f"{i:>2}. {name:<21} {result:<11} {CHECK_DESCRIPTIONS.get(name, '')}")
        out.append(f"    {'':<21} {'':<11} -> {detail}")
    for c in outcome.checks:  # a check the verifier made that this report does not know (newer verifier)
        if c.check not in CHECK_DESCRIPTIONS:
            out.append(f"    {c.check:<21} {'PASS' if c.passed else 'FAIL':<11} -> {c.detail}")
    out.append("")
    if outcome.ok:
        out.append("RESULT: VALID. Every check passed; the order may be filled.")
    else:
        code = outcome.reason_code or "INVALID"
        out.append(f"RESULT: INVALID ({code}). The order may not be filled.")
        if outcome.reason:
            out.append(f"Reason: {outcome.reason}")
        elif code in ADVICE:
            out.append(f"Reason: {ADVICE[code]}")
    return "\n".join(out) + "\n"


__all__ = ["CHECK_DESCRIPTIONS", "build_verifier", "check_certificate_offline", "render", "render_certificate",
           "render_refusals", "reverify"]

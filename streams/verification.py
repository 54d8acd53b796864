"""Verification of a received CSOS order before a distributor may fill it.

Pure logic (no Kafka/Faust): the stream agent, the offline CLI, the benchmark
and the tests all call :meth:`Verifier.verify`. It implements what 21 CFR
1305.22(c), 1311.50 and 1311.55 require of a supplier, as an ordered list of
checks. The first failing check decides the reason code; every check made is
recorded so the rejection (1305.25: the purchaser is told why) and the audit
trail show the evidence.

Order of checks and reason codes::

    signature_format      MALFORMED_SIGNATURE     CMS unreadable, no signer certificate
    algorithms            WEAK_ALGORITHM          digest < SHA-256, RSA < 2048, EC < 256
    signature             BAD_SIGNATURE           document altered / signed with another key
    order_document        MALFORMED_ORDER         a 1305.21(b) element missing or malformed
    signing_time          SIGNING_TIME_MISMATCH   CMS signing-time vs the order's date > 24 h,
                                                  or signed more than 5 min after receipt
    certificate_path      UNTRUSTED_CERTIFICATE   no RFC 5280 path to a trust anchor; CA flag
                                                  on the leaf; no signing key usage; unknown
                                                  critical extension
    certificate_validity  CERT_EXPIRED /          a certificate in the path not valid AT THE
                          CERT_NOT_YET_VALID      SIGNING TIME (1311.50), not at receipt
    revocation            REVOCATION_UNKNOWN /    judged at receipt against the issuer's CRL;
                          CERT_REVOKED            no CRL or a CRL past nextUpdate fails closed
    dea_number            DEA_MISMATCH            certificate DEA != purchaser DEA, or bad check digit
    products              UNKNOWN_PRODUCT         an NDC not in the product master
    schedules             SCHEDULE_NOT_AUTHORIZED a line's schedule not in the certificate (1311.55(c)(9))
    order_age             ORDER_EXPIRED           received > 60 days after signing (1305.22(e))

Decisions worth knowing:

* The *signing time* is the CMS signing-time attribute when present (it is
  machine-made and covered by the signature), else the order's ``signed_at``.
  Both are signer-asserted (CSOS has no trusted timestamp), so they must agree
  within 24 hours: the order element is a "date", the attribute a clock reading.
* Certificate validity is judged at the signing time; revocation at receipt:
  a serial on the current CRL is refused whatever its revocation date, because
  the distributor now knows the key is not to be trusted (fail closed).
* ``REVOCATION_UNKNOWN`` and ``UNKNOWN_PRODUCT`` mean "cannot decide yet", not
  "defective": :data:`RETRYABLE` lists them so the stream can park the order
  and retry when a fresh CRL / product master arrives, instead of rejecting.
* Path validation (pyhanko-certvalidator) is cached per signer certificate and
  done at an instant inside the validity windows of the path, so it does not
  depend on the signing time or on CRLs; per order only the cheap checks run
  (validity at signing time for each certificate in the path, CRL lookup).
  The trust anchor's own validity is not checked (RFC 5280 6.1: an anchor is
  a name and a key).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator.errors import PathBuildingError, PathError, ValidationError
from pyhanko_certvalidator.validate import async_validate_path

from .cert_profile import CertProfileError, ExtensionOids, read_registration
from .cms import ParsedSignature, SignatureError, check_algorithms, parse_signed_data, verify_signature
from .identifiers import is_valid_dea_number
from .file_safety import ensure_private_to_owner
from .model import Order
from .documents import parse_document
from .order_document import FORMAT as CANONICAL_FORMAT, DocumentError
from .products import ProductMaster

# ---------------------------------------------------------------------------- reason codes
MALFORMED_SIGNATURE = "MALFORMED_SIGNATURE"
WEAK_ALGORITHM = "WEAK_ALGORITHM"
BAD_SIGNATURE = "BAD_SIGNATURE"
MALFORMED_ORDER = "MALFORMED_ORDER"
SIGNING_TIME_MISMATCH = "SIGNING_TIME_MISMATCH"
UNTRUSTED_CERTIFICATE = "UNTRUSTED_CERTIFICATE"
CERT_EXPIRED = "CERT_EXPIRED"
CERT_NOT_YET_VALID = "CERT_NOT_YET_VALID"
REVOCATION_UNKNOWN = "REVOCATION_UNKNOWN"
CERT_REVOKED = "CERT_REVOKED"
DEA_MISMATCH = "DEA_MISMATCH"
UNKNOWN_PRODUCT = "UNKNOWN_PRODUCT"
SCHEDULE_NOT_AUTHORIZED = "SCHEDULE_NOT_AUTHORIZED"
ORDER_EXPIRED = "ORDER_EXPIRED"

REASON_CODES = (
    MALFORMED_SIGNATURE, WEAK_ALGORITHM, BAD_SIGNATURE, MALFORMED_ORDER, SIGNING_TIME_MISMATCH,
    UNTRUSTED_CERTIFICATE, CERT_EXPIRED, CERT_NOT_YET_VALID, REVOCATION_UNKNOWN, CERT_REVOKED,
    DEA_MISMATCH, UNKNOWN_PRODUCT, SCHEDULE_NOT_AUTHORIZED, ORDER_EXPIRED,
)
#: Check names, in the order they run.
CHECKS = (
    "signature_format", "algorithms", "signature", "order_document", "signing_time",
    "certificate_path", "certificate_validity", "revocation", "dea_number", "products",
    "schedules", "order_age",
)
#: Codes that mean "cannot decide yet" (missing input on our side): retry, do not reject.
RETRYABLE = frozenset({REVOCATION_UNKNOWN, UNKNOWN_PRODUCT})

#: What the purchaser can do about each reason (the specific finding is prepended).
ADVICE = {
    MALFORMED_SIGNATURE: "Sign the order with your DEA CSOS certificate and send a new order.",
    WEAK_ALGORITHM: "Update your CSOS ordering software to sign with SHA-256 (or stronger) and an "
                    "RSA key of 2048+ bits or an ECDSA P-256+ key, then send a new order.",
    BAD_SIGNATURE: "The order cannot be filled or corrected; send a new signed order.",
    MALFORMED_ORDER: "Correct the order and send a new signed order (21 CFR 1305.25).",
    SIGNING_TIME_MISMATCH: "Check the clock and date settings of your ordering system, then sign and "
                           "send a new order.",
    UNTRUSTED_CERTIFICATE: "Sign with the CSOS signing certificate DEA issued you, then send a new order.",
    CERT_EXPIRED: "Renew your CSOS certificate with DEA, then send a new order.",
    CERT_NOT_YET_VALID: "Check your system clock or wait until your CSOS certificate is valid, then "
                        "send a new order.",
    REVOCATION_UNKNOWN: "The supplier could not confirm your certificate's revocation status (no current "
                        "revocation list), so the order was not filled; contact the supplier or send it again.",
    CERT_REVOKED: "Orders signed with a revoked certificate cannot be filled. Obtain a new CSOS "
                  "certificate from DEA and send a new order.",
    DEA_MISMATCH: "Sign the order with the CSOS certificate issued for the DEA registration that "
                  "places the order, then send a new order.",
    UNKNOWN_PRODUCT: "The supplier does not know an item on the order, so it was not filled; check the "
                     "NDC and send a new order, or contact the supplier.",
    SCHEDULE_NOT_AUTHORIZED: "Under 21 CFR 1311.55(c)(9) the whole order is invalid. Send a new order "
                             "without the item(s), or have your certificate updated to cover that schedule.",
    ORDER_EXPIRED: "Orders are void 60 days after signing (21 CFR 1305.22(e)); send a new order.",
}

SIGNING_TIME_TOLERANCE = timedelta(hours=24)
FUTURE_SKEW = timedelta(minutes=5)
MAX_ORDER_AGE = timedelta(days=60)
_PATH_CACHE_MAX = 100_000
_NEG_CACHE_MAX = 10_000


class CRLError(ValueError):
    """A CRL was refused: unknown issuer, bad signature, malformed or unsupported."""


@dataclass(frozen=True)
class CheckResult:
    check: str
    passed: bool
    detail: str


@dataclass
class Outcome:
    """The verifier's finding for one received order (ok, or the first failing reason)."""

    ok: bool
    reason_code: str | None
    reason: str | None
    order: Order | None
    checks: list[CheckResult]
    signer_serial: str | None = None  # hex
    signer_fingerprint: str | None = None  # SHA-256 of the signer certificate DER, hex
    signer_subject: str | None = None  # RFC 4514
    signed_at: datetime | None = None  # the signing time used (see module docstring)
    signer_cert_der: bytes | None = None  # to archive with the order (1311.55(c)(11))

    @property
    def retryable(self) -> bool:
        return self.reason_code in RETRYABLE


@dataclass
class _Chain:
    """Cached, time- and CRL-independent facts about one signer certificate."""

    error: str | None  # why the path is untrusted; None = trusted
    certs: tuple[x509.Certificate, ...] = ()  # leaf first, then CAs up to (excluding) the anchor
    issuer_fps: tuple[bytes, ...] = ()  # SHA-256 of each cert's issuer certificate (CRL lookup key)
    windows: tuple[tuple[datetime, datetime, str], ...] = ()  # (not_before, not_after, label)
    dea: str | None = None
    schedules: frozenset[str] = frozenset()
    registration_error: str | None = None
    subject: str | None = None
    serial_hex: str | None = None
    dea_valid: bool = False
    path_result: CheckResult | None = None
    dea_result: CheckResult | None = None


@dataclass
class _CrlEntry:
    crl: x509.CertificateRevocationList
    issuer_subject: str
    this_update: datetime
    next_update: datetime
    number: int | None
    revoked: dict[int, datetime] = field(default_factory=dict)


class _Fail(Exception):
    def __init__(self, code: str, check: str, finding: str, detail: str | None = None) -> None:
        super().__init__(finding)
        self.code, self.check, self.finding, self.detail = code, check, finding, detail or finding


def _fp(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _cn(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else name.rfc4514_string()


def _utc(dt: datetime, what: str) -> datetime:
    if dt.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return dt.astimezone(timezone.utc)


def _day(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M UTC")


_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None


def _run_sync(coro_factory):
    """Run a pyhanko coroutine to completion from sync code, even inside a running loop.

    The verifier is called synchronously from a Faust agent, where an event
    loop is already running and ``asyncio.run`` is not allowed; on a cache miss
    the coroutine then runs in a private thread (it does no I/O: fetching is off).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="csos-pathval")
    return _EXECUTOR.submit(lambda: asyncio.run(coro_factory())).result()


class Verifier:
    """Verifies signed CSOS orders against trust anchors, CRLs and the product master."""

    def __init__(self, trust_anchors: list[x509.Certificate], intermediates: list[x509.Certificate],
                 crls: list[x509.CertificateRevocationList], products: ProductMaster,
                 oids: ExtensionOids | None = None, *, require_ca_crls: bool = False) -> None:
        """``require_ca_crls``: also fail closed when an intermediate CA's issuer has no CRL
        loaded (by default only the signer's issuing CA must have a current CRL)."""
        if not trust_anchors:
            raise ValueError("at least one trust anchor (the CSOS root) is required")
        self.products = products
        self.oids = oids or ExtensionOids.from_env()
        self.require_ca_crls = require_ca_crls
        self._anchors = list(trust_anchors)
        self._intermediates = list(intermediates)
        self._anchors_a = [asn1_x509.Certificate.load(_der(c)) for c in self._anchors]
        self._intermediates_a = [asn1_x509.Certificate.load(_der(c)) for c in self._intermediates]
        self._anchor_fps = {_fp(_der(c)) for c in self._anchors}
        self._paths: OrderedDict[bytes, _Chain] = OrderedDict()
        self._untrusted: OrderedDict[tuple[bytes, tuple[bytes, ...]], _Chain] = OrderedDict()
        self._crls: dict[bytes, _CrlEntry] = {}
        self._ca_paths: dict[bytes, str | None] = {}
        for crl in crls:
            self.update_crl(crl)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pki_dir(cls, path: str | Path, products: ProductMaster, oids: ExtensionOids | None = None,
                     **kw) -> "Verifier":
        """Load ``trust/root*.pem`` as anchors, other ``trust/*.pem`` as intermediates, ``crl/*``.

        Raises :class:`~streams.file_safety.UnsafeFileError` (the worker does not start) if the trust
        directory or a certificate in it is writable by group/others or owned by another non-root user:
        whoever can write there can plant a CA. (CRLs are checked by signature, so need no such care.)
        """
        d = Path(path)
        anchors: list[x509.Certificate] = []
        inters: list[x509.Certificate] = []
        trust = d / "trust"
        if trust.is_dir():
            ensure_private_to_owner(trust, "trust directory")
        for p in sorted(trust.glob("*.pem")):
            ensure_private_to_owner(p, "trust anchor" if p.name.startswith("root") else "CA certificate")
            certs = x509.load_pem_x509_certificates(p.read_bytes())
            (anchors if p.name.startswith("root") else inters).extend(certs)
        crls = []
        crl_dir = d / "crl"
        if crl_dir.is_dir():
            for p in sorted(crl_dir.iterdir()):
                if p.suffix.lower() in (".crl", ".pem", ".der"):
                    crls.append(_load_crl(p.read_bytes()))
        return cls(anchors, inters, crls, products, oids, **kw)

    # ------------------------------------------------------------------ CRLs
    def update_crl(self, crl: x509.CertificateRevocationList | bytes) -> bool:
        """Verify ``crl`` and make it the current CRL for its issuer.

        Refuses (``CRLError``) a CRL whose issuer is not a known CA (configured, or
        learned from a signature whose path validated), whose
        signature does not verify with that CA's key, which lacks nextUpdate,
        is a delta or partial CRL, or carries an unknown critical extension.
        A CRL older than the one held (thisUpdate / CRL number) is ignored so
        replays cannot roll revocations back; returns whether it was installed.
        A stale CRL is accepted here: orders received after its nextUpdate get
        REVOCATION_UNKNOWN.
        """
        if isinstance(crl, (bytes, bytearray)):
            try:
                crl = _load_crl(bytes(crl))
            except ValueError as exc:
                raise CRLError(f"unreadable CRL ({exc})") from None
        issuer_name = _cn(crl.issuer)
        candidates = [c for c in self._anchors + self._intermediates if c.subject == crl.issuer]
        if not candidates:
            raise CRLError(f"CRL issuer {crl.issuer.rfc4514_string()} is not a known CA")
        issuer = next((c for c in candidates if crl.is_signature_valid(c.public_key())), None)
        if issuer is None:
            raise CRLError(f"CRL claiming to be from {issuer_name} is not signed by that CA's key")
        h = crl.signature_hash_algorithm
        if isinstance(h, (hashes.SHA1, hashes.MD5)):
            raise CRLError(f"CRL from {issuer_name} is signed with {h.name.upper()}")
        try:
            ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.crl_sign:
                raise CRLError(f"{issuer_name} is not allowed to sign CRLs (no cRLSign key usage)")
        except x509.ExtensionNotFound:
            pass
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
        if next_update is None:
            raise CRLError(f"CRL from {issuer_name} has no nextUpdate; its freshness cannot be judged")
        if next_update <= this_update:
            raise CRLError(f"CRL from {issuer_name} has nextUpdate {next_update} not after thisUpdate {this_update}")
        number = None
        for ext in crl.extensions:
            if isinstance(ext.value, x509.CRLNumber):
                number = ext.value.crl_number
            elif isinstance(ext.value, x509.DeltaCRLIndicator):
                raise CRLError(f"delta CRL from {issuer_name} is not supported; send the full CRL")
            elif isinstance(ext.value, x509.IssuingDistributionPoint):
                idp = ext.value
                if (idp.only_contains_ca_certs or idp.only_contains_attribute_certs
                        or idp.indirect_crl or idp.only_some_reasons):
                    raise CRLError(f"partial/indirect CRL from {issuer_name} is not supported")
            elif ext.critical and not isinstance(ext.value, x509.AuthorityKeyIdentifier):
                raise CRLError(f"CRL from {issuer_name} has unsupported critical extension {ext.oid.dotted_string}")
        issuer_fp = _fp(_der(issuer))
        if issuer_fp not in self._anchor_fps:
            err = self._ca_path_error(issuer, this_update)
            if err:
                raise CRLError(f"CRL issuer {issuer_name} does not chain to a trust anchor: {err}")
        current = self._crls.get(issuer_fp)
        if current is not None and (this_update < current.this_update or (
                number is not None and current.number is not None and number < current.number)):
            return False
        revoked = {rc.serial_number: rc.revocation_date_utc for rc in crl}
        self._crls[issuer_fp] = _CrlEntry(crl, issuer_name, this_update, next_update, number, revoked)
        return True

    def _ca_path_error(self, ca: x509.Certificate, moment: datetime) -> str | None:
        fp = _fp(_der(ca))
        if fp not in self._ca_paths:
            try:
                self._ca_paths[fp] = None
                self._pkix(asn1_x509.Certificate.load(_der(ca)), [], moment)
            except _Untrusted as exc:
                self._ca_paths[fp] = str(exc)
        return self._ca_paths[fp]

    # ------------------------------------------------------------------ path validation
    def _pkix(self, leaf: asn1_x509.Certificate, extra: list[asn1_x509.Certificate],
              moment: datetime) -> list[asn1_x509.Certificate]:
        """RFC 5280 path to an anchor, validated at an instant inside every window of the path.

        Returns the path certificates from the leaf up, excluding the anchor.
        Revocation is not checked here (soft-fail, no CRLs): it is judged per
        order at receipt. Raises ``_Untrusted``.
        """
        anchors, others = self._anchors_a, self._intermediates_a + extra

        async def run() -> list[asn1_x509.Certificate]:
            ctx = ValidationContext(trust_roots=anchors, other_certs=others, moment=moment,
                                    revocation_mode="soft-fail")
            errors: list[str] = []
            try:
                paths = await ctx.path_builder.async_build_paths(leaf)
            except PathBuildingError:
                raise _Untrusted("it is not issued by the CSOS certification authority "
                                 "(no chain to a trusted root)") from None
            for path in paths:
                certs = list(path.iter_certs(include_root=False))
                lo = max(c["tbs_certificate"]["validity"]["not_before"].native for c in certs)
                hi = min(c["tbs_certificate"]["validity"]["not_after"].native for c in certs)
                if lo > hi:
                    errors.append("the certificate's validity period does not overlap its issuer's")
                    continue
                at = min(max(moment, lo), hi)
                vctx = ValidationContext(trust_roots=anchors, other_certs=others, moment=at,
                                         revocation_mode="soft-fail")
                try:
                    await async_validate_path(vctx, path)
                except (ValidationError, PathError) as exc:
                    errors.append(str(exc))
                    continue
                return list(reversed(certs))
            raise _Untrusted(errors[0] if errors else "no certification path")

        try:
            return _run_sync(run)
        except _Untrusted:
            raise
        except Exception as exc:  # fail closed on anything the path validator trips over
            raise _Untrusted(f"the certificate path could not be validated ({exc.__class__.__name__}: {exc})") from None

    def _chain_for(self, parsed: ParsedSignature, leaf_fp: bytes, moment: datetime) -> _Chain:
        chain = self._paths.get(leaf_fp)
        if chain is not None:
            self._paths.move_to_end(leaf_fp)
            return chain
        extras = [_der(c) for c in parsed.other_certs]
        neg_key = (leaf_fp, tuple(sorted(_fp(d) for d in extras)))
        chain = self._untrusted.get(neg_key)
        if chain is not None:
            return chain
        chain = self._build_chain(parsed, extras, moment)
        if chain.error is None:
            self._paths[leaf_fp] = chain
            if len(self._paths) > _PATH_CACHE_MAX:
                self._paths.popitem(last=False)
        else:
            self._untrusted[neg_key] = chain
            if len(self._untrusted) > _NEG_CACHE_MAX:
                self._untrusted.popitem(last=False)
        return chain

    def _build_chain(self, parsed: ParsedSignature, extras: list[bytes], moment: datetime) -> _Chain:
        leaf = parsed.signer_cert
        base = dict(subject=leaf.subject.rfc4514_string(), serial_hex=format(leaf.serial_number, "x"))
        try:
            path_a = self._pkix(asn1_x509.Certificate.load(parsed.signer_cert_der),
                                [asn1_x509.Certificate.load(d) for d in extras], moment)
        except _Untrusted as exc:
            return _Chain(error=str(exc), **base)
        # Leaf profile: a registrant signing certificate, not a CA, with a signing key usage.
        try:
            bc = leaf.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
            if bc.ca:
                return _Chain(error="it is a CA certificate (basicConstraints CA=TRUE), "
                                    "not a registrant signing certificate", **base)
        except x509.ExtensionNotFound:
            pass
        try:
            ku = leaf.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE).value
        except x509.ExtensionNotFound:
            return _Chain(error="it has no key usage extension, so it is not a CSOS signing certificate", **base)
        if not (ku.digital_signature or ku.content_commitment):
            return _Chain(error="its key usage does not allow signing (needs digitalSignature "
                                "or nonRepudiation)", **base)
        certs = (leaf,) + tuple(x509.load_der_x509_certificate(c.dump()) for c in path_a[1:])
        self._learn_intermediates(certs[1:])
        issuer_fps: list[bytes] = []
        for i, c in enumerate(certs):
            issuer = certs[i + 1] if i + 1 < len(certs) else _issuer_anchor(c, self._anchors)
            issuer_fps.append(_fp(_der(issuer)) if issuer is not None else b"")
        windows = tuple((c.not_valid_before_utc, c.not_valid_after_utc,
                         "your CSOS certificate" if i == 0 else f"the issuing CA certificate ({_cn(c.subject)})")
                        for i, c in enumerate(certs))
        dea, schedules, reg_err = None, frozenset(), None
        try:
            dea, schedules = read_registration(leaf, self.oids)
        except CertProfileError as exc:
            reg_err = str(exc)
        return _Chain(error=None, certs=certs, issuer_fps=tuple(issuer_fps), windows=windows, dea=dea,
                      schedules=schedules, registration_error=reg_err,
                      dea_valid=dea is not None and is_valid_dea_number(dea),
                      path_result=CheckResult("certificate_path", True,
                                              f"path of {len(certs)} certificate(s) to a trusted CSOS root"),
                      dea_result=CheckResult("dea_number", True, f"certificate and order both name {dea}"),
                      **base)

    def _learn_intermediates(self, cas: Iterable[x509.Certificate]) -> None:
        """Remember CA certificates that arrived in a signature and validated to an anchor,
        so that their CRLs can be verified and installed (``update_crl``) afterwards."""
        known = {_fp(_der(c)) for c in self._anchors + self._intermediates}
        for ca in cas:
            fp = _fp(_der(ca))
            if fp not in known:
                self._intermediates.append(ca)
                self._intermediates_a.append(asn1_x509.Certificate.load(_der(ca)))
                self._ca_paths[fp] = None
                known.add(fp)

    # ------------------------------------------------------------------ the checks
    def verify(self, document: bytes | None, signature: bytes, received_at: datetime,
               fmt: str = CANONICAL_FORMAT) -> Outcome:
        """Run every check in order; stop at the first failure. Never raises for bad input."""
        received_at = _utc(received_at, "received_at")
        checks: list[CheckResult] = []
        out = Outcome(ok=False, reason_code=None, reason=None, order=None, checks=checks)
        try:
            self._run(document, signature, received_at, out, fmt)
        except _Fail as f:
            checks.append(CheckResult(f.check, False, f.detail))
            out.reason_code = f.code
            out.reason = f"{f.finding} {ADVICE[f.code]}"
            return out
        out.ok = True
        return out

    def _run(self, document: bytes | None, signature: bytes, received_at: datetime, out: Outcome,
             fmt: str = CANONICAL_FORMAT) -> None:
        ok = out.checks.append

        # 1. CMS structure, signer certificate present
        try:
            parsed = parse_signed_data(signature, document)
        except SignatureError as exc:
            check = "signature" if exc.code == BAD_SIGNATURE else "signature_format"
            raise _Fail(exc.code, check, _finding(exc)) from None
        leaf_fp = _fp(parsed.signer_cert_der)
        out.signer_fingerprint = leaf_fp.hex()
        out.signer_cert_der = parsed.signer_cert_der
        cached = self._paths.get(leaf_fp)
        if cached is not None:
            out.signer_serial, out.signer_subject = cached.serial_hex, cached.subject
        else:
            out.signer_serial = format(parsed.signer_cert.serial_number, "x")
            out.signer_subject = parsed.signer_cert.subject.rfc4514_string()
        ok(_PASS_FORMAT)

        # 2-3. algorithms, digest and signature
        try:
            check_algorithms(parsed)
        except SignatureError as exc:
            raise _Fail(exc.code, "algorithms", _finding(exc)) from None
        ok(_pass_algorithms(parsed.signature_algorithm, parsed.signature_hash))
        try:
            verify_signature(parsed, check_strength=False)
        except SignatureError as exc:
            raise _Fail(exc.code, "signature", _finding(exc)) from None
        ok(_PASS_SIGNATURE)

        # 4. order document
        try:
            order = parse_document(parsed.content, fmt)
        except DocumentError as exc:
            raise _Fail(MALFORMED_ORDER, "order_document",
                        f"The order is defective: element '{exc.element}': {exc}.") from None
        out.order = order
        ok(CheckResult("order_document", True, f"order {order.order_number}, {len(order.lines)} line(s)"))

        # 5. signing time
        signed_doc = order.signed_at
        signed_at = parsed.signing_time or signed_doc
        out.signed_at = signed_at
        if parsed.signing_time is not None and abs(parsed.signing_time - signed_doc) > SIGNING_TIME_TOLERANCE:
            raise _Fail(SIGNING_TIME_MISMATCH, "signing_time",
                        f"The order is dated {_day(signed_doc)} but the signature was made "
                        f"{_day(parsed.signing_time)}, more than 24 hours apart.")
        if signed_at > received_at + FUTURE_SKEW:
            raise _Fail(SIGNING_TIME_MISMATCH, "signing_time",
                        f"The order claims to be signed {_day(signed_at)}, after it was received "
                        f"({_day(received_at)}).")
        ok(CheckResult("signing_time", True, f"signed {signed_at.isoformat()}"
                       + ("" if parsed.signing_time else " (order date; no CMS signing-time attribute)")))

        # 6. certificate path
        chain = self._chain_for(parsed, leaf_fp, signed_at)
        out.signer_subject = chain.subject
        if chain.error is not None:
            raise _Fail(UNTRUSTED_CERTIFICATE, "certificate_path",
                        f"The signing certificate is not a valid DEA CSOS certificate: {chain.error}.")
        ok(chain.path_result)

        # 7. validity at the signing time (1311.50)
        for nb, na, label in chain.windows:
            if signed_at > na:
                raise _Fail(CERT_EXPIRED, "certificate_validity",
                            f"The order was signed {_day(signed_at)}, but {label} expired {_day(na)}.")
            if signed_at < nb:
                raise _Fail(CERT_NOT_YET_VALID, "certificate_validity",
                            f"The order was signed {_day(signed_at)}, before {label} became valid {_day(nb)}.")
        ok(_PASS_VALIDITY)

        # 8. revocation, at receipt
        self._check_revocation(chain, received_at)
        ok(_PASS_REVOCATION)

        # 9. DEA number
        purchaser = order.purchaser.dea_number
        if chain.registration_error:
            raise _Fail(DEA_MISMATCH, "dea_number",
                        f"The signing certificate's DEA registration data is unreadable ({chain.registration_error}).")
        if chain.dea is None:
            raise _Fail(DEA_MISMATCH, "dea_number", "The signing certificate carries no DEA number.")
        if not chain.dea_valid:
            raise _Fail(DEA_MISMATCH, "dea_number",
                        f"The DEA number in the signing certificate ({chain.dea}) is not a valid DEA number.")
        if chain.dea != purchaser:
            raise _Fail(DEA_MISMATCH, "dea_number",
                        f"The order is placed for DEA number {purchaser}, but the signing certificate "
                        f"belongs to DEA number {chain.dea}.")
        ok(chain.dea_result)

        # 10-11. products and schedules (1311.55(c)(9))
        products = [(ln, self.products.get(ln.ndc)) for ln in order.lines]
        unknown = [ln for ln, p in products if p is None]
        if unknown:
            listed = "; ".join(f"line {ln.line_no} NDC {ln.ndc}" for ln in unknown)
            raise _Fail(UNKNOWN_PRODUCT, "products", f"The order names product(s) the supplier does not know: {listed}.")
        ok(CheckResult("products", True, f"{len(products)} line(s) found in the product master"))
        # The schedule in force on the signing date (a rescheduled product keeps its old schedule before).
        on = signed_at
        refused = [(ln, p) for ln, p in products
                   if self.products.schedule(p, on) not in chain.schedules]  # type: ignore[arg-type]
        if refused:
            listed = "; ".join(f"line {ln.line_no} NDC {ln.ndc} ({ln.product_name}) is schedule "
                               f"{self.products.schedule(p, on)}" for ln, p in refused)  # type: ignore[arg-type]
            allowed = ", ".join(sorted(chain.schedules)) or "none"
            raise _Fail(SCHEDULE_NOT_AUTHORIZED, "schedules",
                        f"Your CSOS certificate does not authorize these item(s): {listed}. "
                        f"It authorizes schedules: {allowed}.")
        ok(_PASS_SCHEDULES)

        # 12. order age (1305.22(e))
        if received_at - signed_at > MAX_ORDER_AGE:
            raise _Fail(ORDER_EXPIRED, "order_age",
                        f"The order was signed {_day(signed_at)} and received {_day(received_at)}, "
                        f"more than 60 days later.")
        ok(CheckResult("order_age", True, f"received {(received_at - signed_at).days} day(s) after signing"))

    def _check_revocation(self, chain: _Chain, received_at: datetime) -> None:
        for i, (cert, issuer_fp) in enumerate(zip(chain.certs, chain.issuer_fps)):
            entry = self._crls.get(issuer_fp)
            if entry is not None and received_at <= entry.next_update \
                    and cert.serial_number not in entry.revoked:
                continue  # the common case: fresh CRL, not listed
            if entry is None and i > 0 and not self.require_ca_crls:
                continue  # CA certificates are checked only when their issuer's CRL is loaded
            label = "your CSOS certificate" if i == 0 else f"the CA certificate {_cn(cert.subject)}"
            if entry is None:
                raise _Fail(REVOCATION_UNKNOWN, "revocation",
                            f"The supplier has no revocation list from {_cn(cert.issuer)} to check "
                            f"{label} against.")
            if received_at > entry.next_update:
                raise _Fail(REVOCATION_UNKNOWN, "revocation",
                            f"The supplier's revocation list from {entry.issuer_subject} expired "
                            f"{_day(entry.next_update)}, before the order was received {_day(received_at)}.")
            when = entry.revoked.get(cert.serial_number)
            if when is not None:
                raise _Fail(CERT_REVOKED, "revocation",
                            f"{label[0].upper()}{label[1:]} (serial {format(cert.serial_number, 'x')}) was "
                            f"revoked {_day(when)}.")


class _Untrusted(Exception):
    pass


# Shared results for checks whose passing detail never varies (CheckResult is frozen);
# building a dozen result strings per order is a measurable share of the verify cost.
_PASS_FORMAT = CheckResult("signature_format", True, "CMS SignedData with one signer and its certificate")
_PASS_SIGNATURE = CheckResult("signature", True, "message digest matches the document; signature "
                                                 "verifies with the signer certificate's key")
_PASS_VALIDITY = CheckResult("certificate_validity", True,
                             "every certificate in the path was valid when the order was signed")
_PASS_REVOCATION = CheckResult("revocation", True, "not on the issuer's current revocation list at receipt")
_PASS_SCHEDULES = CheckResult("schedules", True, "every line's schedule is authorized by the certificate")


_ALG_RESULTS: dict[tuple[str, str], CheckResult] = {}


def _pass_algorithms(sig_alg: str, sig_hash: str) -> CheckResult:
    r = _ALG_RESULTS.get((sig_alg, sig_hash))
    if r is None:
        r = _ALG_RESULTS[(sig_alg, sig_hash)] = CheckResult("algorithms", True, f"{sig_alg} with {sig_hash}")
    return r


def _finding(exc: SignatureError) -> str:
    msg = exc.message
    return f"{msg[0].upper()}{msg[1:]}."


def _issuer_anchor(cert: x509.Certificate, anchors: list[x509.Certificate]) -> x509.Certificate | None:
    """The trust anchor that signed ``cert`` (the path validator proved one did)."""
    for a in anchors:
        if a.subject == cert.issuer:
            try:
                cert.verify_directly_issued_by(a)
                return a
            except Exception:  # wrong key for a same-named anchor: try the next
                continue
    return None


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


# ---------------------------------------------------------------------------- enrichment
def enrich_lines(order: Order, products: ProductMaster) -> list[dict]:
    """Order lines as ``csos.orders.OrderLine`` Avro records (schemas/avro/order_line.avsc).

    Name, strength and quantities are what the purchaser signed; schedule,
    drug family, base weight and MME come from the product master. Raises
    ``KeyError`` for an NDC the master lacks (verify() refuses those first).
    """
    lines = []
    for ln in order.lines:
        p = products.get(ln.ndc)
        if p is None:
            raise KeyError(f"line {ln.line_no}: NDC {ln.ndc} is not in the product master")
        units = ln.dosage_units
        lines.append({
            "line_no": ln.line_no,
            "ndc": p.ndc,
            "product_name": ln.product_name,
            "strength": ln.strength,
            "package_quantity": ln.package_quantity,
            "packages": ln.packages,
            "dosage_units": units,
            "schedule": products.schedule(p, order.signed_at),  # in force on the signing date
            "drug_family": p.drug_family,
            "base_weight_g": float(p.base_weight_g(units)),
            "mme": float(p.mme(units)),
        })
    return lines


__all__ = [
    "ADVICE", "CHECKS", "CRLError", "CheckResult", "Outcome", "REASON_CODES", "RETRYABLE", "Verifier",
    "enrich_lines", *REASON_CODES,
]

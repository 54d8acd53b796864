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
    revocation            REVOCATION_UNKNOWN /    RFC 5280 6.3 at receipt for EVERY certificate of
                          CERT_REVOKED            the path (CAs too); no covering CRL or one past
                                                  nextUpdate fails closed (no soft-fail)
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
  ignores validity periods, so it does not depend on the signing time or on
  CRLs; validity is then judged per order at the signing time for each
  certificate of the path. Revocation (pyhanko-certvalidator's RFC 5280 6.3 CRL
  processing: scope, indirect and delta CRLs, separate CRL-signing keys) is
  cached per signer for the current CRL set and the span of receipt times in
  which no held CRL starts or stops being current; a CA's passing verdict is
  cached the same way per CA path, so a new signer under a checked CA costs
  only its own certificate's CRL check. The trust anchor's own
  validity is not checked (RFC 5280 6.1: an anchor is a name and a key).
* A CRL that cannot be used never raises out of the constructor or
  ``from_pki_dir``: it is listed in ``Verifier.refusals``; ``update_crl`` raises
  ``CrlRefused`` (= ``CRLError``) for the stream, which audits it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator._state import ValProcState
from pyhanko_certvalidator.errors import (CRLNoMatchesError, CRLValidationIndeterminateError, PathBuildingError,
                                          PathError, RevokedError, ValidationError)
from pyhanko_certvalidator.ltv.types import ValidationTimingInfo, ValidationTimingParams
from pyhanko_certvalidator.path import ValidationPath
from pyhanko_certvalidator.registry import SimpleTrustManager
from pyhanko_certvalidator.policy_decl import CertRevTrustPolicy, RevocationCheckingPolicy, RevocationCheckingRule
from pyhanko_certvalidator.revinfo.validate_crl import verify_crl
from pyhanko_certvalidator.util import ConsList
from pyhanko_certvalidator.validate import async_validate_path

from streams.domain.cert_profile import CertProfileError, ExtensionOids, read_registration
from streams.domain.cms import SignatureError, check_algorithms, parse_signed_data, verify_signature
from streams.domain.crl import load_crl
from streams.domain.identifiers import is_valid_dea_number
from streams.core.file_safety import ensure_private_to_owner
from streams.domain.model import Order
from streams.domain.documents import parse_document
from streams.domain.order_document import FORMAT as CANONICAL_FORMAT, DocumentError
from streams.domain.products import ProductMaster
from streams.core.errors import CsosError
from streams.verification import name_cache

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
# pyhanko-certvalidator logs a refused CRL issuer path as a WARNING with a traceback; the same
# reason is in the verifier's finding, and ``verify-offline`` must print no traceback.
logging.getLogger("pyhanko_certvalidator.revinfo.validate_crl").setLevel(logging.ERROR)
# RFC 5280 name matching, computed once per distinct name (see streams.verification.name_cache).
name_cache.install()

_PATH_CACHE_MAX = 100_000
_NEG_CACHE_MAX = 10_000
_MAX_PATHS = 8  # candidate paths validated per certificate (key rollover gives a few; more is an attack)
#: Path validation ignores validity periods (judged at the signing time instead): a tolerance longer
#: than any certificate's life.
_ANY_VALIDITY = timedelta(days=365 * 300)
_MIN_TIME = datetime(1, 1, 2, tzinfo=timezone.utc)
_MAX_TIME = datetime(9999, 12, 30, tzinfo=timezone.utc)
#: A cached revocation verdict is reused only this far from any CRL's thisUpdate/nextUpdate
#: (more than pyhanko's one-second tolerance), so a cached verdict never straddles a boundary.
_CRL_TIME_PAD = timedelta(seconds=5)
#: RFC 5280 6.3 for every certificate of the path, CRLs only, no soft-fail. Retroactive: a CRL
#: issued after receipt still counts (an offline re-verification with a later CRL, clock skew);
#: only a CRL whose nextUpdate passed before receipt is too old.
_CRL_REQUIRED = CertRevTrustPolicy(RevocationCheckingPolicy(RevocationCheckingRule.CRL_REQUIRED,
                                                            RevocationCheckingRule.CRL_REQUIRED),
                                   retroactive_revinfo=True)



class CRLError(CsosError, ValueError):
    """A CRL was refused: unreadable, unknown issuer, not signed by that issuer's key, issuer without
    cRLSign, delta CRL without its base, weak signature hash, unknown critical extension."""
    code = "CRL_REFUSED"


#: The name the stream side uses for a refused CRL (the same class: ``except CrlRefused`` catches both).
CrlRefused = CRLError


@dataclass(frozen=True)
class Refusal:
    """Trust material the verifier could not use: reported (audit ``crl.refused``, a report line), never raised.

    ``kind`` is ``"crl"`` or ``"certificate"``; ``source`` the file it came from ("" if given in memory).
    """

    kind: str
    source: str
    reason: str


@dataclass(frozen=True)
class CheckResult:
    check: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class CertificateFinding:
    """The certificate part of a verification (path, validity, revocation) for one certificate."""

    ok: bool
    reason_code: str | None
    reason: str | None
    checks: list[CheckResult]


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
    refusals: list[Refusal] = field(default_factory=list)  # offline: trust material that could not be used

    @property
    def retryable(self) -> bool:
        return self.reason_code in RETRYABLE


@dataclass(frozen=True)
class _Path:
    """One RFC 5280 path that validated (signatures, names, constraints, policies) to an anchor."""

    vpath: ValidationPath  # pyhanko's path: anchor, CAs, leaf (what the revocation check walks)
    certs: tuple[x509.Certificate, ...]  # leaf first, then CAs up to (excluding) the anchor
    windows: tuple[tuple[datetime, datetime, str], ...]  # (not_before, not_after, label), leaf first
    result: CheckResult
    #: SHA-256 of each certificate in pyhanko's order (anchor first, leaf last): ``fps[:i + 1]`` names
    #: the path down to the CA at ``vpath[i]``, the key of that CA's cached revocation verdict.
    fps: tuple[bytes, ...] = ()


@dataclass
class _Chain:
    """Cached, time- and CRL-independent facts about one signer certificate."""

    error: str | None  # why no RFC 5280 path exists; None = a path validated
    profile_error: str | None = None  # why it is not a CSOS signing certificate (CA flag, key usage)
    paths: tuple[_Path, ...] = ()  # every validated path, those whose windows overlap first
    dea: str | None = None
    schedules: frozenset[str] = frozenset()
    registration_error: str | None = None
    subject: str | None = None
    serial_hex: str | None = None
    dea_valid: bool = False
    dea_result: CheckResult | None = None


@dataclass(frozen=True)
class _HeldCrl:
    """A CRL in force: the newest admitted one for its (issuer, signing key, scope, delta) slot."""

    der: bytes
    asn1: asn1_crl.CertificateList
    issuer: str
    number: int | None
    this_update: datetime
    next_update: datetime


@dataclass(frozen=True)
class _RevVerdict:
    """A cached revocation result: valid for this CRL-set generation and receipt times in [lo, hi]."""

    generation: int
    lo: datetime
    hi: datetime
    fail: "_Fail | None"

    def holds(self, generation: int, received_at: datetime) -> bool:
        """Whether the verdict still stands: the same CRL-set generation and a receipt time inside its span."""
        return self.generation == generation and self.lo <= received_at <= self.hi



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


_LOOPS = threading.local()


def _private_loop() -> asyncio.AbstractEventLoop:
    """This thread's own event loop for pyhanko's coroutines, made once and reused.

    ``asyncio.run`` makes and tears down a loop per call (about a millisecond, paid on every
    path or revocation cache miss); the coroutines do no I/O and leave no tasks behind, so one
    loop per thread, never the caller's, serves them all.
    """
    loop = getattr(_LOOPS, "loop", None)
    if loop is None or loop.is_closed():
        loop = _LOOPS.loop = asyncio.new_event_loop()
    return loop


def _run_sync(coro_factory):
    """Run a pyhanko coroutine to completion from sync code, even inside a running loop.

    The verifier is called synchronously from a Faust agent, where an event
    loop is already running and cannot be re-entered; on a cache miss
    the coroutine then runs in a private thread (it does no I/O: fetching is off).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _private_loop().run_until_complete(coro_factory())
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="csos-pathval")
    return _EXECUTOR.submit(lambda: _private_loop().run_until_complete(coro_factory())).result()



class Verifier:
    """Verifies signed CSOS orders against trust anchors, CRLs and the product master."""

    def __init__(self, trust_anchors: list[x509.Certificate], intermediates: list[x509.Certificate],
                 crls: Iterable[x509.CertificateRevocationList | bytes], products: ProductMaster,
                 oids: ExtensionOids | None = None, *, refusals: Iterable[Refusal] = ()) -> None:
        """Every certificate of a path (the signer's and each CA's) needs a current CRL from an
        authority that RFC 5280 6.3 accepts for it; there is no soft-fail.

        A CRL in ``crls`` that cannot be used is not raised: it lands in :attr:`refusals` (with
        the ``refusals`` given by a loader, e.g. unreadable files), which the worker audits and
        ``verify-offline`` prints.
        """
        if not trust_anchors:
            raise ValueError("at least one trust anchor (the CSOS root) is required")
        self.products = products
        self.oids = oids or ExtensionOids.from_env()
        self.refusals: list[Refusal] = list(refusals)
        self._anchors = list(trust_anchors)
        self._intermediates = list(intermediates)
        self._anchors_a = [_asn1_cert(_der(c)) for c in self._anchors]
        # The anchors never change after construction, and pyhanko only reads a built trust manager:
        # one shared by every validation context saves re-hashing the anchors' names per cache miss.
        self._trust = SimpleTrustManager.build(trust_roots=self._anchors_a)
        self._intermediates_a = [_asn1_cert(_der(c)) for c in self._intermediates]
        self._known_fps = {_fp(_der(c)) for c in self._anchors + self._intermediates}
        self._anchor_fps = {_fp(_der(c)) for c in self._anchors}
        self._paths: OrderedDict[bytes, _Chain] = OrderedDict()
        self._untrusted: OrderedDict[tuple[bytes, tuple[bytes, ...]], _Chain] = OrderedDict()
        self._ca_paths: dict[bytes, str | None] = {}
        # CRLs in force, one per (issuer name, signing key, issuingDistributionPoint, is-delta) slot.
        self._crls: dict[tuple[bytes, bytes, bytes, bool], _HeldCrl] = {}
        self._crl_list: list[asn1_crl.CertificateList] = []
        self._crl_bounds: list[datetime] = []
        self._generation = 0  # bumped by every CRL that takes effect: invalidates every cached verdict
        self._revocation: OrderedDict[tuple[bytes, int], _RevVerdict] = OrderedDict()
        # A CA's passing revocation verdict, shared by every signer under it (see _ca_revocation_ok).
        self._ca_revocation: OrderedDict[tuple[bytes, ...], _RevVerdict] = OrderedDict()
        parsed: list[tuple[str, x509.CertificateRevocationList]] = []
        for c in crls:
            if isinstance(c, (bytes, bytearray)):
                try:
                    c = load_crl(bytes(c))
                except Exception as exc:  # noqa: BLE001 - reported, never raised out of the constructor
                    self.refusals.append(Refusal("crl", "", f"unreadable CRL ({_short(exc)})"))
                    continue
            parsed.append(("", c))
        self._admit(parsed)

    def _admit(self, crls: list[tuple[str, x509.CertificateRevocationList]]) -> None:
        """Admit CRLs (complete ones before deltas, so a delta finds its base whatever the file
        order), recording each refused one in :attr:`refusals` instead of raising."""
        for source, crl in sorted(crls, key=lambda sc: _is_delta(sc[1])):
            try:
                self.update_crl(crl)
            except CRLError as exc:
                self.refusals.append(Refusal("crl", source, str(exc)))

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pki_dir(cls, path: str | Path, products: ProductMaster, oids: ExtensionOids | None = None,
                     **kw) -> "Verifier":
        """Load ``trust/root*.pem`` as anchors, other ``trust/*.pem`` as intermediates, ``crl/*``.

        Raises :class:`~streams.core.file_safety.UnsafeFileError` (the worker does not start) if the trust
        directory or a certificate in it is writable by group/others or owned by another non-root user:
        whoever can write there can plant a CA. (CRLs are checked by signature, so need no such care.)
        An unreadable certificate or CRL file is reported in :attr:`refusals`, not raised.
        """
        d = Path(path)
        trust = d / "trust"
        if trust.is_dir():
            ensure_private_to_owner(trust, "trust directory")
        for p in sorted(trust.glob("*.pem")):
            ensure_private_to_owner(p, "trust anchor" if p.name.startswith("root") else "CA certificate")
        crl_dir = d / "crl"
        crl_files = sorted(p for p in crl_dir.iterdir() if p.suffix.lower() in (".crl", ".pem", ".der")) \
            if crl_dir.is_dir() else []
        return cls.from_files(sorted(trust.glob("*.pem")), crl_files, products, oids, **kw)

    @classmethod
    def from_files(cls, cert_files: Iterable[Path], crl_files: Iterable[Path], products: ProductMaster,
                   oids: ExtensionOids | None = None, **kw) -> "Verifier":
        """A Verifier from PEM certificate files (``root*.pem`` anchors, others intermediates) and CRL
        files (DER or PEM). Unreadable files are reported in :attr:`refusals`; raises ``ValueError`` only
        when no trust anchor could be read (nothing can be verified then)."""
        anchors: list[x509.Certificate] = []
        inters: list[x509.Certificate] = []
        refusals: list[Refusal] = []
        for p in cert_files:
            try:
                certs = x509.load_pem_x509_certificates(Path(p).read_bytes())
                for c in certs:
                    _asn1_cert(_der(c)).native  # noqa: B018 - the path validator must read it too
            except Exception as exc:  # noqa: BLE001 - one bad file is reported, the others still load
                refusals.append(Refusal("certificate", str(p), f"unreadable certificate file ({_short(exc)})"))
                continue
            (anchors if Path(p).name.startswith("root") else inters).extend(certs)
        crls: list[tuple[str, x509.CertificateRevocationList]] = []
        for p in crl_files:
            try:
                crls.append((str(p), load_crl(Path(p).read_bytes())))
            except Exception as exc:  # noqa: BLE001
                refusals.append(Refusal("crl", str(p), f"unreadable CRL ({_short(exc)})"))
        if not anchors:
            raise ValueError("no readable trust anchor: the CSOS root certificate must be in a file named root*.pem")
        verifier = cls(anchors, inters, [], products, oids, refusals=refusals, **kw)
        verifier._admit(crls)
        return verifier

    # ------------------------------------------------------------------ CRLs
    def update_crl(self, crl: x509.CertificateRevocationList | bytes) -> bool:
        """Admit ``crl`` to the set the revocation check uses; returns whether it took effect.

        Raises :class:`CRLError` (alias ``CrlRefused``) with the reason when it is refused: unreadable;
        no known CA certificate (configured, or learned from a signature whose path validated) has
        its issuer name and a key that verifies it; that certificate lacks cRLSign or does not chain
        to a trust anchor; signed with SHA-1/MD5; no nextUpdate; a delta CRL whose base CRL is not
        held; an unknown critical extension.

        An admitted CRL fills the slot of its (issuer, signing key, issuingDistributionPoint scope,
        delta or not); it replaces the CRL in that slot only if it is newer (higher CRL number, or
        later thisUpdate), so a replayed older CRL returns False and changes nothing. The very
        CRL already in force returns True (it is in force) without invalidating any cache. Which CRL
        covers which certificate (scope, indirect CRLs, deltas, separate CRL-signing keys) is
        decided per certificate by pyhanko-certvalidator (RFC 5280 6.3). A stale CRL is accepted
        here: orders received after its nextUpdate get REVOCATION_UNKNOWN.
        """
        if isinstance(crl, (bytes, bytearray)):
            try:
                crl = load_crl(bytes(crl))
            except Exception as exc:  # noqa: BLE001 - garbage from the topic is refused, not raised raw
                raise CRLError(f"unreadable CRL ({_short(exc)})") from None
        try:
            der = crl.public_bytes(serialization.Encoding.DER)
            asn1 = asn1_crl.CertificateList.load(der)
            asn1.native  # noqa: B018 - parse it all now: the revocation check must never trip over it
            issuer_name = _cn(crl.issuer)
            this_update, next_update = crl.last_update_utc, crl.next_update_utc
            exts = list(crl.extensions)
        except CRLError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CRLError(f"unreadable CRL ({_short(exc)})") from None
        signer = self._crl_signer(crl, issuer_name)
        h = crl.signature_hash_algorithm
        if isinstance(h, (hashes.SHA1, hashes.MD5)):
            raise CRLError(f"CRL from {issuer_name} is signed with {h.name.upper()}")
        if next_update is None:
            raise CRLError(f"CRL from {issuer_name} has no nextUpdate; its freshness cannot be judged")
        if next_update <= this_update:
            raise CRLError(f"CRL from {issuer_name} has nextUpdate {next_update} not after thisUpdate {this_update}")
        number, base, idp = None, None, b""
        for ext in exts:
            if isinstance(ext.value, x509.CRLNumber):
                number = ext.value.crl_number
            elif isinstance(ext.value, x509.DeltaCRLIndicator):
                base = ext.value.crl_number
            elif isinstance(ext.value, x509.IssuingDistributionPoint):
                idp = ext.value.public_bytes()
            elif ext.critical and not isinstance(ext.value, x509.AuthorityKeyIdentifier):
                raise CRLError(f"CRL from {issuer_name} has unsupported critical extension {ext.oid.dotted_string}")
        issuer_der = crl.issuer.public_bytes()
        key_fp = _fp(signer.public_key().public_bytes(serialization.Encoding.DER,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
        if base is not None and not any(
                k[0] == issuer_der and not k[3] and held.number is not None and held.number >= base
                for k, held in self._crls.items()):
            raise CRLError(f"delta CRL from {issuer_name} (base CRL number {base}) arrived without its base "
                           f"CRL; send the complete CRL first")
        slot = (issuer_der, key_fp, idp, base is not None)
        current = self._crls.get(slot)
        if current is not None and current.der == der:
            return True  # already in force (a second copy from the topic): nothing changes, caches stay
        if current is not None and (this_update < current.this_update or (
                number is not None and current.number is not None and number <= current.number)):
            return False
        self._crls[slot] = _HeldCrl(der, asn1, issuer_name, number, this_update, next_update)
        self._crls_changed()
        return True

    def crl_next_updates(self) -> dict[str, datetime]:
        """Issuer name -> the nextUpdate of its complete CRL in force (the latest, if it has several).

        Read by the worker's ``/metrics`` (``csos_crl_seconds_until_next_update``): past that time the
        issuer's orders cannot be verified (fail closed), so operators are warned before it comes.
        """
        out: dict[str, datetime] = {}
        for (_issuer, _key, _idp, delta), held in list(self._crls.items()):
            if not delta and (held.issuer not in out or held.next_update > out[held.issuer]):
                out[held.issuer] = held.next_update
        return out

    def _crl_signer(self, crl: x509.CertificateRevocationList, issuer_name: str) -> x509.Certificate:
        """The known CA certificate (cRLSign, chaining to an anchor) whose key signed ``crl``."""
        candidates = [c for c in self._anchors + self._intermediates if c.subject == crl.issuer]
        if not candidates:
            raise CRLError(f"CRL issuer {crl.issuer.rfc4514_string()} is not a known CA")
        signers = [c for c in candidates if _signs(c, crl)]
        if not signers:
            raise CRLError(f"CRL claiming to be from {issuer_name} is not signed by that CA's key")
        allowed = [c for c in signers if _may_sign_crls(c)]
        if not allowed:
            raise CRLError(f"{issuer_name} is not allowed to sign CRLs (no cRLSign key usage)")
        errors = []
        for c in allowed:
            fp = _fp(_der(c))
            err = None if fp in self._anchor_fps else self._ca_path_error(c, crl.last_update_utc)
            if err is None:
                return c
            errors.append(err)
        raise CRLError(f"CRL issuer {issuer_name} does not chain to a trust anchor: {errors[0]}")

    def _crls_changed(self) -> None:
        self._generation += 1
        self._crl_list = [h.asn1 for h in self._crls.values()]
        self._crl_bounds = sorted({t for h in self._crls.values() for t in (h.this_update, h.next_update)})
        self._revocation.clear()
        self._ca_revocation.clear()

    def _ca_path_error(self, ca: x509.Certificate, moment: datetime) -> str | None:
        fp = _fp(_der(ca))
        if fp not in self._ca_paths:
            try:
                self._ca_paths[fp] = None
                self._pkix(_asn1_cert(_der(ca)), [], moment)
            except _Untrusted as exc:
                self._ca_paths[fp] = str(exc)
        return self._ca_paths[fp]

    # ------------------------------------------------------------------ path validation
    def _pkix(self, leaf: asn1_x509.Certificate, extra: list[asn1_x509.Certificate],
              moment: datetime) -> list[ValidationPath]:
        """Every RFC 5280 path from ``leaf`` to an anchor that validates, best first.

        Validity periods are not judged here (a tolerance wider than any certificate's life):
        they are judged per order at the signing time (check 7), so a path whose windows do not
        overlap is still built and then refused as CERT_EXPIRED / CERT_NOT_YET_VALID, not as
        untrusted. Revocation is not judged here either: per order at receipt (check 8).
        Raises ``_Untrusted`` with the first reason when no path validates.
        """
        anchors, others = self._trust, self._intermediates_a + extra

        async def run() -> list[ValidationPath]:
            ctx = ValidationContext(trust_manager=anchors, other_certs=others, moment=moment,
                                    revocation_mode="none", time_tolerance=_ANY_VALIDITY)
            try:
                paths = await ctx.path_builder.async_build_paths(leaf)
            except PathBuildingError:
                raise _Untrusted("it is not issued by the CSOS certification authority "
                                 "(no chain to a trusted root)") from None
            good: list[ValidationPath] = []
            errors: list[str] = []
            for path in paths[:_MAX_PATHS]:
                vctx = ValidationContext(trust_manager=anchors, other_certs=others, moment=moment,
                                         revocation_mode="none", time_tolerance=_ANY_VALIDITY)
                try:
                    await async_validate_path(vctx, path)
                except (ValidationError, PathError) as exc:
                    errors.append(str(exc))
                    continue
                good.append(path)
            if not good:
                raise _Untrusted(errors[0] if errors else "no certification path")
            return sorted(good, key=lambda p: not _windows_overlap(list(p.iter_certs(include_root=False))))

        try:
            return _run_sync(run)
        except _Untrusted:
            raise
        except Exception as exc:  # fail closed on anything the path validator trips over
            raise _Untrusted(f"the certificate path could not be validated ({_short(exc)})") from None

    def _chain_for(self, leaf: x509.Certificate, leaf_der: bytes, leaf_fp: bytes,
                   extras_of: Callable[[], list[bytes]], moment: datetime) -> _Chain:
        chain = self._paths.get(leaf_fp)
        if chain is not None:
            self._paths.move_to_end(leaf_fp)
            return chain
        extras = extras_of()  # only on a miss: the steady state never re-encodes the travelling chain
        neg_key = (leaf_fp, tuple(sorted(_fp(d) for d in extras)))
        chain = self._untrusted.get(neg_key)
        if chain is not None:
            return chain
        chain = self._build_chain(leaf, leaf_der, extras, moment)
        if chain.error is None:
            self._paths[leaf_fp] = chain
            if len(self._paths) > _PATH_CACHE_MAX:
                self._paths.popitem(last=False)
        else:
            self._untrusted[neg_key] = chain
            if len(self._untrusted) > _NEG_CACHE_MAX:
                self._untrusted.popitem(last=False)
        return chain

    def _build_chain(self, leaf: x509.Certificate, leaf_der: bytes, extras: list[bytes],
                     moment: datetime) -> _Chain:
        base = dict(subject=leaf.subject.rfc4514_string(), serial_hex=format(leaf.serial_number, "x"))
        try:
            vpaths = self._pkix(_asn1_cert(leaf_der),
                                [_asn1_cert(d) for d in extras], moment)
        except _Untrusted as exc:
            return _Chain(error=str(exc), **base)
        except Exception as exc:  # noqa: BLE001 - an unreadable certificate is untrusted, never a crash
            return _Chain(error=f"it cannot be read ({_short(exc)})", **base)
        paths = []
        for vp in vpaths:
            certs = (leaf,) + tuple(x509.load_der_x509_certificate(_original_der(c))
                                    for c in list(vp.iter_certs(include_root=False))[::-1][1:])
            windows = tuple((c.not_valid_before_utc, c.not_valid_after_utc,
                             "your CSOS certificate" if i == 0 else f"the issuing CA certificate ({_cn(c.subject)})")
                            for i, c in enumerate(certs))
            paths.append(_Path(vp, certs, windows, CheckResult(
                "certificate_path", True, f"path of {len(certs)} certificate(s) to a trusted CSOS root"),
                fps=tuple(_fp(_original_der(c)) for c in vp.iter_certs(include_root=True))))
        self._learn_intermediates(paths[0].certs[1:])
        dea, schedules, reg_err = None, frozenset(), None
        try:
            dea, schedules = read_registration(leaf, self.oids)
        except CertProfileError as exc:
            reg_err = str(exc)
        return _Chain(error=None, profile_error=_profile_error(leaf), paths=tuple(paths), dea=dea,
                      schedules=schedules, registration_error=reg_err,
                      dea_valid=dea is not None and is_valid_dea_number(dea),
                      dea_result=CheckResult("dea_number", True, f"certificate and order both name {dea}"),
                      **base)

    def _learn_intermediates(self, cas: Iterable[x509.Certificate]) -> None:
        """Remember CA certificates that arrived in a signature and validated to an anchor,
        so that their CRLs can be verified and installed (``update_crl``) afterwards."""
        for ca in cas:
            fp = _fp(_der(ca))
            if fp not in self._known_fps:
                self._intermediates.append(ca)
                self._intermediates_a.append(_asn1_cert(_der(ca)))
                self._ca_paths[fp] = None
                self._known_fps.add(fp)

    # ------------------------------------------------------------------ certificate checks (6-8)
    def check_certificate(self, cert: x509.Certificate | bytes, other_certs: Iterable[x509.Certificate | bytes] = (),
                          *, signed_at: datetime, received_at: datetime,
                          signing_profile: bool = False) -> CertificateFinding:
        """Checks 6-8 of :meth:`verify` for one certificate, exactly as ``verify`` makes them.

        RFC 5280 path to a trust anchor (``other_certs``: intermediates that travelled with it),
        validity of every certificate of the path at ``signed_at``, revocation of every
        certificate of the path at ``received_at`` against the CRLs held. ``signing_profile``
        also requires a CSOS signing certificate (not a CA, a signing key usage), as ``verify``
        does. Used for certificates without their private key (the NIST PKITS conformance
        tests, ``csos verify-offline --certificate``). Never raises for bad input.
        """
        checks: list[CheckResult] = []
        try:
            der = cert if isinstance(cert, (bytes, bytearray)) else _der(cert)
            leaf = x509.load_der_x509_certificate(bytes(der))
            extras = [bytes(c) if isinstance(c, (bytes, bytearray)) else _der(c) for c in other_certs]
            self._certificate_checks(leaf, bytes(der), _fp(bytes(der)), lambda: extras, _utc(signed_at, "signed_at"),
                                     _utc(received_at, "received_at"), checks.append, signing_profile)
        except _Fail as f:
            checks.append(CheckResult(f.check, False, f.detail))
            return CertificateFinding(False, f.code, f"{f.finding} {ADVICE[f.code]}", checks)
        except ValueError as exc:  # unreadable certificate
            checks.append(CheckResult("certificate_path", False, f"unreadable certificate ({_short(exc)})"))
            return CertificateFinding(False, UNTRUSTED_CERTIFICATE, f"The certificate cannot be read. "
                                      f"{ADVICE[UNTRUSTED_CERTIFICATE]}", checks)
        return CertificateFinding(True, None, None, checks)

    def _certificate_checks(self, leaf: x509.Certificate, leaf_der: bytes, leaf_fp: bytes,
                            extras_of: Callable[[], list[bytes]], signed_at: datetime, received_at: datetime,
                            ok: Callable[[CheckResult], None], signing_profile: bool) -> _Chain:
        # 6. certificate path
        chain = self._chain_for(leaf, leaf_der, leaf_fp, extras_of, signed_at)
        error = chain.error or (chain.profile_error if signing_profile else None)
        if error is not None:
            raise _Fail(UNTRUSTED_CERTIFICATE, "certificate_path",
                        f"The signing certificate is not a valid DEA CSOS certificate: {error}.")
        # 7. validity at the signing time (1311.50), on the first path valid then
        path = next((p for p in chain.paths if all(nb <= signed_at <= na for nb, na, _ in p.windows)),
                    chain.paths[0])
        ok(path.result)
        for nb, na, label in path.windows:
            if signed_at > na:
                raise _Fail(CERT_EXPIRED, "certificate_validity",
                            f"The order was signed {_day(signed_at)}, but {label} expired {_day(na)}.")
            if signed_at < nb:
                raise _Fail(CERT_NOT_YET_VALID, "certificate_validity",
                            f"The order was signed {_day(signed_at)}, before {label} became valid {_day(nb)}.")
        ok(_PASS_VALIDITY)
        # 8. revocation of every certificate of the path, at receipt
        self._check_revocation(leaf_fp, chain, path, received_at)
        ok(_PASS_REVOCATION)
        return chain

    # ------------------------------------------------------------------ revocation (RFC 5280 6.3)
    def _check_revocation(self, leaf_fp: bytes, chain: _Chain, path: _Path, received_at: datetime) -> None:
        """Raise ``_Fail`` unless every certificate of ``path`` is covered, unrevoked, by current CRLs.

        The verdict is cached per (signer, path) for the current CRL-set generation and for the
        span of receipt times in which no CRL held starts or stops being current: a new CRL
        (any issuer) or a receipt time past a thisUpdate/nextUpdate boundary recomputes it.
        """
        key = (leaf_fp, chain.paths.index(path))
        v = self._revocation.get(key)
        if v is None or not v.holds(self._generation, received_at):
            lo, hi = self._stable_span(received_at)
            fail = self._revocation_verdict(path, received_at, (lo, hi))
            v = _RevVerdict(self._generation, lo, hi, fail)
            self._revocation[key] = v
            if len(self._revocation) > _PATH_CACHE_MAX:
                self._revocation.popitem(last=False)
        if v.fail is not None:
            raise v.fail

    def _stable_span(self, t: datetime) -> tuple[datetime, datetime]:
        """The receipt times around ``t`` over which no held CRL's currency changes."""
        lo, hi, pad = _MIN_TIME, _MAX_TIME, _CRL_TIME_PAD
        for b in self._crl_bounds:
            if b + pad <= t:
                lo = b + pad
            elif b - pad >= t:
                hi = min(hi, b - pad)
            else:
                return t, t  # too close to a boundary: judge this receipt time alone
        return lo, hi

    def _ca_revocation_ok(self, key: tuple[bytes, ...], received_at: datetime) -> bool:
        """Whether the CA at the end of the path ``key`` (certificate fingerprints from the anchor down)
        is known to pass revocation at ``received_at``.

        Why this is safe: a CA's RFC 5280 6.3 verdict depends on that CA, the path above it, the CRLs
        held and the receipt time, never on the signer below it. An entry is used only for the CRL-set
        generation it was computed under (any CRL that takes effect clears them all, so a CA revoked
        by a new CRL is re-judged at the next order) and within the receipt-time span in which no held
        CRL starts or stops being current (the same span as the per-signer cache). Only passes are
        kept: a failure is recomputed, so its finding names this order's receipt time. Entries exist
        only for CAs on validated paths and are evicted oldest first beyond _PATH_CACHE_MAX.
        """
        v = self._ca_revocation.get(key)
        if v is None or not v.holds(self._generation, received_at):
            return False
        self._ca_revocation.move_to_end(key)
        return True

    def _remember_ca_pass(self, key: tuple[bytes, ...], span: tuple[datetime, datetime]) -> None:
        self._ca_revocation[key] = _RevVerdict(self._generation, span[0], span[1], None)
        self._ca_revocation.move_to_end(key)
        if len(self._ca_revocation) > _PATH_CACHE_MAX:
            self._ca_revocation.popitem(last=False)

    def _revocation_verdict(self, path: _Path, received_at: datetime,
                            span: tuple[datetime, datetime]) -> "_Fail | None":
        anchors, others = self._trust, self._intermediates_a + [
            c for c in path.vpath.iter_certs(include_root=False)]
        crls = list(self._crl_list)
        vpath = path.vpath
        n = len(path.certs)

        async def run() -> "_Fail | None":
            ctx = ValidationContext(trust_manager=anchors, other_certs=others, crls=crls, moment=received_at,
                                    revinfo_policy=_CRL_REQUIRED)
            # A certificate listed on a current CRL is refused whatever its revocation date: the
            # distributor now knows the key is not to be trusted (not a point-in-time validation).
            ctx.timing_params = ValidationTimingParams(
                ValidationTimingInfo(received_at, received_at, False), ctx.timing_params.time_tolerance)
            for index in range(1, n + 1):  # from the CA under the anchor down to the signer
                ca_key = path.fps[:index + 1] if index < n and len(path.fps) == n + 1 else None
                if ca_key is not None and self._ca_revocation_ok(ca_key, received_at):
                    continue
                cert_a = vpath[index]
                cert = path.certs[n - index]
                label = "your CSOS certificate" if index == n else f"the CA certificate {_cn(cert.subject)}"
                proc = ValProcState(cert_path_stack=ConsList.sing(vpath), init_index=index)
                try:
                    await verify_crl(cert_a, vpath, ctx, proc_state=proc)
                except RevokedError as exc:
                    when = getattr(exc, "revocation_dt", None)
                    return _Fail(CERT_REVOKED, "revocation",
                                 f"{label[0].upper()}{label[1:]} (serial {format(cert.serial_number, 'x')}) was "
                                 f"revoked" + (f" {_day(when)}." if isinstance(when, datetime) else "."))
                except CRLNoMatchesError:
                    return _Fail(REVOCATION_UNKNOWN, "revocation",
                                 f"The supplier has no revocation list from {_cn(cert.issuer)} that covers "
                                 f"{label}.")
                except CRLValidationIndeterminateError as exc:
                    if exc.suspect_stale is not None:
                        return _Fail(REVOCATION_UNKNOWN, "revocation",
                                     f"The supplier's revocation list covering {label} expired "
                                     f"{_day(exc.suspect_stale)}, before the order was received "
                                     f"{_day(received_at)}.")
                    reasons = "; ".join(str(f[0]) for f in exc.failures) or str(exc)
                    return _Fail(REVOCATION_UNKNOWN, "revocation",
                                 f"The revocation status of {label} could not be established at receipt "
                                 f"({_day(received_at)}): {reasons}.")
                except Exception as exc:  # noqa: BLE001 - fail closed on anything else
                    return _Fail(REVOCATION_UNKNOWN, "revocation",
                                 f"The revocation status of {label} could not be established ({_short(exc)}).")
                if ca_key is not None:
                    self._remember_ca_pass(ca_key, span)
            return None

        try:
            return _run_sync(run)
        except Exception as exc:  # noqa: BLE001 - fail closed
            return _Fail(REVOCATION_UNKNOWN, "revocation",
                         f"The revocation status could not be established ({_short(exc)}).")

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

        # 6-8. certificate path, validity at the signing time, revocation at receipt
        other_certs = parsed.other_certs
        chain = self._certificate_checks(parsed.signer_cert, parsed.signer_cert_der, leaf_fp,
                                         lambda: [_der(c) for c in other_certs], signed_at, received_at,
                                         ok, True)
        out.signer_subject = chain.subject

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



class _Untrusted(Exception):
    pass


# Shared results for checks whose passing detail never varies (CheckResult is frozen);
# building a dozen result strings per order is a measurable share of the verify cost.
_PASS_FORMAT = CheckResult("signature_format", True, "CMS SignedData with one signer and its certificate")
_PASS_SIGNATURE = CheckResult("signature", True, "message digest matches the document; signature "
                                                 "verifies with the signer certificate's key")
_PASS_VALIDITY = CheckResult("certificate_validity", True,
                             "every certificate in the path was valid when the order was signed")
_PASS_REVOCATION = CheckResult("revocation", True, "every certificate of the path is covered by a current "
                                                   "revocation list and not on it at receipt")
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


class _OriginalBytesCertificate(asn1_x509.Certificate):
    """An asn1crypto certificate whose ``dump()`` is the bytes it was loaded from.

    asn1crypto 1.5 takes a definite length whose last byte is 0x80 (e.g. a 896-byte certificate)
    for an indefinite one and re-encodes the certificate on ``dump()``, which changes some (e.g.
    ones with issuerUniqueID/subjectUniqueID) so that their signatures no longer verify
    (NIST PKITS 4.3.6). pyhanko-certvalidator dumps certificates to fingerprint them.
    """

    _original: bytes | None = None

    def dump(self, force: bool = False) -> bytes:
        if self._original is not None and not force:
            return self._original
        return super().dump(force)


def _asn1_cert(der: bytes) -> asn1_x509.Certificate:
    cert = _OriginalBytesCertificate.load(der)
    cert._original = der
    return cert


def _original_der(cert: asn1_x509.Certificate) -> bytes:
    return cert.dump()


def _short(exc: BaseException) -> str:
    """One line naming an exception, for refusals and findings (never a traceback)."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:200]}" if text else exc.__class__.__name__


def _is_delta(crl: x509.CertificateRevocationList) -> bool:
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        return True
    except Exception:  # noqa: BLE001 - absent or unreadable: update_crl decides
        return False


def _signs(cert: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    try:
        return crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a key type that cannot sign CRLs (or a broken key) did not sign it
        return False


def _may_sign_crls(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign
    except x509.ExtensionNotFound:
        return True  # RFC 5280 4.2.1.3: without keyUsage the key is not restricted


def _windows_overlap(certs: list[asn1_x509.Certificate]) -> bool:
    lo = max(c["tbs_certificate"]["validity"]["not_before"].native for c in certs)
    hi = min(c["tbs_certificate"]["validity"]["not_after"].native for c in certs)
    return lo <= hi


def _profile_error(leaf: x509.Certificate) -> str | None:
    """Why ``leaf`` is not a registrant signing certificate (a CA, or a key usage that cannot sign)."""
    try:
        if leaf.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca:
            return "it is a CA certificate (basicConstraints CA=TRUE), not a registrant signing certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        ku = leaf.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE).value
    except x509.ExtensionNotFound:
        return "it has no key usage extension, so it is not a CSOS signing certificate"
    if not (ku.digital_signature or ku.content_commitment):
        return "its key usage does not allow signing (needs digitalSignature or nonRepudiation)"
    return None


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
    "ADVICE", "CHECKS", "CRLError", "CertificateFinding", "CheckResult", "CrlRefused", "Outcome", "REASON_CODES",
    "RETRYABLE", "Refusal", "Verifier",
    "enrich_lines", *REASON_CODES,
]


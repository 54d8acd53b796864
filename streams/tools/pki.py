"""A test PKI shaped like DEA's CSOS PKI, for the CLI, the simulator and the tests.

The real CSOS hierarchy is a DEA root with a CSOS subordinate CA that issues
each registrant's signing certificate; the certificate carries the DEA number
and the schedules the registrant may order, and its validity ends with the
registration. This module builds the same shape with the project's own
extension OIDs (``streams.domain.cert_profile``) so the verifier can be exercised
end to end with real X.509 certificates, CRLs and CMS signatures, including the
broken material the verifier must refuse (rogue CA, CA flag on a leaf, wrong
key usage, unknown critical extension, CRL signed by the wrong key).

EVERY KEY HERE IS A TEST KEY. Keys are written to disk unencrypted, and with
``reuse_keys=True`` they come from a process-wide pool so that tests issuing
dozens of certificates stay fast (RSA-2048 key generation costs ~50-100 ms).
Nothing produced here is, or may be used as, a DEA-issued credential.

Directory layout written by :meth:`TestPKI.write_pki` and read by
:func:`load_pki` (and by ``streams.verification.Verifier.from_pki_dir``)::

    trust/root.pem                   trust anchor (self-signed root), PEM
    trust/csos-sub-ca.pem            intermediate CA certificate(s), PEM
    crl/csos-sub-ca.crl              the sub-CA's CRL, DER (the usual .crl encoding)
    crl/root.crl                     the root's CRL (revoked CA certificates), DER: every certificate
                                     of a path, CAs included, needs a current CRL (no soft-fail)
    registrants/<DEA>/cert.pem       registrant certificate, PEM
    registrants/<DEA>/key.pem        its private key, PKCS#8 PEM, UNENCRYPTED TEST KEY
    registrants/<DEA>/chain.pem      intermediates to send with a signature, PEM
    private/root-key.pem             root CA key (test key, unencrypted)
    private/csos-sub-ca-key.pem      sub-CA key (test key, unencrypted)
    state.json                       revoked serials, CRL number, extension OIDs

Rule used by the verifier: in ``trust/``, files whose name starts with ``root``
are trust anchors; every other ``*.pem`` there is an intermediate (untrusted
until a path to an anchor validates).
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from streams.domain.crl import load_crl
from streams.domain.cert_profile import ExtensionOids, read_registration, registration_extensions

KeyType = Literal["rsa", "ec"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: An OID no relying party understands, for the "unknown critical extension" leaf.
UNKNOWN_CRITICAL_OID = "2.25.329800735698586629295641978511506172918"

_POOL: dict[tuple[str, int, object], PrivateKey] = {}


def generate_key(key_type: KeyType = "rsa", *, rsa_bits: int = 2048) -> PrivateKey:
    """A fresh key: RSA (``rsa_bits``, e=65537) or ECDSA P-256."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"key_type must be 'rsa' or 'ec', got {key_type!r}")


def pooled_key(key_type: KeyType = "rsa", *, rsa_bits: int = 2048, slot: object = 0) -> PrivateKey:
    """A key cached for the life of the process under ``(key_type, bits, slot)``.

    Tests build many PKIs; drawing keys from this pool makes that cost one key
    generation per slot instead of one per certificate.
    """
    k = (key_type, rsa_bits if key_type == "rsa" else 256, slot)
    if k not in _POOL:
        _POOL[k] = generate_key(key_type, rsa_bits=rsa_bits)
    return _POOL[k]


@dataclass(frozen=True)
class Credential:
    """A certificate, its private key (a TEST key) and the intermediates to send with it."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def dea_number(self) -> str | None:
        return read_registration(self.cert)[0]


def _utc(dt: datetime | None, default: datetime) -> datetime:
    if dt is None:
        return default
    if dt.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    return dt.astimezone(timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _name(cn: str, org: str = "csos-som TEST PKI (not DEA)", ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
             x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _ca_cert(subject: x509.Name, key: PrivateKey, issuer: Credential | None, *,
             not_before: datetime, not_after: datetime, path_length: int | None) -> x509.Certificate:
    issuer_name = issuer.cert.subject if issuer else subject
    signing_key = issuer.key if issuer else key
    b = (x509.CertificateBuilder()
         .subject_name(subject).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=True, crl_sign=True,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                            critical=False)
    return b.sign(signing_key, hashes.SHA256())


_SIGNING_KU = dict(digital_signature=True, content_commitment=True, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False)
_ENCIPHER_KU = dict(_SIGNING_KU, digital_signature=False, content_commitment=False,
                    key_encipherment=True)


class TestPKI:
    """Root CA -> CSOS sub-CA (pathlen 0) -> registrant certificates, plus a CRL.

    Times are explicit parameters everywhere so tests can build expired,
    not-yet-valid and stale material deterministically.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, root: Credential, sub_ca: Credential, *, oids: ExtensionOids | None = None,
                 reuse_keys: bool = False) -> None:
        self.root = root
        self.sub_ca = sub_ca
        self.oids = oids or ExtensionOids.from_env()
        self.reuse_keys = reuse_keys
        self.registrants: dict[str, Credential] = {}
        self.revoked: dict[int, datetime] = {}
        self.crl_number = 0
        self.crl: x509.CertificateRevocationList | None = None
        self.root_crl: x509.CertificateRevocationList | None = None
        self._slots = itertools.count()

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, dir: str | Path | None = None, *, now: datetime | None = None,
               key_type: KeyType = "rsa", oids: ExtensionOids | None = None,
               reuse_keys: bool = False, ca_validity: timedelta = timedelta(days=3650),
               sub_ca_validity: timedelta = timedelta(days=1825)) -> "TestPKI":
        """Build a root and a CSOS sub-CA, both valid from a year before ``now``.

        With ``dir`` the PKI (and an initial empty CRL) is written there.
        ``reuse_keys=True`` takes keys from the process-wide pool: fast, for tests.
        """
        now = _utc(now, _now())
        start = now - timedelta(days=365)
        key = (lambda slot: pooled_key(key_type, slot=slot)) if reuse_keys else (lambda slot: generate_key(key_type))
        root_key = key("root")
        root_cert = _ca_cert(_name("CSOS TEST Root CA"), root_key, None, not_before=start,
                             not_after=start + ca_validity, path_length=None)
        root = Credential(root_cert, root_key)
        sub_key = key("sub-ca")
        sub_cert = _ca_cert(_name("CSOS TEST Subordinate CA"), sub_key, root, not_before=start,
                            not_after=start + sub_ca_validity, path_length=0)
        pki = cls(root, Credential(sub_cert, sub_key, (sub_cert,)), oids=oids, reuse_keys=reuse_keys)
        pki.build_root_crl(now - timedelta(hours=1), now + timedelta(days=365))
        if dir is not None:
            pki.build_crl(now - timedelta(hours=1), now + timedelta(days=7))
            pki.write_pki(dir)
        return pki

    @property
    def trust_anchors(self) -> list[x509.Certificate]:
        return [self.root.cert]

    @property
    def intermediates(self) -> list[x509.Certificate]:
        return [self.sub_ca.cert]

    def _leaf_key(self, key_type: KeyType, rsa_bits: int) -> PrivateKey:
        if self.reuse_keys:
            return pooled_key(key_type, rsa_bits=rsa_bits, slot=("leaf", next(self._slots)))
        return generate_key(key_type, rsa_bits=rsa_bits)

    # ------------------------------------------------------------------ registrants
    def issue_registrant(self, dea_number: str, name: str, schedules: Iterable[str],
                         not_before: datetime | None = None, not_after: datetime | None = None,
                         key_type: KeyType = "rsa", *, rsa_bits: int = 2048,
                         key: PrivateKey | None = None, email: str | None = None,
                         issuer: Credential | None = None, ca_flag: bool = False,
                         key_usage: Literal["signing", "encipherment", "none"] = "signing",
                         unknown_critical_extension: bool = False,
                         record: bool = True) -> Credential:
        """Issue a registrant signing certificate (digitalSignature + nonRepudiation, not a CA).

        Defaults: valid from a day ago for a year. The DEA number is written
        as given (no check-digit validation) so tests can issue a certificate
        with a bad one. The keyword-only flags produce defective leaves; prefer
        the named ``issue_*_leaf`` wrappers for those.
        """
        now = _now()
        not_before = _utc(not_before, now - timedelta(days=1))
        not_after = _utc(not_after, now + timedelta(days=365))
        issuer = issuer or self.sub_ca
        key = key or self._leaf_key(key_type, rsa_bits)
        subject = x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "CSOS TEST"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CSOS signer"),
        ])
        b = (x509.CertificateBuilder()
             .subject_name(subject).issuer_name(issuer.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(not_before).not_valid_after(not_after)
             .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                            critical=False))
        if key_usage != "none":
            ku = _SIGNING_KU if key_usage == "signing" else _ENCIPHER_KU
            if ca_flag:
                ku = dict(ku, key_cert_sign=True)
            b = b.add_extension(x509.KeyUsage(**ku), critical=True)
        if email:
            b = b.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
        for ext in registration_extensions(dea_number, schedules, self.oids):
            b = b.add_extension(ext.value, critical=ext.critical)
        if unknown_critical_extension:
            oid = x509.ObjectIdentifier(UNKNOWN_CRITICAL_OID)
            b = b.add_extension(x509.UnrecognizedExtension(oid, b"\x05\x00"), critical=True)
        cert = b.sign(issuer.key, hashes.SHA256())
        chain = tuple(c for c in issuer.chain)
        cred = Credential(cert, key, chain)
        if record and issuer is self.sub_ca and not (ca_flag or unknown_critical_extension
                                                     or key_usage != "signing"):
            self.registrants[dea_number] = cred
        return cred

    def issue_ca_flag_leaf(self, dea_number: str, name: str, schedules: Iterable[str], **kw) -> Credential:
        """A "registrant" certificate with basicConstraints CA=TRUE (must be refused)."""
        return self.issue_registrant(dea_number, name, schedules, ca_flag=True, **kw)

    def issue_wrong_key_usage_leaf(self, dea_number: str, name: str, schedules: Iterable[str],
                                   **kw) -> Credential:
        """A leaf whose key usage is keyEncipherment only (not a signing certificate)."""
        return self.issue_registrant(dea_number, name, schedules, key_usage="encipherment", **kw)

    def issue_unknown_critical_leaf(self, dea_number: str, name: str, schedules: Iterable[str],
                                    **kw) -> Credential:
        """A leaf with a critical extension no relying party understands (RFC 5280 4.2: reject)."""
        return self.issue_registrant(dea_number, name, schedules, unknown_critical_extension=True, **kw)

    def issue_sub_ca(self, name: str, key_type: KeyType = "rsa") -> Credential:
        """Another CSOS sub-CA under our root (as DEA runs several), with no CRL of its own yet.

        Its certificate reaches a verifier only inside signatures (``Credential.chain``),
        which is how a new intermediate appears in production.
        """
        key = generate_key(key_type)
        cert = _ca_cert(_name(name), key, self.root, not_before=self.sub_ca.cert.not_valid_before_utc,
                        not_after=self.sub_ca.cert.not_valid_after_utc, path_length=0)
        return Credential(cert, key, (cert,))

    def rogue_registrant(self, dea_number: str, name: str, schedules: Iterable[str],
                         not_before: datetime | None = None, not_after: datetime | None = None,
                         key_type: KeyType = "rsa", **kw) -> Credential:
        """A look-alike CA (same names and validity as ours, own keys, self-signed root) and a leaf.

        The leaf carries valid-looking DEA and schedule extensions and the rogue
        chain travels with it; only the keys are wrong, so the verifier must
        refuse it as untrusted.
        """
        slot = ("rogue", next(self._slots))
        rkey = pooled_key(key_type, slot=slot) if self.reuse_keys else generate_key(key_type)
        rroot = Credential(_ca_cert(self.root.cert.subject, rkey, None,
                                    not_before=self.root.cert.not_valid_before_utc,
                                    not_after=self.root.cert.not_valid_after_utc, path_length=None), rkey)
        skey = pooled_key(key_type, slot=(slot, "sub")) if self.reuse_keys else generate_key(key_type)
        scert = _ca_cert(self.sub_ca.cert.subject, skey, rroot, not_before=self.sub_ca.cert.not_valid_before_utc,
                         not_after=self.sub_ca.cert.not_valid_after_utc, path_length=0)
        rsub = Credential(scert, skey, (scert, rroot.cert))
        return self.issue_registrant(dea_number, name, schedules, not_before, not_after, key_type,
                                     issuer=rsub, record=False, **kw)

    # ------------------------------------------------------------------ revocation
    def revoke(self, serial: int, when: datetime | None = None) -> None:
        """Put ``serial`` on the sub-CA's next CRL, revoked at ``when`` (default now)."""
        self.revoked[serial] = _utc(when, _now())

    def build_crl(self, this_update: datetime | None = None, next_update: datetime | None = None, *,
                  signer: PrivateKey | None = None,
                  revoked: dict[int, datetime] | None = None,
                  issuer: Credential | None = None) -> x509.CertificateRevocationList:
        """A CRL from the sub-CA listing every revoked serial (default: valid for 7 days from now).

        ``signer`` overrides the signing key (see :meth:`crl_signed_by_wrong_key`);
        ``issuer``/``revoked`` build another CA's CRL (e.g. the root's, revoking the sub-CA).
        """
        now = _now()
        this_update = _utc(this_update, now - timedelta(minutes=5))
        next_update = _utc(next_update, this_update + timedelta(days=7))
        issuer = issuer or self.sub_ca
        entries = self.revoked if revoked is None else revoked
        self.crl_number += 1
        b = (x509.CertificateRevocationListBuilder()
             .issuer_name(issuer.cert.subject)
             .last_update(this_update).next_update(next_update)
             .add_extension(x509.CRLNumber(self.crl_number), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                            critical=False))
        for serial, when in sorted(entries.items()):
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        crl = b.sign(signer or issuer.key, hashes.SHA256())
        if signer is None and issuer is self.sub_ca and revoked is None:
            self.crl = crl
        return crl

    def build_root_crl(self, this_update: datetime | None = None, next_update: datetime | None = None, *,
                       revoked: dict[int, datetime] | None = None) -> x509.CertificateRevocationList:
        """The root's CRL (default: no CA revoked, valid a year); it becomes :attr:`root_crl`.

        The verifier needs it: every CA certificate of a path must be covered by a current CRL.
        """
        now = _now()
        this_update = _utc(this_update, now - timedelta(minutes=5))
        crl = self.build_crl(this_update, _utc(next_update, this_update + timedelta(days=365)),
                             issuer=self.root, revoked=revoked or {})
        self.root_crl = crl
        return crl

    @property
    def crls(self) -> list[x509.CertificateRevocationList]:
        """The sub-CA's current CRL and the root's: what a verifier needs for our paths."""
        # (``is None``, not ``or``: a CRL listing nobody has len() 0 and is falsy)
        return [self.crl if self.crl is not None else self.build_crl(),
                self.root_crl if self.root_crl is not None else self.build_root_crl()]

    def crl_signed_by_wrong_key(self, this_update: datetime | None = None,
                                next_update: datetime | None = None) -> x509.CertificateRevocationList:
        """A CRL naming the sub-CA as issuer but signed by an unrelated key (must be refused)."""
        key_type: KeyType = "ec" if isinstance(self.sub_ca.key, ec.EllipticCurvePrivateKey) else "rsa"
        wrong = pooled_key(key_type, slot="wrong-crl-signer") if self.reuse_keys else generate_key(key_type)
        return self.build_crl(this_update, next_update, signer=wrong, revoked=dict(self.revoked))

    # ------------------------------------------------------------------ persistence
    def write_pki(self, dir: str | Path) -> Path:
        """Write the layout described in the module docstring; returns the directory."""
        d = Path(dir)
        for sub in ("trust", "crl", "registrants", "private"):
            (d / sub).mkdir(parents=True, exist_ok=True)
            # Explicit modes, whatever the umask: the worker refuses a group/other-writable trust directory.
            os.chmod(d / sub, 0o700 if sub == "private" else 0o755)
        _write(d / "trust" / "root.pem", _pem(self.root.cert))
        _write(d / "trust" / "csos-sub-ca.pem", _pem(self.sub_ca.cert))
        crl = self.crl if self.crl is not None else self.build_crl()
        _write(d / "crl" / "csos-sub-ca.crl", crl.public_bytes(serialization.Encoding.DER))
        root_crl = self.root_crl if self.root_crl is not None else self.build_root_crl()
        _write(d / "crl" / "root.crl", root_crl.public_bytes(serialization.Encoding.DER))
        _write(d / "private" / "root-key.pem", _key_pem(self.root.key), private=True)
        _write(d / "private" / "csos-sub-ca-key.pem", _key_pem(self.sub_ca.key), private=True)
        for dea, cred in self.registrants.items():
            rd = d / "registrants" / dea
            rd.mkdir(parents=True, exist_ok=True)
            _write(rd / "cert.pem", _pem(cred.cert))
            _write(rd / "key.pem", _key_pem(cred.key), private=True)
            _write(rd / "chain.pem", b"".join(_pem(c) for c in cred.chain))
        state = {
            "note": "TEST PKI - keys are unencrypted test keys, not DEA credentials",
            "oids": {"dea_number": self.oids.dea_number, "schedules": self.oids.schedules},
            "crl_number": self.crl_number,
            "revoked": {format(s, "x"): w.isoformat() for s, w in sorted(self.revoked.items())},
        }
        _write(d / "state.json", json.dumps(state, indent=2).encode())
        return d

    @classmethod
    def load(cls, dir: str | Path) -> "TestPKI":
        return load_pki(dir)


def load_pki(dir: str | Path) -> TestPKI:
    """Read back a directory written by :meth:`TestPKI.write_pki` (CA keys included)."""
    d = Path(dir)
    root_cert = x509.load_pem_x509_certificate((d / "trust" / "root.pem").read_bytes())
    sub_cert = x509.load_pem_x509_certificate((d / "trust" / "csos-sub-ca.pem").read_bytes())
    root_key = _load_key(d / "private" / "root-key.pem")
    sub_key = _load_key(d / "private" / "csos-sub-ca-key.pem")
    state = json.loads((d / "state.json").read_text()) if (d / "state.json").exists() else {}
    oids = ExtensionOids(**state["oids"]) if "oids" in state else None
    pki = TestPKI(Credential(root_cert, root_key), Credential(sub_cert, sub_key, (sub_cert,)), oids=oids)
    pki.crl_number = int(state.get("crl_number", 0))
    pki.revoked = {int(s, 16): datetime.fromisoformat(w) for s, w in state.get("revoked", {}).items()}
    crl_path = d / "crl" / "csos-sub-ca.crl"
    if crl_path.exists():
        pki.crl = load_crl(crl_path.read_bytes())
    if (d / "crl" / "root.crl").exists():
        pki.root_crl = load_crl((d / "crl" / "root.crl").read_bytes())
    reg_dir = d / "registrants"
    if reg_dir.is_dir():
        for rd in sorted(p for p in reg_dir.iterdir() if p.is_dir()):
            cert = x509.load_pem_x509_certificate((rd / "cert.pem").read_bytes())
            chain_path = rd / "chain.pem"
            chain = tuple(x509.load_pem_x509_certificates(chain_path.read_bytes())) if chain_path.exists() \
                and chain_path.stat().st_size else (sub_cert,)
            pki.registrants[rd.name] = Credential(cert, _load_key(rd / "key.pem"), chain)
    return pki


def write_pki(pki: TestPKI, dir: str | Path) -> Path:
    """Function form of :meth:`TestPKI.write_pki`."""
    return pki.write_pki(dir)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError(f"{path}: only RSA and EC test keys are supported")
    return key


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600 if private else 0o644)  # not the umask's choice: see write_pki
    os.replace(tmp, path)

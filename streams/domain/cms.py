"""CMS (PKCS#7) SignedData for CSOS orders: build, parse, verify.

Why not ``cryptography``'s ``PKCS7SignatureBuilder`` for signing: in
cryptography 50 it always adds a ``signingTime`` attribute set to the wall
clock at signing and offers no way to choose it. A CSOS order carries "the
date the order was signed" (21 CFR 1305.21(b)(6)), the simulator and tests sign
orders dated in the past, and certificate validity is judged at that date
(1311.50), so the CMS signing time has to equal the order's date. The builder
also only accepts SHA-2 digests, and tests need SHA-1 signatures to prove they
are refused. So :func:`sign_order` builds the SignedData with ``asn1crypto``
and signs with ``cryptography`` primitives. It produces the same structure
``PKCS7SignatureBuilder`` does in Binary mode (the content bytes are signed
exactly as given, no CRLF canonicalization), and signatures from
``PKCS7SignatureBuilder``/OpenSSL verify here too. (Ours leaves out the
SMIMECapabilities attribute, which has no meaning for CSOS.)

``cryptography`` cannot verify CMS at all, hence :func:`parse_signed_data`
and :func:`verify_signature` (RFC 5652 5.4/5.6: the message-digest attribute
must equal the content digest; the signature is over the DER of the signed
attributes re-tagged as ``SET OF``). Parsing uses a small strict-DER walker
on the hot path and ``asn1crypto.cms`` for everything else (see the comment
above ``_walk_fast``); tests check the two agree under random mutation.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from streams.core.errors import CsosError

MALFORMED_SIGNATURE = "MALFORMED_SIGNATURE"
WEAK_ALGORITHM = "WEAK_ALGORITHM"
BAD_SIGNATURE = "BAD_SIGNATURE"

#: Digest algorithms accepted for CSOS (DEA moved to SHA-256 in 2014): SHA-256 or stronger.
STRONG_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
    "sha512_256": hashes.SHA512_256,
    "sha3_256": hashes.SHA3_256, "sha3_384": hashes.SHA3_384, "sha3_512": hashes.SHA3_512,
}
#: Digests only the signing side knows, so tests can build weak signatures.
_ALL_HASHES: dict[str, type[hashes.HashAlgorithm]] = dict(
    STRONG_HASHES, sha1=hashes.SHA1, sha224=hashes.SHA224, md5=hashes.MD5)
_HASHLIB = {"sha256": "sha256", "sha384": "sha384", "sha512": "sha512", "sha1": "sha1",
            "sha224": "sha224", "md5": "md5", "sha3_256": "sha3_256", "sha3_384": "sha3_384",
            "sha3_512": "sha3_512", "sha512_256": "sha512_256"}
MIN_RSA_BITS = 2048
_DER = serialization.Encoding.DER
MIN_EC_BITS = 256
_ID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"

# Bounded cost per message: a signature is refused (MALFORMED_SIGNATURE, naming the limit) before any
# expensive step when it exceeds one of these. A CSOS signature holds one signer certificate and at
# most a few CA certificates; the limits are far above that and far below what makes parsing or
# certification-path building (which tries every candidate issuer) slow.
#: Bytes of the CMS signature other than an embedded order document.
MAX_SIGNATURE_BYTES = 64 * 1024
#: Bytes of the order document, attached or detached.
MAX_DOCUMENT_BYTES = 256 * 1024
#: Certificates embedded in the signature (signer + intermediates).
MAX_EMBEDDED_CERTS = 10


class SignatureError(CsosError):
    """The CMS signature is unusable; ``code`` is the verification reason code."""
    code = "SIGNATURE"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code  # type: ignore[misc]  # this error's own code, not the class's default
        self.message = message


@dataclass(frozen=True)
class ParsedSignature:
    """What a verifier needs from a SignedData with exactly one signer."""

    content: bytes
    detached: bool
    signer_cert: x509.Certificate
    signer_cert_der: bytes
    other_certs: tuple[x509.Certificate, ...]
    digest_algorithm: str  # asn1crypto name, e.g. "sha256"
    signature_algorithm: str  # e.g. "rsassa_pkcs1v15", "sha256_rsa", "rsassa_pss", "sha256_ecdsa"
    signature_hash: str  # digest used inside the signature (PSS/ECDSA/RSA), e.g. "sha256"
    pss_params: tuple[str, int] | None  # (MGF1 hash, salt length) for RSASSA-PSS
    signed_attrs_der: bytes | None  # DER of the signed attributes as SET OF; None = none present
    content_type: str | None  # signed content-type attribute
    message_digest: bytes | None  # signed message-digest attribute
    signing_time: datetime | None  # signed signing-time attribute, UTC
    signature: bytes


# ---------------------------------------------------------------------------- signing
def sign_order(document: bytes, cert: x509.Certificate, key: Any, *, signing_time: datetime,
               detached: bool = False, hash: Any = hashes.SHA256,
               intermediates: Iterable[x509.Certificate] = (), rsa_pss: bool = False,
               sid: str = "issuer_serial") -> bytes:
    """Sign ``document`` (exact bytes, binary) and return a DER ContentInfo(SignedData).

    Signed attributes: content-type (id-data), signing-time = ``signing_time``,
    message-digest. The signer certificate and ``intermediates`` are embedded.
    ``sid`` is ``"issuer_serial"`` (version 1) or ``"ski"`` (version 3).
    """
    if signing_time.tzinfo is None:
        raise ValueError("signing_time must be timezone-aware")
    hash_name = _hash_name(hash)
    h = _ALL_HASHES[hash_name]()
    digest = hashlib.new(_HASHLIB[hash_name], document).digest()
    st = signing_time.astimezone(timezone.utc).replace(microsecond=0)
    time_choice = cms.Time({"utc_time": st} if 1950 <= st.year < 2050 else {"generalized_time": st})
    attrs = cms.CMSAttributes([
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "signing_time", "values": [time_choice]}),
        cms.CMSAttribute({"type": "message_digest", "values": [digest]}),
    ])
    to_sign = attrs.dump()  # universal SET OF tag: what the signature covers

    if isinstance(key, rsa.RSAPrivateKey):
        if rsa_pss:
            salt = h.digest_size
            signature = key.sign(to_sign, padding.PSS(padding.MGF1(h), salt), h)
            sig_alg = algos.SignedDigestAlgorithm({
                "algorithm": "rsassa_pss",
                "parameters": algos.RSASSAPSSParams({
                    "hash_algorithm": {"algorithm": hash_name},
                    "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": hash_name}},
                    "salt_length": salt,
                    "trailer_field": "trailer_field_bc",
                }),
            })
        else:
            signature = key.sign(to_sign, padding.PKCS1v15(), h)
            sig_alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"})
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if rsa_pss:
            raise ValueError("rsa_pss needs an RSA key")
        signature = key.sign(to_sign, ec.ECDSA(h))
        sig_alg = algos.SignedDigestAlgorithm({"algorithm": f"{hash_name}_ecdsa"})
    else:
        raise TypeError("only RSA and EC keys are supported")

    a_cert = asn1_x509.Certificate.load(cert.public_bytes(_DER))
    if sid == "issuer_serial":
        signer_id = cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber(
            {"issuer": a_cert.issuer, "serial_number": a_cert.serial_number})})
        version = "v1"
    elif sid == "ski":
        ski = a_cert.key_identifier
        if ski is None:
            raise ValueError("certificate has no subjectKeyIdentifier")
        signer_id = cms.SignerIdentifier({"subject_key_identifier": ski})
        version = "v3"
    else:
        raise ValueError("sid must be 'issuer_serial' or 'ski'")

    signer_info = cms.SignerInfo({
        "version": version,
        "sid": signer_id,
        "digest_algorithm": {"algorithm": hash_name},
        "signed_attrs": attrs,
        "signature_algorithm": sig_alg,
        "signature": signature,
    })
    signed_data = cms.SignedData({
        "version": "v3" if version == "v3" else "v1",
        "digest_algorithms": [{"algorithm": hash_name}],
        "encap_content_info": {"content_type": "data", "content": None if detached else document},
        "certificates": _certificate_set([cert.public_bytes(_DER)] + [c.public_bytes(_DER) for c in intermediates]),
        "signer_infos": [signer_info],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()


def _certificate_set(ders: list[bytes]) -> cms.CertificateSet:
    """The CMS certificate set holding each certificate's exact bytes, in the order given.

    asn1crypto's ``Certificate.load(der).dump()`` re-encodes some valid
    certificates (e.g. a subjectUniqueID BIT STRING with unused bits, PKITS's
    UIDCACert), which breaks their signature; a set built from the raw bytes
    is written out as it was read.
    """
    return cms.CertificateSet.load(core.SetOf(contents=b"".join(ders)).dump())


#: A SET OF read element by element as raw bytes, nothing re-encoded. Made with ``type()``: this module is
#: compiled with mypyc (``streams.core.native``), and a compiled subclass of asn1crypto's ``SetOf`` broke
#: asn1crypto's per-instance attributes (a SystemError, then a crash in the garbage collector).
_AnySet: Any = type("_AnySet", (core.SetOf,), {"_child_spec": core.Any, "__doc__": "A SET OF as raw bytes."})


def _certificate_ders(cert_set: Any) -> list[bytes]:
    """The embedded certificates' bytes as sent (the ``certificate`` choice: a universal SEQUENCE)."""
    if cert_set is None or isinstance(cert_set, core.Void):
        return []
    ders = (c.dump() for c in _AnySet(contents=cert_set.contents))
    return [d for d in ders if d[:1] == b"\x30"]  # the other choices are context-tagged


# ---------------------------------------------------------------------------- parsing
#
# Parsing is the hot path (every order). asn1crypto's generic parser costs
# ~200 us per SignedData, ten times an RSA verify, so the outer structure is
# walked with a small strict-DER reader that only slices out the raw pieces;
# anything it does not recognise as plain DER (BER indefinite lengths,
# constructed OCTET STRINGs, odd time formats) falls back to asn1crypto.
# Both walkers feed the same raw pieces to ``_finish``, and the pieces that
# need real ASN.1 understanding (algorithm identifiers, signer identifiers)
# are decoded by asn1crypto and memoised on their exact bytes.

_CERT_CACHE: dict[bytes, x509.Certificate] = {}
_CERT_CACHE_MAX = 10_000
_MEMO_MAX = 4096


def load_cert_cached(der: bytes) -> x509.Certificate:
    """``x509.load_der_x509_certificate`` memoized on the exact DER (same signer, every order)."""
    cert = _CERT_CACHE.get(der)
    if cert is None:
        if len(_CERT_CACHE) >= _CERT_CACHE_MAX:
            _CERT_CACHE.clear()
        cert = _CERT_CACHE[der] = x509.load_der_x509_certificate(der)
    return cert


@dataclass
class _Raw:
    """The pieces of a SignedData, as exact DER slices."""

    econtent_type: bytes  # OID TLV
    content: bytes | None  # eContent octets, None when detached
    cert_ders: list[bytes]
    n_signers: int
    sid: bytes  # SignerIdentifier TLV
    digest_alg: bytes  # AlgorithmIdentifier TLV
    signed_attrs: bytes | None  # [0] IMPLICIT TLV (tag 0xA0)
    sig_alg: bytes  # AlgorithmIdentifier TLV
    signature: bytes


class _NotPlainDER(Exception):
    """The fast walker met something it leaves to asn1crypto."""


_OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")
_OID_DATA = bytes.fromhex("06092a864886f70d010701")
_OID_CONTENT_TYPE = bytes.fromhex("06092a864886f70d010903")
_OID_MESSAGE_DIGEST = bytes.fromhex("06092a864886f70d010904")
_OID_SIGNING_TIME = bytes.fromhex("06092a864886f70d010905")


def _tlv(b: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the DER element at ``pos``; strict definite lengths."""
    if pos + 2 > end:
        raise _NotPlainDER("truncated")
    tag = b[pos]
    if tag & 0x1F == 0x1F:
        raise _NotPlainDER("high tag number")
    n = b[pos + 1]
    if n < 0x80:
        start = pos + 2
        stop = start + n
    else:
        k = n & 0x7F
        if k == 0 or k > 4 or pos + 2 + k > end or b[pos + 2] == 0:
            raise _NotPlainDER("indefinite or non-minimal length")
        length = int.from_bytes(b[pos + 2:pos + 2 + k], "big")
        if length < 0x80:
            raise _NotPlainDER("non-minimal length")
        start = pos + 2 + k
        stop = start + length
    if stop > end:
        raise _NotPlainDER("element overruns its container")
    return tag, start, stop


def _walk_fast(b: bytes) -> _Raw:
    tag, s, e = _tlv(b, 0, len(b))
    if tag != 0x30 or e != len(b):
        raise _NotPlainDER("ContentInfo")
    tag, s1, e1 = _tlv(b, s, e)
    if tag != 0x06 or b[s:e1] != _OID_SIGNED_DATA:
        raise _NotPlainDER("not signedData")
    tag, s2, e2 = _tlv(b, e1, e)  # [0] EXPLICIT
    if tag != 0xA0 or e2 != e:
        raise _NotPlainDER("content")
    tag, s, e = _tlv(b, s2, e2)  # SignedData SEQUENCE
    if tag != 0x30 or e != e2:
        raise _NotPlainDER("SignedData")
    tag, _, p = _tlv(b, s, e)  # version
    if tag != 0x02:
        raise _NotPlainDER("version")
    tag, _, p = _tlv(b, p, e)  # digestAlgorithms
    if tag != 0x31:
        raise _NotPlainDER("digestAlgorithms")
    tag, es, ee = _tlv(b, p, e)  # EncapsulatedContentInfo
    if tag != 0x30:
        raise _NotPlainDER("encapContentInfo")
    p = ee
    tag, os_, oe = _tlv(b, es, ee)
    if tag != 0x06:
        raise _NotPlainDER("eContentType")
    econtent_type = b[es:oe]
    content = None
    if oe < ee:
        tag, cs, ce = _tlv(b, oe, ee)
        if tag != 0xA0 or ce != ee:
            raise _NotPlainDER("eContent")
        tag, vs, ve = _tlv(b, cs, ce)
        if tag != 0x04 or ve != ce:
            raise _NotPlainDER("eContent is not a primitive OCTET STRING")
        content = b[vs:ve]
    cert_ders: list[bytes] = []
    tag, s, q = _tlv(b, p, e)
    if tag == 0xA0:  # certificates [0] IMPLICIT SET OF CertificateChoices
        while s < q:
            ctag, _, cnext = _tlv(b, s, q)
            if ctag == 0x30:
                cert_ders.append(b[s:cnext])
            elif ctag not in (0xA0, 0xA1, 0xA2, 0xA3):  # other CertificateChoices: skipped
                raise _NotPlainDER("certificate choice")
            s = cnext
        p = q
        tag, s, q = _tlv(b, p, e)
    if tag == 0xA1:  # crls [1]: ignored
        p = q
        tag, s, q = _tlv(b, p, e)
    if tag != 0x31 or q != e:
        raise _NotPlainDER("signerInfos")
    signers: list[tuple[int, int]] = []
    while s < q:
        stag, ss, se = _tlv(b, s, q)
        if stag != 0x30:
            raise _NotPlainDER("SignerInfo")
        signers.append((ss, se))
        s = se
    if len(signers) != 1:
        return _Raw(econtent_type, content, cert_ders, len(signers), b"", b"", None, b"", b"")
    s, e = signers[0]
    tag, _, p = _tlv(b, s, e)  # version
    if tag != 0x02:
        raise _NotPlainDER("SignerInfo version")
    start = p
    _, _, p = _tlv(b, p, e)
    sid = b[start:p]
    start = p
    tag, _, p = _tlv(b, p, e)
    if tag != 0x30:
        raise _NotPlainDER("digestAlgorithm")
    digest_alg = b[start:p]
    start = p
    tag, _, p = _tlv(b, p, e)
    signed_attrs = None
    if tag == 0xA0:
        signed_attrs = b[start:p]
        start = p
        tag, _, p = _tlv(b, p, e)
    if tag != 0x30:
        raise _NotPlainDER("signatureAlgorithm")
    sig_alg = b[start:p]
    tag, vs, p = _tlv(b, p, e)
    if tag != 0x04:
        raise _NotPlainDER("signature")
    signature = b[vs:p]
    if p < e:
        tag, _, p = _tlv(b, p, e)  # unsignedAttrs [1]
        if tag != 0xA1 or p != e:
            raise _NotPlainDER("trailing SignerInfo fields")
    return _Raw(econtent_type, content, cert_ders, 1, sid, digest_alg, signed_attrs, sig_alg, signature)


def _walk_asn1crypto(der: bytes) -> _Raw:
    info = cms.ContentInfo.load(der, strict=True)
    if info["content_type"].native != "signed_data":
        raise SignatureError(MALFORMED_SIGNATURE, "the CMS message is not SignedData")
    sd = info["content"]
    eci = sd["encap_content_info"]
    raw_content = eci["content"]
    content = None if isinstance(raw_content, core.Void) else raw_content.native
    if content is not None and not isinstance(content, bytes):
        raise SignatureError(MALFORMED_SIGNATURE, "embedded content is not an OCTET STRING")
    certs = _certificate_ders(sd["certificates"])
    sis = sd["signer_infos"]
    if len(sis) != 1:
        return _Raw(eci["content_type"].dump(), content, certs, len(sis), b"", b"", None, b"", b"")
    si = sis[0]
    attrs = si["signed_attrs"]
    return _Raw(
        econtent_type=eci["content_type"].dump(), content=content, cert_ders=certs, n_signers=1,
        sid=si["sid"].dump(), digest_alg=si["digest_algorithm"].dump(),
        signed_attrs=None if isinstance(attrs, core.Void) else attrs.dump(),
        sig_alg=si["signature_algorithm"].dump(), signature=si["signature"].native,
    )


def parse_signed_data(der: object, detached_content: bytes | None = None) -> ParsedSignature:
    """Parse a DER ContentInfo(SignedData) with one signer; raise ``SignatureError`` if unusable.

    ``detached_content`` is the order document when it travelled beside the
    signature. If the signature also embeds content, both must be identical. ``der`` is typed ``object``:
    compiled, anything else must still be this SignatureError, not a TypeError at the call.
    """
    if not isinstance(der, (bytes, bytearray, memoryview)) or not der:
        raise SignatureError(MALFORMED_SIGNATURE, "no signature was received with the order")
    der = bytes(der)
    if len(der) > MAX_SIGNATURE_BYTES + MAX_DOCUMENT_BYTES:
        raise SignatureError(MALFORMED_SIGNATURE, f"the signature is {len(der)} bytes, over the limit of "
                                                  f"{MAX_SIGNATURE_BYTES + MAX_DOCUMENT_BYTES} (MAX_SIGNATURE_BYTES "
                                                  "+ MAX_DOCUMENT_BYTES)")
    if detached_content is not None and len(detached_content) > MAX_DOCUMENT_BYTES:
        raise SignatureError(MALFORMED_SIGNATURE, f"the order document is {len(detached_content)} bytes, over the "
                                                  f"limit of {MAX_DOCUMENT_BYTES} (MAX_DOCUMENT_BYTES)")
    try:
        try:
            raw = _walk_fast(der)
        except _NotPlainDER:
            raw = _walk_asn1crypto(der)
        _check_limits(raw, len(der))
        return _finish(raw, None if detached_content is None else bytes(detached_content))
    except SignatureError:
        raise
    except Exception as exc:  # untrusted input: whatever the parsers trip over means "unreadable"
        raise SignatureError(MALFORMED_SIGNATURE,
                             f"the signature is not a readable CMS SignedData ({exc.__class__.__name__})") from None


def _check_limits(raw: _Raw, total: int) -> None:
    """Refuse a signature over a size or certificate-count limit before its certificates are loaded."""
    content = len(raw.content) if raw.content is not None else 0
    if content > MAX_DOCUMENT_BYTES:
        raise SignatureError(MALFORMED_SIGNATURE, f"the embedded order document is {content} bytes, over the "
                                                  f"limit of {MAX_DOCUMENT_BYTES} (MAX_DOCUMENT_BYTES)")
    if total - content > MAX_SIGNATURE_BYTES:
        raise SignatureError(MALFORMED_SIGNATURE, f"the signature without the document is {total - content} bytes, "
                                                  f"over the limit of {MAX_SIGNATURE_BYTES} (MAX_SIGNATURE_BYTES)")
    if len(raw.cert_ders) > MAX_EMBEDDED_CERTS:
        raise SignatureError(MALFORMED_SIGNATURE, f"the signature embeds {len(raw.cert_ders)} certificates, over "
                                                  f"the limit of {MAX_EMBEDDED_CERTS} (MAX_EMBEDDED_CERTS)")


_ALG_MEMO: dict[bytes, tuple[str, str, tuple[str, int] | None]] = {}
_DIGEST_MEMO: dict[bytes, str] = {}
_SID_MEMO: dict[tuple[bytes, bytes], bool] = {}


def _memo_put(memo: dict, key, value) -> None:
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    memo[key] = value


def _finish(raw: _Raw, detached_content: bytes | None) -> ParsedSignature:
    if raw.econtent_type != _OID_DATA:
        raise SignatureError(MALFORMED_SIGNATURE, "signed content type is not id-data")
    if raw.content is not None and detached_content is not None and detached_content != raw.content:
        raise SignatureError(BAD_SIGNATURE, "the order document sent beside the signature differs from "
                                            "the one inside it")
    if raw.content is None and detached_content is None:
        raise SignatureError(MALFORMED_SIGNATURE, "detached signature received without the order document")
    content = raw.content if raw.content is not None else detached_content
    assert content is not None
    if raw.n_signers != 1:
        raise SignatureError(MALFORMED_SIGNATURE, f"expected one signer, found {raw.n_signers}")

    signer_der = next((d for d in raw.cert_ders if _sid_matches(raw.sid, d)), None)
    if signer_der is None:
        raise SignatureError(MALFORMED_SIGNATURE, "the signer's certificate is not included in the signature")
    try:
        signer = load_cert_cached(signer_der)
        others = tuple(load_cert_cached(d) for d in raw.cert_ders if d != signer_der)
        signer.public_key()  # unreadable or unknown key types are refused here, not mid-verify
    except Exception as exc:  # InvalidVersion, UnsupportedAlgorithm, ValueError...: all unreadable
        raise SignatureError(MALFORMED_SIGNATURE, f"an embedded certificate is unreadable ({exc})") from None

    digest_alg = _DIGEST_MEMO.get(raw.digest_alg)
    if digest_alg is None:
        digest_alg = algos.DigestAlgorithm.load(raw.digest_alg, strict=True)["algorithm"].native
        _memo_put(_DIGEST_MEMO, raw.digest_alg, digest_alg)
    sig = _ALG_MEMO.get(raw.sig_alg)
    if sig is None:
        sig = _decode_sig_alg(raw.sig_alg)
        _memo_put(_ALG_MEMO, raw.sig_alg, sig)
    sig_alg, sig_hash, pss = sig
    if sig_hash == "":  # plain rsaEncryption / ecPublicKey: the digest algorithm signs
        sig_hash = digest_alg

    content_type = message_digest = signing_time = None
    attrs_der = None
    if raw.signed_attrs is not None:
        attrs_der = b"\x31" + raw.signed_attrs[1:]  # [0] IMPLICIT -> universal SET OF (RFC 5652 5.4)
        try:
            content_type, message_digest, signing_time = _attrs_fast(attrs_der)
        except _NotPlainDER:
            content_type, message_digest, signing_time = _attrs_asn1crypto(attrs_der)
        if message_digest is None or content_type is None:
            raise SignatureError(MALFORMED_SIGNATURE, "signed attributes lack content-type or message-digest")

    return ParsedSignature(
        content=content, detached=raw.content is None, signer_cert=signer, signer_cert_der=signer_der,
        other_certs=others, digest_algorithm=digest_alg, signature_algorithm=sig_alg,
        signature_hash=sig_hash, pss_params=pss, signed_attrs_der=attrs_der,
        content_type=content_type, message_digest=message_digest, signing_time=signing_time,
        signature=raw.signature,
    )


def _decode_sig_alg(der: bytes) -> tuple[str, str, tuple[str, int] | None]:
    """(algorithm name, hash name or "" when the digest algorithm applies, PSS params)."""
    obj = algos.SignedDigestAlgorithm.load(der, strict=True)
    name = obj["algorithm"].native
    if name == "rsassa_pss":
        params = obj["parameters"]
        mgf = params["mask_gen_algorithm"]
        if mgf["algorithm"].native != "mgf1":
            raise SignatureError(WEAK_ALGORITHM, f"unsupported PSS mask generation {mgf['algorithm'].native!r}")
        return name, params["hash_algorithm"]["algorithm"].native, (
            mgf["parameters"]["algorithm"].native, int(params["salt_length"].native))
    if name in ("rsassa_pkcs1v15", "ecdsa", _ID_EC_PUBLIC_KEY):
        return name, "", None
    try:
        return name, obj.hash_algo, None
    except ValueError:
        return name, "unknown", None


def _sid_matches(sid: bytes, cert_der: bytes) -> bool:
    """Does the SignerIdentifier name this certificate (issuer+serial, or subject key id)?"""
    key = (sid, cert_der)
    hit = _SID_MEMO.get(key)
    if hit is None:
        s = cms.SignerIdentifier.load(sid, strict=True)
        c = asn1_x509.Certificate.load(cert_der)
        if s.name == "issuer_and_serial_number":
            hit = (c.serial_number == s.chosen["serial_number"].native
                   and c.issuer.dump() == s.chosen["issuer"].dump())
        else:
            hit = c.key_identifier is not None and c.key_identifier == s.chosen.native
        _memo_put(_SID_MEMO, key, hit)
    return hit


def _attrs_fast(attrs: bytes) -> tuple[str | None, bytes | None, datetime | None]:
    tag, s, e = _tlv(attrs, 0, len(attrs))
    if tag != 0x31 or e != len(attrs):
        raise _NotPlainDER("signed attributes")
    content_type = message_digest = signing_time = None
    seen: set[bytes] = set()
    while s < e:
        tag, a, ae = _tlv(attrs, s, e)
        if tag != 0x30:
            raise _NotPlainDER("attribute")
        tag, _, oe = _tlv(attrs, a, ae)
        if tag != 0x06:
            raise _NotPlainDER("attribute type")
        oid = attrs[a:oe]
        if oid in seen:
            raise SignatureError(MALFORMED_SIGNATURE, "a signed attribute appears twice")
        seen.add(oid)
        tag, vs, ve = _tlv(attrs, oe, ae)
        if tag != 0x31 or ve != ae:
            raise _NotPlainDER("attribute values")
        if oid in (_OID_CONTENT_TYPE, _OID_MESSAGE_DIGEST, _OID_SIGNING_TIME):
            vtag, v0, v1 = _tlv(attrs, vs, ve)
            if v1 != ve:
                raise SignatureError(MALFORMED_SIGNATURE, "a signed attribute must have exactly one value")
            if oid == _OID_CONTENT_TYPE:
                if vtag != 0x06:
                    raise _NotPlainDER("content-type value")
                content_type = "data" if attrs[vs:v1] == _OID_DATA else "other"
            elif oid == _OID_MESSAGE_DIGEST:
                if vtag != 0x04:
                    raise _NotPlainDER("message-digest value")
                message_digest = attrs[v0:v1]
            else:
                signing_time = _time_fast(vtag, attrs[v0:v1])
        s = ae
    return content_type, message_digest, signing_time


def _time_fast(tag: int, v: bytes) -> datetime:
    """DER UTCTime ``YYMMDDHHMMSSZ`` / GeneralizedTime ``YYYYMMDDHHMMSSZ``; others go to asn1crypto."""
    if tag == 0x17 and len(v) == 13 and v[12:] == b"Z" and v[:12].isdigit():
        yy = int(v[0:2])
        year = 1900 + yy if yy >= 50 else 2000 + yy
        return datetime(year, int(v[2:4]), int(v[4:6]), int(v[6:8]), int(v[8:10]), int(v[10:12]),
                        tzinfo=timezone.utc)
    if tag == 0x18 and len(v) == 15 and v[14:] == b"Z" and v[:14].isdigit():
        return datetime(int(v[0:4]), int(v[4:6]), int(v[6:8]), int(v[8:10]), int(v[10:12]), int(v[12:14]),
                        tzinfo=timezone.utc)
    raise _NotPlainDER("time format")


def _attrs_asn1crypto(attrs: bytes) -> tuple[str | None, bytes | None, datetime | None]:
    content_type = message_digest = signing_time = None
    seen: set[str] = set()
    for attr in cms.CMSAttributes.load(attrs, strict=True):
        name = attr["type"].native
        if name in seen:
            raise SignatureError(MALFORMED_SIGNATURE, f"signed attribute {name} appears twice")
        seen.add(name)
        values = attr["values"]
        if name in ("content_type", "message_digest", "signing_time") and len(values) != 1:
            raise SignatureError(MALFORMED_SIGNATURE, f"signed attribute {name} must have one value")
        if name == "content_type":
            content_type = "data" if values[0].native == "data" else "other"
        elif name == "message_digest":
            message_digest = values[0].native
        elif name == "signing_time":
            signing_time = values[0].native.astimezone(timezone.utc)
    return content_type, message_digest, signing_time


# ---------------------------------------------------------------------------- verification
def check_algorithms(parsed: ParsedSignature) -> None:
    """Raise ``WEAK_ALGORITHM`` unless digests are SHA-256+ and keys RSA >= 2048 / EC >= 256 bits."""
    for what, name in (("message digest", parsed.digest_algorithm),
                       ("signature hash", parsed.signature_hash),
                       ("PSS mask hash", parsed.pss_params[0] if parsed.pss_params else "sha256")):
        if name not in STRONG_HASHES:
            raise SignatureError(WEAK_ALGORITHM, f"{what} uses {name.upper()}; SHA-256 or stronger is required")
    if parsed.signature_algorithm not in ("rsassa_pkcs1v15", "rsassa_pss", "ecdsa", _ID_EC_PUBLIC_KEY) \
            and not parsed.signature_algorithm.endswith(("_rsa", "_ecdsa")):
        raise SignatureError(WEAK_ALGORITHM, f"signature algorithm {parsed.signature_algorithm} is not accepted")
    pub = parsed.signer_cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < MIN_RSA_BITS:
            raise SignatureError(WEAK_ALGORITHM,
                                 f"the certificate's RSA key is {pub.key_size} bits; at least {MIN_RSA_BITS} is required")
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.key_size < MIN_EC_BITS:
            raise SignatureError(WEAK_ALGORITHM,
                                 f"the certificate's EC key is {pub.curve.key_size} bits; at least {MIN_EC_BITS} is required")
    else:
        raise SignatureError(WEAK_ALGORITHM, f"{type(pub).__name__} keys are not accepted for CSOS signatures")


def verify_signature(parsed: ParsedSignature, *, check_strength: bool = True) -> None:
    """Verify integrity and the signature; raise ``SignatureError`` (WEAK_ALGORITHM or BAD_SIGNATURE).

    With signed attributes (the normal case) the message-digest attribute must
    equal the digest of the content - otherwise the document was altered - and
    the signature must verify over the signed attributes with the signer
    certificate's key - otherwise it was made with another key. Without signed
    attributes the signature is over the content itself (RFC 5652 5.4).
    """
    if check_strength:  # callers that already ran check_algorithms may skip it
        check_algorithms(parsed)
    if parsed.signed_attrs_der is not None:
        if parsed.content_type != "data":
            raise SignatureError(BAD_SIGNATURE, "the signed content-type attribute does not match the content")
        digest = hashlib.new(_HASHLIB[parsed.digest_algorithm], parsed.content).digest()
        if digest != parsed.message_digest:
            raise SignatureError(BAD_SIGNATURE, "the order document was altered after it was signed "
                                                "(its digest does not match the signed digest)")
        signed_bytes = parsed.signed_attrs_der
    else:
        signed_bytes = parsed.content
    h = STRONG_HASHES[parsed.signature_hash]()
    pub = parsed.signer_cert.public_key()
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            if parsed.signature_algorithm == "rsassa_pss":
                assert parsed.pss_params is not None
                mgf_hash = STRONG_HASHES[parsed.pss_params[0]]()
                pub.verify(parsed.signature, signed_bytes,
                           padding.PSS(padding.MGF1(mgf_hash), parsed.pss_params[1]), h)
            elif parsed.signature_algorithm == "rsassa_pkcs1v15" or parsed.signature_algorithm.endswith("_rsa"):
                pub.verify(parsed.signature, signed_bytes, padding.PKCS1v15(), h)
            else:
                raise SignatureError(BAD_SIGNATURE, "signature algorithm does not match the certificate's RSA key")
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            if not (parsed.signature_algorithm.endswith("_ecdsa")
                    or parsed.signature_algorithm in ("ecdsa", _ID_EC_PUBLIC_KEY)):
                raise SignatureError(BAD_SIGNATURE, "signature algorithm does not match the certificate's EC key")
            pub.verify(parsed.signature, signed_bytes, ec.ECDSA(h))
    except InvalidSignature:
        raise SignatureError(BAD_SIGNATURE, "the signature was not made with the private key of the "
                                            "certificate sent with the order") from None


def _hash_name(h: Any) -> str:
    inst = h() if isinstance(h, type) else h
    name = {"sha256": "sha256", "sha384": "sha384", "sha512": "sha512", "sha1": "sha1",
            "sha224": "sha224", "md5": "md5", "sha3-256": "sha3_256", "sha3-384": "sha3_384",
            "sha3-512": "sha3_512", "sha512-256": "sha512_256"}.get(inst.name)
    if name is None:
        raise ValueError(f"unsupported hash {inst.name}")
    return name


__all__ = [
    "BAD_SIGNATURE", "MALFORMED_SIGNATURE", "MAX_DOCUMENT_BYTES", "MAX_EMBEDDED_CERTS", "MAX_SIGNATURE_BYTES",
    "WEAK_ALGORITHM", "ParsedSignature", "SignatureError",
    "check_algorithms", "load_cert_cached", "parse_signed_data", "sign_order", "verify_signature",
]

"""CMS SignedData: building, parsing and verifying order signatures (streams/domain/cms.py)."""
from __future__ import annotations

import random
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from asn1crypto import cms as acms
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import pkcs7

from streams.tools.pki import Credential, TestPKI, pooled_key
from streams.domain import cms
from streams.domain.cms import SignatureError, parse_signed_data, sign_order, verify_signature

SIGNED = datetime(2026, 3, 1, 9, 30, 15, tzinfo=timezone.utc)
DOC = b'{"format":"csos-order/1","note":"line one\nline two\r\nend"}'  # mixed line endings on purpose


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI.create(reuse_keys=True)


@pytest.fixture(scope="module")
def rsa_cred(pki: TestPKI) -> Credential:
    return pki.issue_registrant("AP5836727", "Acme Pharmacy", ["2", "3"])


@pytest.fixture(scope="module")
def ec_cred(pki: TestPKI) -> Credential:
    return pki.issue_registrant("BR1234563", "Bay Hospital", ["2"], key_type="ec")


def _code(fn, *args, **kw) -> str:
    with pytest.raises(SignatureError) as ei:
        fn(*args, **kw)
    return ei.value.code


class TestRoundTrip:
    @pytest.mark.parametrize("detached", [False, True])
    def test_rsa(self, rsa_cred: Credential, detached: bool) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED, detached=detached,
                         intermediates=rsa_cred.chain)
        p = parse_signed_data(der, DOC if detached else None)
        verify_signature(p)
        assert p.content == DOC  # exact bytes: no CRLF canonicalization
        assert p.detached is detached
        assert p.signing_time == SIGNED
        assert p.digest_algorithm == "sha256"
        assert p.signer_cert == rsa_cred.cert
        assert p.other_certs == rsa_cred.chain
        assert p.content_type == "data"

    def test_ecdsa(self, ec_cred: Credential) -> None:
        p = parse_signed_data(sign_order(DOC, ec_cred.cert, ec_cred.key, signing_time=SIGNED))
        verify_signature(p)
        assert p.signature_algorithm == "sha256_ecdsa"

    def test_rsa_pss(self, rsa_cred: Credential) -> None:
        p = parse_signed_data(sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED, rsa_pss=True))
        verify_signature(p)
        assert p.signature_algorithm == "rsassa_pss"
        assert p.pss_params == ("sha256", 32)

    @pytest.mark.parametrize("h", [hashes.SHA384, hashes.SHA512])
    def test_stronger_hashes(self, rsa_cred: Credential, h) -> None:
        verify_signature(parse_signed_data(sign_order(DOC, rsa_cred.cert, rsa_cred.key,
                                                      signing_time=SIGNED, hash=h)))

    def test_subject_key_identifier_sid(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED, sid="ski",
                         intermediates=rsa_cred.chain)
        p = parse_signed_data(der)
        verify_signature(p)
        assert p.signer_cert == rsa_cred.cert

    def test_signing_time_after_2049_uses_generalized_time(self, rsa_cred: Credential) -> None:
        when = datetime(2051, 6, 1, 0, 0, 1, tzinfo=timezone.utc)
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=when)
        si = acms.ContentInfo.load(der)["content"]["signer_infos"][0]
        times = [a["values"][0] for a in si["signed_attrs"] if a["type"].native == "signing_time"]
        assert times[0].name == "generalized_time"
        assert parse_signed_data(der).signing_time == when

    def test_signing_time_must_be_aware(self, rsa_cred: Credential) -> None:
        with pytest.raises(ValueError):
            sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=datetime(2026, 1, 1))


class TestInterop:
    """Signatures from other CMS implementations verify here too."""

    @pytest.mark.parametrize("pss", [False, True])
    def test_cryptography_pkcs7_builder_binary(self, rsa_cred: Credential, pss: bool) -> None:
        b = (pkcs7.PKCS7SignatureBuilder().set_data(DOC)
             .add_signer(rsa_cred.cert, rsa_cred.key, hashes.SHA256(),
                         rsa_padding=padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
                         if pss else None))
        der = b.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
        p = parse_signed_data(der)
        verify_signature(p)
        assert p.content == DOC
        assert p.signing_time is not None  # cryptography always stamps wall-clock time

    def test_cryptography_pkcs7_builder_detached_ec(self, ec_cred: Credential) -> None:
        der = (pkcs7.PKCS7SignatureBuilder().set_data(DOC)
               .add_signer(ec_cred.cert, ec_cred.key, hashes.SHA256())
               .sign(serialization.Encoding.DER,
                     [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.DetachedSignature]))
        verify_signature(parse_signed_data(der, DOC))

    def test_cryptography_no_attributes(self, rsa_cred: Credential) -> None:
        # RFC 5652 allows SignedData without signed attributes: the signature is over the content.
        der = (pkcs7.PKCS7SignatureBuilder().set_data(DOC)
               .add_signer(rsa_cred.cert, rsa_cred.key, hashes.SHA256())
               .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoAttributes]))
        p = parse_signed_data(der)
        assert p.signed_attrs_der is None and p.signing_time is None
        verify_signature(p)

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
    def test_openssl_verifies_ours(self, rsa_cred: Credential, tmp_path: Path) -> None:
        (tmp_path / "sig.der").write_bytes(sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED))
        r = subprocess.run(["openssl", "cms", "-verify", "-noverify", "-binary", "-inform", "DER",
                            "-in", str(tmp_path / "sig.der")], capture_output=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout == DOC

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
    def test_ours_verifies_openssl_ber(self, rsa_cred: Credential, tmp_path: Path) -> None:
        # OpenSSL streams indefinite-length BER: exercises the asn1crypto fallback parser.
        (tmp_path / "doc").write_bytes(DOC)
        (tmp_path / "cert.pem").write_bytes(rsa_cred.cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "key.pem").write_bytes(rsa_cred.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        r = subprocess.run(["openssl", "cms", "-sign", "-binary", "-nodetach", "-stream", "-outform", "DER",
                            "-in", str(tmp_path / "doc"), "-signer", str(tmp_path / "cert.pem"),
                            "-inkey", str(tmp_path / "key.pem"), "-md", "sha256"], capture_output=True)
        assert r.returncode == 0, r.stderr
        with pytest.raises(cms._NotPlainDER):
            cms._walk_fast(r.stdout)
        p = parse_signed_data(r.stdout)
        verify_signature(p)
        assert p.content == DOC


class TestRefusals:
    def test_tampered_attached_content(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED)
        tampered = der.replace(b"line one", b"line 0ne")
        assert tampered != der
        assert _code(verify_signature, parse_signed_data(tampered)) == cms.BAD_SIGNATURE

    def test_tampered_detached_content(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED, detached=True)
        assert _code(verify_signature, parse_signed_data(der, DOC + b" ")) == cms.BAD_SIGNATURE

    def test_wrong_key(self, rsa_cred: Credential) -> None:
        other = pooled_key("rsa", slot="test-cms-wrong-key")
        der = sign_order(DOC, rsa_cred.cert, other, signing_time=SIGNED)
        with pytest.raises(SignatureError) as ei:
            verify_signature(parse_signed_data(der))
        assert ei.value.code == cms.BAD_SIGNATURE
        assert "private key" in ei.value.message

    def test_tampered_signed_attribute(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED)
        tampered = der.replace(b"260301093015Z", b"260301093016Z")  # signing time
        assert tampered != der
        assert _code(verify_signature, parse_signed_data(tampered)) == cms.BAD_SIGNATURE

    @pytest.mark.parametrize("h", [hashes.SHA1, hashes.SHA224, hashes.MD5])
    def test_weak_digest(self, rsa_cred: Credential, h) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED, hash=h)
        assert _code(verify_signature, parse_signed_data(der)) == cms.WEAK_ALGORITHM

    def test_rsa_1024(self, pki: TestPKI) -> None:
        weak = pki.issue_registrant("AP5836727", "Acme", ["2"], rsa_bits=1024)
        der = sign_order(DOC, weak.cert, weak.key, signing_time=SIGNED)
        with pytest.raises(SignatureError) as ei:
            verify_signature(parse_signed_data(der))
        assert ei.value.code == cms.WEAK_ALGORITHM and "1024" in ei.value.message

    def test_detached_without_document(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED, detached=True)
        assert _code(parse_signed_data, der, None) == cms.MALFORMED_SIGNATURE

    def test_attached_and_different_detached(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED)
        parse_signed_data(der, DOC)  # same bytes twice is fine
        assert _code(parse_signed_data, der, b"other") == cms.BAD_SIGNATURE

    @pytest.mark.parametrize("junk", [b"", b"\x30\x00", b"not a signature", b"\x30\x82\xff\xff\x06"])
    def test_garbage(self, junk: bytes) -> None:
        assert _code(parse_signed_data, junk, DOC) == cms.MALFORMED_SIGNATURE

    def test_truncated(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED)
        for cut in (10, len(der) // 2, len(der) - 1):
            assert _code(parse_signed_data, der[:cut]) == cms.MALFORMED_SIGNATURE

    def test_trailing_garbage(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED)
        assert _code(parse_signed_data, der + b"\x00") == cms.MALFORMED_SIGNATURE

    def test_no_signer_certificate(self, rsa_cred: Credential) -> None:
        der = (pkcs7.PKCS7SignatureBuilder().set_data(DOC)
               .add_signer(rsa_cred.cert, rsa_cred.key, hashes.SHA256())
               .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoCerts]))
        with pytest.raises(SignatureError) as ei:
            parse_signed_data(der)
        assert ei.value.code == cms.MALFORMED_SIGNATURE and "certificate" in ei.value.message

    def test_signer_certificate_swapped_for_another(self, rsa_cred: Credential, ec_cred: Credential) -> None:
        # The sid names the RSA certificate, but only the EC one is embedded.
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED)
        ci = acms.ContentInfo.load(der)
        from asn1crypto import x509 as ax
        ci["content"]["certificates"] = [acms.CertificateChoices(
            {"certificate": ax.Certificate.load(ec_cred.cert.public_bytes(serialization.Encoding.DER))})]
        assert _code(parse_signed_data, ci.dump(force=True)) == cms.MALFORMED_SIGNATURE

    def test_two_signers(self, rsa_cred: Credential, ec_cred: Credential) -> None:
        der = (pkcs7.PKCS7SignatureBuilder().set_data(DOC)
               .add_signer(rsa_cred.cert, rsa_cred.key, hashes.SHA256())
               .add_signer(ec_cred.cert, ec_cred.key, hashes.SHA256())
               .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))
        assert _code(parse_signed_data, der) == cms.MALFORMED_SIGNATURE

    def test_duplicate_signed_attribute(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED)
        ci = acms.ContentInfo.load(der)
        si = ci["content"]["signer_infos"][0]
        attrs = list(si["signed_attrs"])
        si["signed_attrs"] = acms.CMSAttributes(attrs + [attrs[1]])
        assert _code(parse_signed_data, ci.dump(force=True)) == cms.MALFORMED_SIGNATURE

    def test_missing_message_digest(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED)
        ci = acms.ContentInfo.load(der)
        si = ci["content"]["signer_infos"][0]
        si["signed_attrs"] = acms.CMSAttributes(
            [a for a in si["signed_attrs"] if a["type"].native != "message_digest"])
        assert _code(parse_signed_data, ci.dump(force=True)) == cms.MALFORMED_SIGNATURE


class TestFastParser:
    """The strict-DER fast walker must agree with asn1crypto on everything it accepts."""

    def _both(self, der: bytes, detached: bytes | None = None):
        fast = slow = None
        try:
            fast = cms._finish(cms._walk_fast(der), detached)
        except cms._NotPlainDER:
            fast = "fallback"
        except Exception as exc:  # noqa: BLE001 - compared below
            fast = type(exc)
        try:
            slow = cms._finish(cms._walk_asn1crypto(der), detached)
        except Exception as exc:  # noqa: BLE001
            slow = type(exc)
        return fast, slow

    @pytest.mark.parametrize("kw", [{}, {"detached": True}, {"rsa_pss": True}, {"sid": "ski"}])
    def test_agree_on_valid(self, rsa_cred: Credential, kw: dict) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED,
                         intermediates=rsa_cred.chain, **kw)
        fast, slow = self._both(der, DOC if kw.get("detached") else None)
        assert fast == slow

    def test_mutations_never_escape_or_disagree(self, rsa_cred: Credential) -> None:
        der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED, intermediates=rsa_cred.chain)
        rng = random.Random(1311)
        for _ in range(400):
            b = bytearray(der)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            mutated = bytes(b)
            try:
                p = parse_signed_data(mutated)
            except SignatureError:
                continue
            try:
                verify_signature(p)
            except SignatureError:
                pass
            fast, slow = self._both(mutated)
            if fast != "fallback" and not isinstance(fast, type):
                assert fast == slow, "fast parser accepted input asn1crypto reads differently"


def test_signed_bytes_cover_content_exactly(rsa_cred: Credential) -> None:
    """Binary mode: a CRLF-converted copy of the document must not verify."""
    der = sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED, detached=True)
    crlf = DOC.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert _code(verify_signature, parse_signed_data(der, crlf)) == cms.BAD_SIGNATURE


def test_signature_is_deterministic_structure(rsa_cred: Credential) -> None:
    """The signing time equals what the caller asked for, not the wall clock."""
    before = datetime.now(timezone.utc) - timedelta(days=1)
    p = parse_signed_data(sign_order(DOC, rsa_cred.cert, rsa_cred.key, signing_time=SIGNED))
    assert p.signing_time == SIGNED < before


def _with_subject_unique_id(cred: Credential, issuer: Credential) -> bytes:
    """``cred``'s certificate re-issued by ``issuer`` with a subjectUniqueID whose BIT STRING has 5 unused
    bits, sized so that the certificate's DER length ends in a 0x80 byte (like PKITS's UIDCACert, 0x0380).

    asn1crypto mistakes that length byte for BER's indefinite-length marker and re-encodes the whole
    certificate, normalising the BIT STRING: the bytes change and the issuer's signature no longer verifies.
    """
    from asn1crypto import core
    from asn1crypto import x509 as ax

    tbs = ax.Certificate.load(cred.cert.public_bytes(serialization.Encoding.DER))["tbs_certificate"]
    head = b"".join(tbs[name].dump() for name in ("version", "serial_number", "signature", "issuer", "validity",
                                                  "subject", "subject_public_key_info"))
    extensions = tbs["extensions"].dump()  # with its [3] EXPLICIT tag, as read
    sig_alg = ax.SignedDigestAlgorithm({"algorithm": "sha256_rsa"}).dump()
    for n in range(1, 400):
        uid = core.OctetString(b"\x05" + b"\xa5" * n + b"\x20").retag({"implicit": 2}).dump()  # [2] BIT STRING
        tbs_der = core.Sequence(contents=head + uid + extensions).dump()
        signature = issuer.key.sign(tbs_der, padding.PKCS1v15(), hashes.SHA256())
        der = core.Sequence(contents=tbs_der + sig_alg + core.OctetBitString(signature).dump()).dump()
        if der[3] == 0x80:
            return der
    raise AssertionError("no subjectUniqueID length gives a length byte of 0x80")


def test_embedded_certificates_are_their_original_bytes(pki: TestPKI, rsa_cred: Credential) -> None:
    """A certificate asn1crypto would re-encode is embedded (and read back) byte for byte, so it still verifies."""
    from asn1crypto import x509 as ax
    from cryptography import x509

    der = _with_subject_unique_id(rsa_cred, pki.sub_ca)
    assert ax.Certificate.load(der).dump() != der  # the re-encoding that corrupted it
    cert = x509.load_der_x509_certificate(der)
    cert.verify_directly_issued_by(pki.sub_ca.cert)
    signed = sign_order(DOC, cert, rsa_cred.key, signing_time=SIGNED, intermediates=[pki.sub_ca.cert])
    p = parse_signed_data(signed)
    assert p.signer_cert_der == der
    p.signer_cert.verify_directly_issued_by(pki.sub_ca.cert)
    verify_signature(p)
    slow = cms._walk_asn1crypto(signed)  # the fallback parser (BER input) reads the same bytes
    assert slow.cert_ders == [der, pki.sub_ca.cert.public_bytes(serialization.Encoding.DER)]

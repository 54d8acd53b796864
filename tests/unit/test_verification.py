"""Order verification (streams/verification/__init__.py) against a real test PKI (streams/tools/pki.py).

One passing and at least one failing case per reason code, built from real
certificates, CRLs and CMS signatures.
"""
from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fastavro
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from streams.tools.pki import Credential, TestPKI, load_pki, pooled_key
from streams import verification as V
from streams.domain.cert_profile import ExtensionOids
from streams.domain.cms import sign_order
from streams.domain.model import Order, OrderLine, Party
from streams.domain.order_document import encode_order
from streams.domain.products import Product, ProductMaster
from streams.verification import CHECKS, CRLError, Outcome, Verifier, enrich_lines

NOW = datetime(2026, 3, 2, 12, 0, 0, tzinfo=timezone.utc)  # "received at"
YEAR = timedelta(days=365)
DEA = "AP5836727"  # domain.md example
OTHER_DEA = "BR1234563"
SUPPLIER = Party("PA1234563", "Example Distribution Co", "100 Warehouse Rd, Columbus OH")
ALL_SCHEDULES = ["2", "2N", "3", "3N", "4", "5"]

OXY = Product("00406-0552-01", "Oxycodone HCl", "5 mg", "OXYCODONE", "2", "TAB", 100, 4.48, 1.5)
HYDRO = Product("00591-0385-01", "Hydrocodone Bitartrate/APAP", "10 mg/325 mg", "HYDROCODONE", "2", "TAB",
                100, 10.0, 1.0)
KETAMINE = Product("42023-0113-10", "Ketamine HCl", "50 mg/mL", "KETAMINE", "3N", "INJ", 10, 50.0, 0.0)
ALPRAZOLAM = Product("00228-2029-10", "Alprazolam", "1 mg", "ALPRAZOLAM", "4", "TAB", 100, 1.0, 0.0)
PRODUCTS = ProductMaster([OXY, HYDRO, KETAMINE, ALPRAZOLAM])

OXY_LINE = OrderLine(1, OXY.ndc, OXY.product_name, OXY.strength, 100, 2)
ALP_LINE = OrderLine(2, "0228-2029-10", ALPRAZOLAM.product_name, ALPRAZOLAM.strength, 100, 5)  # 4-4-2 form


# ---------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI.create(now=NOW, reuse_keys=True)


@pytest.fixture(scope="module")
def cred(pki: TestPKI) -> Credential:
    return pki.issue_registrant(DEA, "Acme Pharmacy", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)


@pytest.fixture
def crl(pki: TestPKI):
    return pki.build_crl(NOW - timedelta(hours=2), NOW + timedelta(days=7))


@pytest.fixture
def verifier(pki: TestPKI, crl) -> Verifier:
    return Verifier(pki.trust_anchors, pki.intermediates, [crl, pki.root_crl], PRODUCTS)


def make_order(signed_at: datetime = NOW - timedelta(hours=1), dea: str = DEA,
               lines: tuple[OrderLine, ...] = (OXY_LINE, ALP_LINE)) -> Order:
    return Order("26X000123", Party(dea, "Acme Pharmacy", "1 Main St, Springfield IL"), SUPPLIER,
                 signed_at, lines)


def signed(cred: Credential, order: Order | None = None, *, signing_time: datetime | None = None,
           detached: bool = False, chain: bool = True, **kw) -> tuple[bytes | None, bytes]:
    order = order or make_order()
    doc = encode_order(order)
    sig = sign_order(doc, cred.cert, cred.key, signing_time=signing_time or order.signed_at, detached=detached,
                     intermediates=cred.chain if chain else (), **kw)
    return (doc if detached else None), sig


def assert_ok(out: Outcome) -> None:
    assert out.ok, (out.reason_code, out.reason, out.checks)
    assert out.reason_code is None and out.reason is None
    assert [c.check for c in out.checks] == list(CHECKS)
    assert all(c.passed for c in out.checks)


def assert_fails(out: Outcome, code: str, check: str, *fragments: str) -> None:
    assert not out.ok
    assert out.reason_code == code, (out.reason_code, out.reason)
    # every check up to the failing one is recorded, in order, and only the last failed
    names = [c.check for c in out.checks]
    assert names == list(CHECKS[:CHECKS.index(check) + 1]), names
    assert all(c.passed for c in out.checks[:-1]) and not out.checks[-1].passed
    assert out.reason and out.reason.endswith(V.ADVICE[code])
    for f in fragments:
        assert f in out.reason, (f, out.reason)


# ---------------------------------------------------------------------------- passing orders
class TestPasses:
    def test_attached_rsa(self, verifier: Verifier, cred: Credential) -> None:
        out = verifier.verify(*signed(cred), NOW)
        assert_ok(out)
        assert out.order is not None and out.order.purchaser.dea_number == DEA
        assert out.signer_serial == format(cred.serial, "x")
        assert out.signer_fingerprint == cred.cert.fingerprint(hashes.SHA256()).hex()
        assert "Acme Pharmacy" in (out.signer_subject or "")
        assert out.signed_at == NOW - timedelta(hours=1)
        assert out.signer_cert_der == cred.cert.public_bytes(serialization.Encoding.DER)

    def test_detached(self, verifier: Verifier, cred: Credential) -> None:
        doc, sig = signed(cred, detached=True)
        assert doc is not None
        assert_ok(verifier.verify(doc, sig, NOW))

    def test_ecdsa(self, pki: TestPKI, verifier: Verifier) -> None:
        ec = pki.issue_registrant(DEA, "Acme Pharmacy", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR, key_type="ec")
        assert_ok(verifier.verify(*signed(ec), NOW))

    def test_ecdsa_pki(self) -> None:
        ec_pki = TestPKI.create(now=NOW, reuse_keys=True, key_type="ec")
        c = ec_pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR, key_type="ec")
        v = Verifier(ec_pki.trust_anchors, ec_pki.intermediates,
                     [ec_pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=1)), ec_pki.root_crl], PRODUCTS)
        assert_ok(v.verify(*signed(c), NOW))

    def test_rsa_pss(self, verifier: Verifier, cred: Credential) -> None:
        assert_ok(verifier.verify(*signed(cred, rsa_pss=True), NOW))

    def test_sha384_and_ski(self, verifier: Verifier, cred: Credential) -> None:
        assert_ok(verifier.verify(*signed(cred, hash=hashes.SHA384, sid="ski"), NOW))

    def test_chain_taken_from_the_signature(self, pki: TestPKI, crl, cred: Credential) -> None:
        # The verifier only knows the root; the sub-CA arrives inside the CMS. Its CRL
        # cannot be checked until the sub-CA is known, so the first order waits for it.
        v = Verifier(pki.trust_anchors, [], [pki.root_crl], PRODUCTS)
        with pytest.raises(CRLError, match="not a known CA"):
            v.update_crl(crl)
        assert v.verify(*signed(cred), NOW).reason_code == V.REVOCATION_UNKNOWN
        assert v.update_crl(crl)  # the sub-CA validated to the root and is now known
        assert_ok(v.verify(*signed(cred), NOW))

    def test_signed_by_cryptography_pkcs7_builder(self, pki: TestPKI) -> None:
        # cryptography stamps signingTime = wall clock, so use wall-clock times throughout.
        now = datetime.now(timezone.utc).replace(microsecond=0)
        c = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, now - YEAR, now + YEAR)
        doc = encode_order(make_order(signed_at=now))
        sig = (pkcs7.PKCS7SignatureBuilder().set_data(doc).add_signer(c.cert, c.key, hashes.SHA256())
               .add_certificate(pki.sub_ca.cert)
               .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))
        v = Verifier(pki.trust_anchors, pki.intermediates,
                     [pki.build_crl(now - timedelta(hours=1), now + timedelta(days=1)), pki.root_crl], PRODUCTS)
        assert_ok(v.verify(None, sig, now + timedelta(minutes=1)))

    def test_no_signing_time_attribute_uses_order_date(self, pki: TestPKI, verifier: Verifier,
                                                       cred: Credential) -> None:
        doc = encode_order(make_order())
        sig = (pkcs7.PKCS7SignatureBuilder().set_data(doc).add_signer(cred.cert, cred.key, hashes.SHA256())
               .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoAttributes]))
        out = verifier.verify(None, sig, NOW)
        assert_ok(out)
        assert out.signed_at == make_order().signed_at

    def test_expired_at_receipt_but_valid_at_signing(self, pki: TestPKI, verifier: Verifier) -> None:
        """1311.50: validity is judged at the signing date, not at receipt."""
        old = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW - timedelta(days=30))
        out = verifier.verify(*signed(old, make_order(signed_at=NOW - timedelta(days=40))), NOW)
        assert_ok(out)

    def test_order_age_59_days(self, verifier: Verifier, cred: Credential) -> None:
        assert_ok(verifier.verify(*signed(cred, make_order(signed_at=NOW - timedelta(days=59))), NOW))


# ---------------------------------------------------------------------------- one failure per reason code
class TestMalformedSignature:
    @pytest.mark.parametrize("sig", [b"", b"garbage", b"\x30\x03\x02\x01\x01"])
    def test_unreadable(self, verifier: Verifier, sig: bytes) -> None:
        out = verifier.verify(encode_order(make_order()), sig, NOW)
        assert_fails(out, V.MALFORMED_SIGNATURE, "signature_format")
        assert out.order is None and out.signer_serial is None

    def test_no_signer_certificate(self, verifier: Verifier, cred: Credential) -> None:
        doc = encode_order(make_order())
        sig = (pkcs7.PKCS7SignatureBuilder().set_data(doc).add_signer(cred.cert, cred.key, hashes.SHA256())
               .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoCerts]))
        assert_fails(verifier.verify(None, sig, NOW), V.MALFORMED_SIGNATURE, "signature_format", "certificate")

    def test_detached_without_document(self, verifier: Verifier, cred: Credential) -> None:
        _, sig = signed(cred, detached=True)
        assert_fails(verifier.verify(None, sig, NOW), V.MALFORMED_SIGNATURE, "signature_format")


class TestWeakAlgorithm:
    def test_sha1(self, verifier: Verifier, cred: Credential) -> None:
        assert_fails(verifier.verify(*signed(cred, hash=hashes.SHA1), NOW), V.WEAK_ALGORITHM, "algorithms", "SHA1")

    def test_rsa_1024(self, pki: TestPKI, verifier: Verifier) -> None:
        weak = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR, rsa_bits=1024)
        assert_fails(verifier.verify(*signed(weak), NOW), V.WEAK_ALGORITHM, "algorithms", "1024")


class TestBadSignature:
    def test_tampered_detached_document(self, verifier: Verifier, cred: Credential) -> None:
        doc, sig = signed(cred, detached=True)
        assert doc is not None
        tampered = doc.replace(b'"packages":2', b'"packages":9')
        assert tampered != doc
        out = verifier.verify(tampered, sig, NOW)
        assert_fails(out, V.BAD_SIGNATURE, "signature", "altered")
        assert out.order is None  # a tampered order is never parsed as if it were the purchaser's

    def test_tampered_attached_document(self, verifier: Verifier, cred: Credential) -> None:
        _, sig = signed(cred)
        tampered = sig.replace(b'"packages":2', b'"packages":9')
        assert tampered != sig
        assert_fails(verifier.verify(None, tampered, NOW), V.BAD_SIGNATURE, "signature", "altered")

    def test_wrong_signing_key(self, verifier: Verifier, cred: Credential) -> None:
        doc = encode_order(make_order())
        sig = sign_order(doc, cred.cert, pooled_key("rsa", slot="test-wrong-key"),
                         signing_time=make_order().signed_at, intermediates=cred.chain)
        assert_fails(verifier.verify(None, sig, NOW), V.BAD_SIGNATURE, "signature", "private key")


class TestMalformedOrder:
    def test_missing_element(self, verifier: Verifier, cred: Credential) -> None:
        doc = json.loads(encode_order(make_order()))
        del doc["supplier"]
        raw = json.dumps(doc).encode()
        sig = sign_order(raw, cred.cert, cred.key, signing_time=NOW - timedelta(hours=1), intermediates=cred.chain)
        out = verifier.verify(None, sig, NOW)
        assert_fails(out, V.MALFORMED_ORDER, "order_document", "supplier")

    def test_bad_ndc(self, verifier: Verifier, cred: Credential) -> None:
        doc = json.loads(encode_order(make_order()))
        doc["lines"][0]["ndc"] = "0040605520"  # ambiguous 10-digit form
        raw = json.dumps(doc).encode()
        sig = sign_order(raw, cred.cert, cred.key, signing_time=NOW - timedelta(hours=1), intermediates=cred.chain)
        assert_fails(verifier.verify(None, sig, NOW), V.MALFORMED_ORDER, "order_document", "lines[1].ndc")


class TestSigningTime:
    def test_cms_time_days_after_order_date(self, verifier: Verifier, cred: Credential) -> None:
        order = make_order(signed_at=NOW - timedelta(days=5))
        out = verifier.verify(*signed(cred, order, signing_time=NOW - timedelta(days=2)), NOW)
        assert_fails(out, V.SIGNING_TIME_MISMATCH, "signing_time", "24 hours")

    def test_within_tolerance_passes(self, verifier: Verifier, cred: Credential) -> None:
        order = make_order(signed_at=NOW - timedelta(days=1))
        assert_ok(verifier.verify(*signed(cred, order, signing_time=NOW - timedelta(hours=2)), NOW))

    def test_signed_after_receipt(self, verifier: Verifier, cred: Credential) -> None:
        order = make_order(signed_at=NOW + timedelta(hours=3))
        assert_fails(verifier.verify(*signed(cred, order), NOW), V.SIGNING_TIME_MISMATCH, "signing_time",
                     "after it was received")


class TestUntrusted:
    def test_rogue_ca(self, pki: TestPKI, verifier: Verifier) -> None:
        rogue = pki.rogue_registrant(DEA, "Acme Pharmacy", ALL_SCHEDULES, not_before=NOW - YEAR,
                                     not_after=NOW + YEAR)
        assert rogue.cert.issuer == pki.sub_ca.cert.subject  # same names, different keys
        out = verifier.verify(*signed(rogue), NOW)
        assert_fails(out, V.UNTRUSTED_CERTIFICATE, "certificate_path")
        assert out.signer_subject and "Acme Pharmacy" in out.signer_subject

    def test_ca_flag_on_leaf(self, pki: TestPKI, verifier: Verifier) -> None:
        bad = pki.issue_ca_flag_leaf(DEA, "Acme", ALL_SCHEDULES, not_before=NOW - YEAR, not_after=NOW + YEAR)
        assert_fails(verifier.verify(*signed(bad), NOW), V.UNTRUSTED_CERTIFICATE, "certificate_path", "CA")

    def test_wrong_key_usage(self, pki: TestPKI, verifier: Verifier) -> None:
        bad = pki.issue_wrong_key_usage_leaf(DEA, "Acme", ALL_SCHEDULES, not_before=NOW - YEAR,
                                             not_after=NOW + YEAR)
        assert_fails(verifier.verify(*signed(bad), NOW), V.UNTRUSTED_CERTIFICATE, "certificate_path", "key usage")

    def test_unknown_critical_extension(self, pki: TestPKI, verifier: Verifier) -> None:
        bad = pki.issue_unknown_critical_leaf(DEA, "Acme", ALL_SCHEDULES, not_before=NOW - YEAR,
                                              not_after=NOW + YEAR)
        assert_fails(verifier.verify(*signed(bad), NOW), V.UNTRUSTED_CERTIFICATE, "certificate_path", "critical")

    def test_missing_intermediate(self, pki: TestPKI, crl, cred: Credential) -> None:
        v = Verifier(pki.trust_anchors, [], [], PRODUCTS)
        out = v.verify(*signed(cred, chain=False), NOW)
        assert_fails(out, V.UNTRUSTED_CERTIFICATE, "certificate_path")
        # ...and the same certificate gets past the path check once the chain is supplied
        # (the negative cache is keyed on the certificates that came with the signature)
        assert v.verify(*signed(cred), NOW).reason_code == V.REVOCATION_UNKNOWN


class TestValidityAtSigning:
    def test_expired_at_signing(self, pki: TestPKI, verifier: Verifier) -> None:
        old = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW - timedelta(days=30))
        out = verifier.verify(*signed(old, make_order(signed_at=NOW - timedelta(days=10))), NOW)
        assert_fails(out, V.CERT_EXPIRED, "certificate_validity", "expired")

    def test_not_yet_valid_at_signing(self, pki: TestPKI, verifier: Verifier) -> None:
        new = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - timedelta(hours=1), NOW + YEAR)
        out = verifier.verify(*signed(new, make_order(signed_at=NOW - timedelta(hours=2))), NOW)
        assert_fails(out, V.CERT_NOT_YET_VALID, "certificate_validity")

    def test_cached_path_still_checks_each_signing_time(self, pki: TestPKI, verifier: Verifier) -> None:
        c = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW - timedelta(days=20))
        assert_ok(verifier.verify(*signed(c, make_order(signed_at=NOW - timedelta(days=25))), NOW))
        out = verifier.verify(*signed(c, make_order(signed_at=NOW - timedelta(days=5))), NOW)
        assert_fails(out, V.CERT_EXPIRED, "certificate_validity")


class TestRevocation:
    def test_revoked_before_signing(self, pki: TestPKI) -> None:
        c = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)
        pki.revoke(c.serial, NOW - timedelta(days=5))
        v = Verifier(pki.trust_anchors, pki.intermediates,
                     [pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=1)), pki.root_crl], PRODUCTS)
        out = v.verify(*signed(c, make_order(signed_at=NOW - timedelta(days=1))), NOW)
        assert_fails(out, V.CERT_REVOKED, "revocation", format(c.serial, "x"))

    def test_revoked_after_signing_still_rejected(self, pki: TestPKI) -> None:
        """Revocation is judged at receipt: a key revoked since signing is not trusted."""
        c = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)
        pki.revoke(c.serial, NOW - timedelta(days=1))
        v = Verifier(pki.trust_anchors, pki.intermediates,
                     [pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=1)), pki.root_crl], PRODUCTS)
        out = v.verify(*signed(c, make_order(signed_at=NOW - timedelta(days=3))), NOW)
        assert_fails(out, V.CERT_REVOKED, "revocation")

    def test_revoked_intermediate_via_root_crl(self, pki: TestPKI, crl, cred: Credential) -> None:
        root_crl = pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=30), issuer=pki.root,
                                 revoked={pki.sub_ca.cert.serial_number: NOW - timedelta(days=2)})
        v = Verifier(pki.trust_anchors, pki.intermediates, [crl, root_crl], PRODUCTS)
        assert_fails(v.verify(*signed(cred), NOW), V.CERT_REVOKED, "revocation", "CA certificate")

    def test_missing_crl(self, pki: TestPKI, cred: Credential) -> None:
        v = Verifier(pki.trust_anchors, pki.intermediates, [pki.root_crl], PRODUCTS)
        out = v.verify(*signed(cred), NOW)
        assert_fails(out, V.REVOCATION_UNKNOWN, "revocation")
        assert out.retryable
        # fail closed, then retry once the CRL arrives
        assert v.update_crl(pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=1)))
        assert_ok(v.verify(*signed(cred), NOW))

    def test_stale_crl(self, pki: TestPKI, cred: Credential) -> None:
        stale = pki.build_crl(NOW - timedelta(days=10), NOW - timedelta(days=3))
        v = Verifier(pki.trust_anchors, pki.intermediates, [stale, pki.root_crl], PRODUCTS)
        out = v.verify(*signed(cred), NOW)
        assert_fails(out, V.REVOCATION_UNKNOWN, "revocation", "expired")
        assert out.retryable

    def test_ca_certificate_needs_a_crl_too(self, pki: TestPKI, crl, cred: Credential) -> None:
        """Hard-fail for every certificate of the path: without the root's CRL the sub-CA's status is
        unknown, so a leaf under a (possibly revoked) sub-CA does not pass."""
        v = Verifier(pki.trust_anchors, pki.intermediates, [crl], PRODUCTS)
        assert_fails(v.verify(*signed(cred), NOW), V.REVOCATION_UNKNOWN, "revocation", "CA certificate")


class TestCrlLoading:
    def test_wrong_key_crl_refused_on_load(self, pki: TestPKI, cred: Credential) -> None:
        """A refused CRL is reported, never raised out of the constructor (the worker starts)."""
        bad = pki.crl_signed_by_wrong_key(NOW - timedelta(hours=1), NOW + timedelta(days=1))
        v = Verifier(pki.trust_anchors, pki.intermediates, [bad, pki.root_crl], PRODUCTS)
        assert [(r.kind, "not signed by" in r.reason) for r in v.refusals] == [("crl", True)]
        assert v.verify(*signed(cred), NOW).reason_code == V.REVOCATION_UNKNOWN

    def test_wrong_key_crl_refused_on_update(self, verifier: Verifier, pki: TestPKI, cred: Credential) -> None:
        bad = pki.crl_signed_by_wrong_key(NOW - timedelta(hours=1), NOW + timedelta(days=1))
        with pytest.raises(CRLError):
            verifier.update_crl(bad.public_bytes(serialization.Encoding.DER))
        assert_ok(verifier.verify(*signed(cred), NOW))  # the good CRL is still in place

    def test_unknown_issuer_refused(self, pki: TestPKI) -> None:
        other = TestPKI.create(now=NOW, reuse_keys=True, key_type="ec")
        crl = other.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=1))
        v = Verifier(pki.trust_anchors, [], [], PRODUCTS)
        with pytest.raises(CRLError):
            v.update_crl(crl)

    def test_older_crl_does_not_roll_back(self, pki: TestPKI, cred: Credential) -> None:
        c = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)
        before = pki.build_crl(NOW - timedelta(days=2), NOW + timedelta(days=5))
        pki.revoke(c.serial, NOW - timedelta(days=1))
        after = pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=5))
        v = Verifier(pki.trust_anchors, pki.intermediates, [after, pki.root_crl], PRODUCTS)
        assert v.update_crl(before) is False
        assert_fails(v.verify(*signed(c), NOW), V.CERT_REVOKED, "revocation")

    def test_pem_bytes_accepted(self, pki: TestPKI, cred: Credential) -> None:
        v = Verifier(pki.trust_anchors, pki.intermediates, [pki.root_crl], PRODUCTS)
        crl = pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=1))
        assert v.update_crl(crl.public_bytes(serialization.Encoding.PEM))
        assert_ok(v.verify(*signed(cred), NOW))


class TestDeaNumber:
    def test_other_registrants_certificate(self, pki: TestPKI, verifier: Verifier) -> None:
        other = pki.issue_registrant(OTHER_DEA, "Bay Hospital", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)
        out = verifier.verify(*signed(other, make_order(dea=DEA)), NOW)
        assert_fails(out, V.DEA_MISMATCH, "dea_number", DEA, OTHER_DEA)

    def test_certificate_dea_has_bad_check_digit(self, pki: TestPKI, verifier: Verifier) -> None:
        bad = pki.issue_registrant("AP5836720", "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)
        assert_fails(verifier.verify(*signed(bad), NOW), V.DEA_MISMATCH, "dea_number", "not a valid DEA number")

    def test_certificate_without_dea_extension(self, pki: TestPKI, crl) -> None:
        # The verifier looks for different OIDs than the PKI wrote: no DEA number found.
        other_oids = ExtensionOids(dea_number="2.25.1", schedules="2.25.2")
        c = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)
        v = Verifier(pki.trust_anchors, pki.intermediates, [crl, pki.root_crl], PRODUCTS, other_oids)
        assert_fails(v.verify(*signed(c), NOW), V.DEA_MISMATCH, "dea_number", "no DEA number")

    def test_configured_oids_from_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CSOS_DEA_NUMBER_OID", "2.25.11")
        monkeypatch.setenv("CSOS_SCHEDULES_OID", "2.25.12")
        oids = ExtensionOids.from_env()
        assert (oids.dea_number, oids.schedules) == ("2.25.11", "2.25.12")
        p = TestPKI.create(now=NOW, reuse_keys=True)  # picks the env OIDs up too
        c = p.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)
        assert c.cert.extensions.get_extension_for_oid(oids.dea_number_oid)
        v = Verifier(p.trust_anchors, p.intermediates,
                     [p.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=1)), p.root_crl], PRODUCTS)
        assert_ok(v.verify(*signed(c), NOW))


class TestProducts:
    def test_unknown_ndc(self, verifier: Verifier, cred: Credential) -> None:
        line = OrderLine(3, "99999-9999-99", "Mystery", "1 mg", 100, 1)
        out = verifier.verify(*signed(cred, make_order(lines=(OXY_LINE, line))), NOW)
        assert_fails(out, V.UNKNOWN_PRODUCT, "products", "line 3", "99999-9999-99")
        assert out.retryable

    def test_schedule_not_authorized(self, pki: TestPKI, verifier: Verifier) -> None:
        c = pki.issue_registrant(DEA, "Acme", ["3", "3N", "4", "5"], NOW - YEAR, NOW + YEAR)
        oxy_line_3 = OrderLine(3, OXY.ndc, OXY.product_name, OXY.strength, 100, 1)
        out = verifier.verify(*signed(c, make_order(lines=(ALP_LINE, oxy_line_3))), NOW)
        assert_fails(out, V.SCHEDULE_NOT_AUTHORIZED, "schedules", "line 3", OXY.ndc, "schedule 2")
        assert not out.retryable

    def test_2n_is_not_2(self, pki: TestPKI, verifier: Verifier) -> None:
        c = pki.issue_registrant(DEA, "Acme", ["2N", "3", "3N", "4", "5"], NOW - YEAR, NOW + YEAR)
        assert_fails(verifier.verify(*signed(c, make_order(lines=(OXY_LINE,))), NOW),
                     V.SCHEDULE_NOT_AUTHORIZED, "schedules")

    def test_schedule_3n_authorized(self, pki: TestPKI, verifier: Verifier) -> None:
        c = pki.issue_registrant(DEA, "Acme", ["3N"], NOW - YEAR, NOW + YEAR)
        line = OrderLine(1, KETAMINE.ndc, KETAMINE.product_name, KETAMINE.strength, 10, 3)
        assert_ok(verifier.verify(*signed(c, make_order(lines=(line,))), NOW))


class TestOrderAge:
    def test_received_61_days_after_signing(self, verifier: Verifier, cred: Credential) -> None:
        out = verifier.verify(*signed(cred, make_order(signed_at=NOW - timedelta(days=61))), NOW)
        assert_fails(out, V.ORDER_EXPIRED, "order_age", "60 days")


# ---------------------------------------------------------------------------- caching, loading, enrichment
def test_path_validation_is_cached(monkeypatch: pytest.MonkeyPatch, verifier: Verifier, cred: Credential) -> None:
    calls = []
    real = verifier._pkix
    monkeypatch.setattr(verifier, "_pkix", lambda *a: calls.append(1) or real(*a))
    for i in range(5):
        assert_ok(verifier.verify(*signed(cred, make_order(signed_at=NOW - timedelta(hours=i + 1))), NOW))
    assert len(calls) == 1


def test_untrusted_result_is_cached(monkeypatch: pytest.MonkeyPatch, pki: TestPKI, verifier: Verifier) -> None:
    rogue = pki.rogue_registrant(DEA, "Acme", ALL_SCHEDULES, not_before=NOW - YEAR, not_after=NOW + YEAR)
    calls = []
    real = verifier._pkix
    monkeypatch.setattr(verifier, "_pkix", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        assert verifier.verify(*signed(rogue), NOW).reason_code == V.UNTRUSTED_CERTIFICATE
    assert len(calls) == 1


def test_verify_inside_a_running_event_loop(verifier: Verifier, cred: Credential) -> None:
    """The stream agent calls verify() from async code; path validation must still work."""
    doc, sig = signed(cred)

    async def agent() -> Outcome:
        return verifier.verify(doc, sig, NOW)

    assert_ok(asyncio.run(agent()))


def test_received_at_must_be_aware(verifier: Verifier, cred: Credential) -> None:
    with pytest.raises(ValueError):
        verifier.verify(*signed(cred), NOW.replace(tzinfo=None))


def test_from_pki_dir_round_trip(tmp_path: Path) -> None:
    created = TestPKI.create(now=NOW, reuse_keys=True)
    created.issue_registrant(DEA, "Acme Pharmacy", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)
    created.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=7))
    created.write_pki(tmp_path)
    for rel in ("trust/root.pem", "trust/csos-sub-ca.pem", "crl/csos-sub-ca.crl",
                f"registrants/{DEA}/cert.pem", f"registrants/{DEA}/key.pem"):
        assert (tmp_path / rel).is_file(), rel
    loaded = load_pki(tmp_path)
    c = loaded.registrants[DEA]
    assert c.cert == created.registrants[DEA].cert
    v = Verifier.from_pki_dir(tmp_path, PRODUCTS)
    assert_ok(v.verify(*signed(c), NOW))
    # the loaded PKI can keep issuing and revoking
    loaded.revoke(c.serial, NOW - timedelta(hours=3))
    loaded.build_crl(NOW - timedelta(minutes=30), NOW + timedelta(days=7))
    loaded.write_pki(tmp_path)
    v2 = Verifier.from_pki_dir(tmp_path, PRODUCTS)
    assert v2.verify(*signed(c), NOW).reason_code == V.CERT_REVOKED


def test_enrich_lines_matches_avro_schema(verifier: Verifier, cred: Credential) -> None:
    out = verifier.verify(*signed(cred), NOW)
    assert out.order is not None
    lines = enrich_lines(out.order, PRODUCTS)
    schema_path = Path(__file__).resolve().parents[2] / "schemas" / "avro" / "order_line.avsc"
    schema = fastavro.parse_schema(json.loads(schema_path.read_text()))
    for rec in lines:
        fastavro.validation.validate(rec, schema, raise_errors=True)
    oxy, alp = lines
    assert oxy["dosage_units"] == 200 and oxy["schedule"] == "2" and oxy["drug_family"] == "OXYCODONE"
    assert oxy["base_weight_g"] == pytest.approx(200 * 4.48 / 1000)
    assert oxy["mme"] == pytest.approx(200 * 4.48 * 1.5)
    assert alp["ndc"] == "00228-2029-10" and alp["mme"] == 0.0


def test_enrich_lines_unknown_product() -> None:
    order = make_order(lines=(OrderLine(1, "99999-9999-99", "X", "1", 1, 1),))
    with pytest.raises(KeyError):
        enrich_lines(order, PRODUCTS)


# ---------------------------------------------------------------------------- certificate profile
class TestCertProfile:
    def test_encodings_round_trip(self) -> None:
        from streams.domain import cert_profile as cp
        assert cp.decode_dea_number(cp.encode_dea_number(DEA)) == DEA
        assert cp.encode_dea_number(DEA)[:2] == b"\x0c\x09"  # UTF8String, 9 bytes
        der = cp.encode_schedules(["5", "2", "2n", "2"])
        assert der[0] == 0x30  # SEQUENCE OF UTF8String, canonical order, no duplicates
        assert cp.decode_schedules(der) == frozenset({"2", "2N", "5"})

    def test_defaults_live_under_the_uuid_arc(self) -> None:
        oids = ExtensionOids()
        assert oids.dea_number.startswith("2.25.") and oids.schedules.startswith("2.25.")
        assert ExtensionOids.from_env({}) == oids

    @pytest.mark.parametrize("bad", [{"dea_number": "not-an-oid"}, {"dea_number": "2.25.5", "schedules": "2.25.5"}])
    def test_bad_oid_configuration(self, bad: dict) -> None:
        with pytest.raises(ValueError):
            ExtensionOids(**bad)

    def test_unknown_schedule_refused(self) -> None:
        from streams.domain import cert_profile as cp
        with pytest.raises(ValueError):
            cp.encode_schedules(["2", "6"])
        with pytest.raises(cp.CertProfileError):
            cp.decode_schedules(cp._Schedules(["2", "6"]).dump())

    def test_malformed_extension_is_a_dea_mismatch(self, pki: TestPKI, verifier: Verifier) -> None:
        from cryptography import x509
        from streams.domain import cert_profile as cp
        oids = ExtensionOids.from_env()
        good = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)
        b = (x509.CertificateBuilder().subject_name(good.cert.subject).issuer_name(good.cert.issuer)
             .public_key(good.key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(NOW - YEAR).not_valid_after(NOW + YEAR))
        for ext in good.cert.extensions:
            if ext.oid == oids.dea_number_oid:  # an INTEGER where a UTF8String belongs
                ext = x509.Extension(ext.oid, False, x509.UnrecognizedExtension(ext.oid, b"\x02\x01\x05"))
            b = b.add_extension(ext.value, ext.critical)
        cert = b.sign(pki.sub_ca.key, hashes.SHA256())
        with pytest.raises(cp.CertProfileError):
            cp.read_registration(cert, oids)
        bad = Credential(cert, good.key, good.chain)
        assert_fails(verifier.verify(*signed(bad), NOW), V.DEA_MISMATCH, "dea_number", "unreadable")


# ---------------------------------------------------------------------------- issue 12: nothing crashes
def _crl_builder(issuer_cred: Credential, number: int = 900) -> x509.CertificateRevocationListBuilder:
    return (x509.CertificateRevocationListBuilder().issuer_name(issuer_cred.cert.subject)
            .last_update(NOW - timedelta(hours=1)).next_update(NOW + timedelta(days=1))
            .add_extension(x509.CRLNumber(number), critical=False))


def _ca_without_crl_sign(pki: TestPKI, cn: str = "CSOS TEST No-CRL-Sign CA") -> Credential:
    """A sub-CA under our root that may sign certificates but not CRLs."""
    key = pooled_key("rsa", slot=cn)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(pki.root.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - YEAR).not_valid_after(NOW + YEAR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(pki.root.key, hashes.SHA256()))
    return Credential(cert, key, (cert,))


class TestRefusedCrlsAreReported:
    """A CRL the verifier cannot use is a line in ``refusals`` (audited as crl.refused by the worker,
    printed by verify-offline), never an exception out of the constructor."""

    def test_every_kind_of_refusal_is_reported_and_the_rest_still_loads(self, pki: TestPKI, crl,
                                                                          cred: Credential) -> None:
        no_sign = _ca_without_crl_sign(pki)
        delta = (_crl_builder(pki.sub_ca, 901).add_extension(x509.DeltaCRLIndicator(899), critical=True)
                 .sign(pki.sub_ca.key, hashes.SHA256()))
        stranger = _ca_without_crl_sign(pki, "CSOS TEST Unknown CA")  # never given to the verifier
        refused = {
            "not a known CA": _crl_builder(stranger).sign(stranger.key, hashes.SHA256()),
            "no cRLSign": _crl_builder(no_sign).sign(no_sign.key, hashes.SHA256()),
            "without its base": delta,
            "not signed by": pki.crl_signed_by_wrong_key(NOW - timedelta(hours=1), NOW + timedelta(days=1)),
            "unreadable": b"\x30\x03\x02\x01\x00",
        }
        v = Verifier(pki.trust_anchors, pki.intermediates + [no_sign.cert],
                     [*refused.values(), crl, pki.root_crl], PRODUCTS)
        reasons = [r.reason for r in v.refusals]
        assert len(reasons) == len(refused), reasons
        for expected in refused:
            assert any(expected in r for r in reasons), (expected, reasons)
        assert_ok(v.verify(*signed(cred), NOW))  # the good CRLs took effect

    def test_update_crl_raises_the_refusal_class(self, verifier: Verifier) -> None:
        with pytest.raises(V.CrlRefused, match="unreadable"):
            verifier.update_crl(b"garbage")

    def test_delta_crl_after_its_base_applies(self, pki: TestPKI, cred: Credential) -> None:
        """Delta CRLs are supported (RFC 5280 5.2.6): a base CRL that announces deltas (freshestCRL) and
        a delta listing the signer revoke it."""
        c = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR, record=False)
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.sub_ca.key.public_key())
        freshest = x509.FreshestCRL([x509.DistributionPoint(
            [x509.UniformResourceIdentifier("http://crl.example/csos-delta.crl")], None, None, None)])
        base = (_crl_builder(pki.sub_ca, 950).add_extension(aki, critical=False)
                .add_extension(freshest, critical=False).sign(pki.sub_ca.key, hashes.SHA256()))
        delta = (_crl_builder(pki.sub_ca, 951).add_extension(aki, critical=False)
                 .add_extension(x509.DeltaCRLIndicator(950), critical=True)
                 .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(c.serial)
                                          .revocation_date(NOW - timedelta(hours=2)).build())
                 .sign(pki.sub_ca.key, hashes.SHA256()))
        v = Verifier(pki.trust_anchors, pki.intermediates, [delta, base, pki.root_crl], PRODUCTS)
        assert v.refusals == []
        assert_fails(v.verify(*signed(c), NOW), V.CERT_REVOKED, "revocation")
        assert_ok(v.verify(*signed(cred), NOW))

    def test_unreadable_certificate_in_the_trust_directory_is_reported(self, tmp_path: Path, pki: TestPKI,
                                                                      cred: Credential) -> None:
        pki.write_pki(tmp_path)
        (tmp_path / "trust" / "broken.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        os.chmod(tmp_path / "trust" / "broken.pem", 0o644)
        (tmp_path / "crl" / "junk.crl").write_bytes(b"not a CRL")
        v = Verifier.from_pki_dir(tmp_path, PRODUCTS)
        assert {(r.kind, Path(r.source).name) for r in v.refusals} == {("certificate", "broken.pem"),
                                                                        ("crl", "junk.crl")}
        assert_ok(v.verify(*signed(cred), NOW))


class TestRevocationCache:
    def test_new_crl_invalidates_a_cached_pass(self, pki: TestPKI, crl) -> None:
        c = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR, record=False)
        v = Verifier(pki.trust_anchors, pki.intermediates, [crl, pki.root_crl], PRODUCTS)
        assert_ok(v.verify(*signed(c), NOW))
        later = pki.build_crl(NOW - timedelta(minutes=30), NOW + timedelta(days=7), revoked={c.serial: NOW})
        assert v.update_crl(later)
        assert_fails(v.verify(*signed(c), NOW), V.CERT_REVOKED, "revocation")

    def test_cached_pass_does_not_outlive_the_crl(self, verifier: Verifier, cred: Credential) -> None:
        assert_ok(verifier.verify(*signed(cred), NOW))
        late = NOW + timedelta(days=8)  # past the CRL's nextUpdate (NOW + 7 days)
        out = verifier.verify(*signed(cred, make_order(signed_at=late - timedelta(hours=1))), late)
        assert_fails(out, V.REVOCATION_UNKNOWN, "revocation", "expired")


class TestCaRevocationCache:
    """A CA's passing revocation verdict is shared by the signers under it, and never outlives its CRLs."""

    def test_a_second_signer_under_a_checked_ca_checks_only_its_own_certificate(
            self, monkeypatch: pytest.MonkeyPatch, pki: TestPKI, crl, cred: Credential) -> None:
        v = Verifier(pki.trust_anchors, pki.intermediates, [crl, pki.root_crl], PRODUCTS)
        assert_ok(v.verify(*signed(cred), NOW))
        checked: list[str] = []
        real = V.verify_crl

        async def counting(cert, *args, **kw):
            checked.append(cert.subject.native.get("common_name", ""))
            return await real(cert, *args, **kw)

        monkeypatch.setattr(V, "verify_crl", counting)
        other = pki.issue_registrant(DEA, "Acme Two", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR, record=False)
        assert_ok(v.verify(*signed(other), NOW))
        assert len(checked) == 1, checked  # the new signer only: the sub-CA's pass was reused

    def test_a_crl_revoking_the_ca_stops_every_signer_under_it_at_the_next_order(
            self, pki: TestPKI, crl, cred: Credential) -> None:
        v = Verifier(pki.trust_anchors, pki.intermediates, [crl, pki.root_crl], PRODUCTS)
        assert_ok(v.verify(*signed(cred), NOW))  # the sub-CA's pass is cached now
        root_crl = pki.build_crl(NOW - timedelta(minutes=30), NOW + timedelta(days=30), issuer=pki.root,
                                 revoked={pki.sub_ca.cert.serial_number: NOW - timedelta(hours=1)})
        assert v.update_crl(root_crl)
        other = pki.issue_registrant(DEA, "Acme Two", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR, record=False)
        for who in (other, cred):
            assert_fails(v.verify(*signed(who), NOW), V.CERT_REVOKED, "revocation", "CA certificate")

    def test_a_ca_pass_does_not_outlive_the_crl_covering_the_ca(self, pki: TestPKI, cred: Credential) -> None:
        short_root = pki.build_crl(NOW - timedelta(minutes=50), NOW + timedelta(days=2), issuer=pki.root)
        v = Verifier(pki.trust_anchors, pki.intermediates,
                     [pki.build_crl(NOW - timedelta(hours=2), NOW + timedelta(days=30)), short_root], PRODUCTS)
        assert_ok(v.verify(*signed(cred), NOW))
        late = NOW + timedelta(days=3)  # the root's CRL (covering the sub-CA) expired; the sub-CA's did not
        other = pki.issue_registrant(DEA, "Acme Two", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR, record=False)
        out = v.verify(*signed(other, make_order(signed_at=late - timedelta(hours=1))), late)
        assert_fails(out, V.REVOCATION_UNKNOWN, "revocation", "CA certificate")


def test_leaf_outside_its_issuers_validity_is_a_validity_failure(pki: TestPKI, verifier: Verifier) -> None:
    """A leaf whose validity does not overlap its issuer's: CERT_NOT_YET_VALID / CERT_EXPIRED, not untrusted."""
    ca_end = pki.sub_ca.cert.not_valid_after_utc
    c = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, ca_end + timedelta(days=1), ca_end + YEAR, record=False)
    assert_fails(verifier.verify(*signed(c), NOW), V.CERT_NOT_YET_VALID, "certificate_validity")
    early = pki.issue_registrant(DEA, "Acme", ALL_SCHEDULES, pki.sub_ca.cert.not_valid_before_utc - 2 * YEAR,
                                 pki.sub_ca.cert.not_valid_before_utc - YEAR, record=False)
    assert_fails(verifier.verify(*signed(early), NOW), V.CERT_EXPIRED, "certificate_validity")


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 64, b"-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n",
                                     b"\x30\x82\xff\xff" + b"\x01" * 40, "é ü".encode("utf-16")],
                         ids=["empty", "zeros", "bad-pem", "bad-der-length", "utf16-text"])
def test_verify_offline_never_prints_a_traceback(tmp_path: Path, pki: TestPKI, cred: Credential,
                                                 garbage: bytes) -> None:
    """Garbage as the signature, the document, a CRL, a trust certificate or the product master: a report
    or a one-line error, non-zero status, no traceback."""
    from click.testing import CliRunner

    from streams.cli import main

    d = pki.write_pki(tmp_path / "pki")
    products = tmp_path / "products.csv"
    PRODUCTS.save(products)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(garbage)
    _, sig = signed(cred)
    sig_path = tmp_path / "sig.p7s"
    sig_path.write_bytes(sig)
    bad_trust = tmp_path / "trust"
    bad_trust.mkdir()
    (bad_trust / "root.pem").write_bytes(garbage)
    base = ["verify-offline", "--received-at", NOW.isoformat()]
    runs = {
        "signature": base + ["--signature", str(junk), "--trust", str(d), "--products", str(products)],
        "document": base + ["--signature", str(junk), "--document", str(junk), "--trust", str(d),
                            "--products", str(products)],
        "crl": base + ["--signature", str(sig_path), "--trust", str(d), "--crl", str(junk),
                       "--products", str(products)],
        "trust": base + ["--signature", str(sig_path), "--trust", str(bad_trust), "--products", str(products)],
        "products": base + ["--signature", str(sig_path), "--trust", str(d), "--products", str(junk)],
        "certificate": base + ["--certificate", str(junk), "--trust", str(d)],
    }
    for what, args in runs.items():
        result = CliRunner().invoke(main, args)
        text = result.output
        assert result.exit_code != 0, (what, text)
        assert "Traceback" not in text and (result.exception is None or isinstance(result.exception, SystemExit)), \
            (what, text, result.exception)
        assert "RESULT: INVALID" in text or len(text.strip().splitlines()) == 1, (what, text)
    crl_run = CliRunner().invoke(main, runs["crl"])
    assert "CRL refused" in crl_run.output

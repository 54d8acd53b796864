"""What verification costs: ``Verifier.verify`` against a bare RSA-2048 verify, in one run.

Not a test. Builds a real test PKI (root -> CSOS sub-CA -> registrants, a
CRL), signs 2-line orders with a few registrant certificates (RSA-2048,
PKCS#1 v1.5, SHA-256, attached, chain included: what the simulator sends), and
measures, in interleaved rounds so that both see the same machine load, the
best-of-rounds rate of

* ``verify``: :meth:`streams.verification.Verifier.verify` in steady state
  (every signer's path already validated and cached), all twelve checks;
* ``cms``: only parsing the CMS and verifying the signature
  (:func:`streams.domain.cms.parse_signed_data` + :func:`streams.domain.cms.verify_signature`);
* ``bare``: ``cryptography``'s RSA-2048 PKCS#1 v1.5 SHA-256 verify of the same
  signed attributes, the floor any verifier pays;

and, separately, the first-time cost of a certificate never seen before: the
first ``verify`` of an order from each of ``new_certs`` new registrants (RFC 5280
path validation by pyhanko-certvalidator, then cached) minus the steady-state
per-order cost.
"""
from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from streams.domain.cms import parse_signed_data, sign_order, verify_signature
from streams.domain.model import Order, OrderLine, Party
from streams.domain.order_document import encode_order
from streams.domain.products import Product, ProductMaster
from streams.verification import Verifier

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
_SUPPLIER = Party("PA1234563", "Example Distribution Co", "100 Warehouse Rd, Columbus OH")
_OXY = Product("00406-0552-01", "Oxycodone HCl", "5 mg", "OXYCODONE", "2", "TAB", 100, 4.48, 1.5)
_ALP = Product("00228-2029-10", "Alprazolam", "1 mg", "ALPRAZOLAM", "4", "TAB", 100, 1.0, 0.0)
_SCHEDULES = ["2", "2N", "3", "3N", "4", "5"]


def _dea(prefix: str, n: int) -> str:
    """A DEA number with a valid check digit (see streams.domain.identifiers)."""
    d = [int(c) for c in f"{n:06d}"]
    check = ((d[0] + d[2] + d[4]) + 2 * (d[1] + d[3] + d[5])) % 10
    return f"{prefix}{n:06d}{check}"


def _order(i: int, dea: str) -> Order:
    return Order(f"26X{i:06d}", Party(dea, f"Pharmacy {dea}", "1 Main St, Springfield IL"), _SUPPLIER,
                 NOW - timedelta(hours=1),
                 (OrderLine(1, _OXY.ndc, _OXY.product_name, _OXY.strength, 100, 1 + i % 5),
                  OrderLine(2, _ALP.ndc, _ALP.product_name, _ALP.strength, 100, 1 + i % 3)))


def _signed(cred: Any, i: int, dea: str) -> tuple[None, bytes]:
    doc = encode_order(_order(i, dea))
    return None, sign_order(doc, cred.cert, cred.key, signing_time=NOW - timedelta(hours=1),
                            intermediates=cred.chain)


def run(n: int = 2000, *, rounds: int = 5, signers: int = 4, distinct_orders: int = 200,
        new_certs: int = 20) -> dict[str, Any]:
    """Measure and return the figures (rates per second, µs per operation, ratios).

    ``n`` operations per timed block; ``rounds`` interleaved rounds of
    (verify, cms, bare), best round kept; ``signers`` registrant certificates
    shared by ``distinct_orders`` signed orders; ``new_certs`` fresh
    certificates for the uncached path-validation cost.
    """
    from streams.tools.pki import TestPKI  # test-PKI tooling lives with the connectors

    pki = TestPKI.create(now=NOW, reuse_keys=True)
    crl = pki.build_crl(NOW - timedelta(hours=2), NOW + timedelta(days=7))
    verifier = Verifier(pki.trust_anchors, pki.intermediates, [crl, pki.root_crl], ProductMaster([_OXY, _ALP]))
    creds = [(pki.issue_registrant(_dea("BP", 100 + k), f"Pharmacy {k}", _SCHEDULES, NOW - timedelta(days=365),
                                   NOW + timedelta(days=365)), _dea("BP", 100 + k)) for k in range(signers)]
    orders = [_signed(cred, i, dea) for i, (cred, dea) in
              ((i, creds[i % signers]) for i in range(distinct_orders))]
    for doc, sig in orders:  # warm the path cache and check the setup is sound
        out = verifier.verify(doc, sig, NOW)
        if not out.ok:
            raise RuntimeError(f"benchmark order does not verify: {out.reason_code} {out.reason}")

    parsed0 = parse_signed_data(orders[0][1], None)
    pub = parsed0.signer_cert.public_key()
    bare_msg, bare_sig = parsed0.signed_attrs_der, parsed0.signature
    pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()
    seq = [orders[i % len(orders)] for i in range(n)]

    def t_verify() -> float:
        v = verifier.verify
        t0 = time.perf_counter()
        for doc, sig in seq:
            v(doc, sig, NOW)
        return time.perf_counter() - t0

    def t_cms() -> float:
        t0 = time.perf_counter()
        for doc, sig in seq:
            verify_signature(parse_signed_data(sig, doc))
        return time.perf_counter() - t0

    def t_bare() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            pub.verify(bare_sig, bare_msg, pkcs1, sha256)
        return time.perf_counter() - t0

    best = {"verify": float("inf"), "cms": float("inf"), "bare": float("inf")}
    for _ in range(rounds):
        for name, fn in (("verify", t_verify), ("cms", t_cms), ("bare", t_bare)):
            best[name] = min(best[name], fn())
    rate = {k: n / v for k, v in best.items()}
    us = {k: v / n * 1e6 for k, v in best.items()}

    # First time a certificate is seen: path validation (pyhanko-certvalidator), then cached.
    fresh = []
    for k in range(new_certs):
        dea = _dea("FN", 500 + k)
        cred = pki.issue_registrant(dea, f"New {k}", _SCHEDULES, NOW - timedelta(days=365), NOW + timedelta(days=365))
        fresh.append(_signed(cred, 10_000 + k, dea))
    first_us = []
    for doc, sig in fresh:
        t0 = time.perf_counter()
        out = verifier.verify(doc, sig, NOW)
        first_us.append((time.perf_counter() - t0) * 1e6)
        if not out.ok:
            raise RuntimeError(f"new-certificate order does not verify: {out.reason_code}")
    first_median = statistics.median(first_us)
    return {
        "n": n, "rounds": rounds, "signers": signers, "lines_per_order": 2,
        "verify_per_s": rate["verify"], "cms_per_s": rate["cms"], "bare_rsa_verify_per_s": rate["bare"],
        "verify_us": us["verify"], "cms_us": us["cms"], "bare_rsa_verify_us": us["bare"],
        "ratio_verify_to_bare": us["verify"] / us["bare"],
        "ratio_cms_to_bare": us["cms"] / us["bare"],
        "new_cert_first_verify_us_median": first_median,
        "new_cert_first_verify_us_max": max(first_us),
        "new_cert_path_validation_us": first_median - us["verify"],
        "new_certs": new_certs,
    }


def render(r: dict[str, Any]) -> str:
    return "\n".join([
        f"Verification cost ({r['n']} orders per round, best of {r['rounds']} interleaved rounds, "
        f"{r['signers']} signer certificates, {r['lines_per_order']}-line orders, RSA-2048 PKCS#1 v1.5 SHA-256)",
        f"  Verifier.verify, steady state (all 12 checks): {r['verify_per_s']:>9,.0f} orders/s "
        f"{r['verify_us']:>8.1f} µs/order",
        f"  CMS parse + signature only:                     {r['cms_per_s']:>9,.0f} /s       "
        f"{r['cms_us']:>8.1f} µs",
        f"  bare cryptography RSA-2048 verify:              {r['bare_rsa_verify_per_s']:>9,.0f} /s       "
        f"{r['bare_rsa_verify_us']:>8.1f} µs",
        f"  ratio Verifier.verify / bare RSA verify: {r['ratio_verify_to_bare']:.1f}x "
        f"(CMS parse + signature / bare: {r['ratio_cms_to_bare']:.1f}x)",
        f"  first order from a new certificate ({r['new_certs']} certificates): median "
        f"{r['new_cert_first_verify_us_median'] / 1000:.1f} ms, max {r['new_cert_first_verify_us_max'] / 1000:.1f} ms; "
        f"path validation ≈ {r['new_cert_path_validation_us'] / 1000:.1f} ms per new certificate (then cached)",
    ])

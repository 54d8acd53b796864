"""NIST PKITS (RFC 5280 path validation and revocation) through the verifier, as the worker and
``csos verify-offline`` run it.

The PKITS data (certificates, CRLs, expected results) is not in this repository: ``make pkits``
(a prerequisite of ``make test``) fetches it from the pyhanko-certvalidator source distribution
into ``.cache/pkits/nist_pkits``. Without it these tests skip, except in CI (``CI`` set), where
they fail: conformance must not silently disappear.

PKITS gives the end-entity certificates but not their private keys, so a case cannot be
re-signed as an order. Each case instead goes through :meth:`Verifier.check_certificate`,
the certificate-path, validity and revocation step that :meth:`Verifier.verify` itself runs
(checks 6-8), with the case's trust anchor, intermediates and CRLs:

* worker path: written as a PKI directory and loaded with ``Verifier.from_pki_dir`` (what the
  worker does at start);
* offline path: ``streams.apps.offline_verify.check_certificate_offline`` (``csos verify-offline
  --certificate``).

Applicable cases: sections 4.1 to 4.14 with the default policy inputs (the variants of 4.8, 4.10
and 4.12 that need a user-initial-policy-set or explicit-policy inputs are left out). DSA is
refused as documented policy (CSOS signs with RSA or ECDSA): the DSA cases (4.1.4-4.1.6) are
counted separately and must be refused. Expected: every other case valid/invalid as PKITS says,
invalid validity periods as CERT_EXPIRED / CERT_NOT_YET_VALID.
"""
from __future__ import annotations

import base64
import json
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from streams import verification as V
from streams.apps.offline_verify import check_certificate_offline
from streams.domain.products import ProductMaster
from streams.verification import Verifier

PKITS = Path(os.environ.get("CSOS_PKITS_DIR", Path(__file__).resolve().parents[2] / ".cache/pkits/nist_pkits"))
#: Inside every PKITS certificate's and CRL's validity (the data runs 2010-2030).
AT = datetime(2022, 5, 1, tzinfo=timezone.utc)
DSA_CASES = {"40104", "40105", "40106"}
ROOT, ROOT_CRL = "TrustAnchorRootCertificate.crt", "TrustAnchorRootCRL.crl"

if not (PKITS / "pkits.json").is_file():
    if os.environ.get("CI"):
        raise RuntimeError(f"NIST PKITS data missing at {PKITS}: run `make pkits` before the tests")
    pytest.skip(f"NIST PKITS data not found at {PKITS}; `make pkits` (part of `make test`) fetches it",
                allow_module_level=True)


def _applicable() -> list[dict]:
    cases = json.loads((PKITS / "pkits.json").read_text())
    return [c for c in cases if int(c["id"][:3]) <= 414 and "params" not in c]


CASES = _applicable()


def _pem(der: bytes) -> bytes:
    """PEM armour around the original bytes (not re-encoded: some PKITS certificates do not parse
    with cryptography, and the verifier must report those, not crash)."""
    b64 = base64.b64encode(der).decode()
    body = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n".encode()


def _pki_dir(case: dict, root: Path) -> tuple[Path, list[Path]]:
    """The case as a PKI directory: trust/root.pem, an intermediate file per other certificate, crl/."""
    (root / "trust").mkdir(mode=0o755, parents=True)  # the worker refuses a group/other-writable trust dir
    (root / "crl").mkdir(mode=0o755)
    (root / "trust" / "root.pem").write_bytes(_pem((PKITS / "certs" / ROOT).read_bytes()))
    for i, name in enumerate(case.get("other_certs", [])):
        (root / "trust" / f"ca-{i:02d}-{name}.pem").write_bytes(_pem((PKITS / "certs" / name).read_bytes()))
    crls = []
    for i, name in enumerate([ROOT_CRL, *case.get("crls", [])]):
        path = root / "crl" / f"{i:02d}-{name}"
        path.write_bytes((PKITS / "crls" / name).read_bytes())
        crls.append(path)
    return root, crls


def _judge(case: dict, finding: V.CertificateFinding) -> str:
    """'right', 'dsa-refused' or a description of what went wrong."""
    expected_valid = "error" not in case
    if case["id"] in DSA_CASES:
        return "dsa-refused" if not finding.ok else "DSA accepted"
    if finding.ok != expected_valid:
        return f"expected {'valid' if expected_valid else 'invalid'}, got {finding.reason_code}: {finding.reason}"
    if case["id"][:3] == "402" and not expected_valid and \
            finding.reason_code not in (V.CERT_EXPIRED, V.CERT_NOT_YET_VALID):
        return f"validity case refused as {finding.reason_code}, not CERT_EXPIRED/CERT_NOT_YET_VALID"
    return "right"


def _run(runner) -> tuple[Counter, list[str]]:
    tally: Counter = Counter()
    wrong = []
    for case in CASES:
        verdict = runner(case)
        tally[(case["id"][:3], verdict if verdict in ("right", "dsa-refused") else "wrong")] += 1
        if verdict not in ("right", "dsa-refused"):
            wrong.append(f"{case['id']} {case['name']}: {verdict}")
    return tally, wrong


def _table(tally: Counter) -> str:
    rows = ["section | cases | right | DSA refused (policy) | wrong"]
    for sec in sorted({s for s, _ in tally}):
        n = sum(v for (s, _), v in tally.items() if s == sec)
        rows.append(f"4.{int(sec[1:])} | {n} | {tally[(sec, 'right')]} | {tally[(sec, 'dsa-refused')]} | "
                    f"{tally[(sec, 'wrong')]}")
    return "\n".join(rows)


def test_pkits_through_the_workers_verifier(tmp_path: Path) -> None:
    """Every applicable case right through Verifier.from_pki_dir + the verifier's certificate checks."""
    def runner(case: dict) -> str:
        d, _ = _pki_dir(case, tmp_path / case["id"] / case["name"])
        verifier = Verifier.from_pki_dir(d, ProductMaster([]))  # refused CRLs/certificates: reported, not raised
        finding = verifier.check_certificate((PKITS / "certs" / case["cert"]).read_bytes(),
                                             signed_at=AT, received_at=AT)
        return _judge(case, finding)

    tally, wrong = _run(runner)
    print("\n" + _table(tally))
    assert not wrong, "\n".join(wrong)
    assert sum(tally.values()) == len(CASES) > 190


def test_pkits_through_verify_offline(tmp_path: Path) -> None:
    """The same cases through verify-offline's function (csos verify-offline --certificate)."""
    def runner(case: dict) -> str:
        d, crls = _pki_dir(case, tmp_path / case["id"] / case["name"])
        finding, _ = check_certificate_offline((PKITS / "certs" / case["cert"]).read_bytes(), d, crls, AT)
        return _judge(case, finding)

    tally, wrong = _run(runner)
    assert not wrong, "\n".join(wrong)


def test_revoked_ca_is_refused_with_the_ca_named(tmp_path: Path) -> None:
    """4.4.2: a leaf under a revoked intermediate is CERT_REVOKED, and the finding names the CA."""
    case = next(c for c in CASES if c["id"] == "40402")
    d, crls = _pki_dir(case, tmp_path)
    finding, _ = check_certificate_offline((PKITS / "certs" / case["cert"]).read_bytes(), d, crls, AT)
    assert finding.reason_code == V.CERT_REVOKED and "CA certificate" in finding.reason


def test_missing_intermediate_crl_fails_closed(tmp_path: Path) -> None:
    """Hard-fail on CA certificates: the valid 4.1.1 path without the root's CRL is REVOCATION_UNKNOWN."""
    case = next(c for c in CASES if c["id"] == "40101")
    d, crls = _pki_dir(case, tmp_path)
    finding, _ = check_certificate_offline((PKITS / "certs" / case["cert"]).read_bytes(), d, crls[1:], AT)
    assert finding.reason_code == V.REVOCATION_UNKNOWN and "CA certificate" in finding.reason

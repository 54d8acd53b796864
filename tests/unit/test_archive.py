"""The order archive (1311.55(c)(11), 1305.27): exact bytes in ClickHouse, two-year TTL, export, offline re-verify.

Real test PKI, real CMS signatures, written through the ClickHouse sink into
the embedded engine, read back byte for byte, exported, re-verified offline.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from streams.pipeline import sink_service
from streams.apps.archive import ArchiveNotFound, archived_by_id, crls_held_at, export_order, find_archived
from connectors.clickhouse.rows import archive_row, rows_for
from connectors.clickhouse.sink import ClickHouseSink, SourceRecord
from connectors.clickhouse.client import apply_ddl, open_client
from streams.tools.pki import Credential, TestPKI
from connectors.kafka import catalogue as t
from connectors.kafka.emit import Emitter
from connectors.kafka.testing import MemoryMessage, MemoryPublisher
from streams.core.avro_codec import default_codec
from streams.domain.cms import sign_order
from streams.core.config import Settings
from streams.domain.model import Order, OrderLine, Party
from streams.apps.offline_verify import render, reverify
from streams.domain.order_document import encode_order
from streams.domain.products import Product, ProductMaster
from streams.verification import BAD_SIGNATURE, CHECKS

NOW = datetime(2026, 3, 2, 12, 0, 0, tzinfo=timezone.utc)
YEAR = timedelta(days=365)
DEA = "AP5836727"
SUPPLIER = Party("PA1234563", "Example Distribution Co", "100 Warehouse Rd, Columbus OH")
OXY = Product("00406-0552-01", "Oxycodone HCl", "5 mg", "OXYCODONE", "2", "TAB", 100, 4.48, 1.5)
ALPRAZOLAM = Product("00228-2029-10", "Alprazolam", "1 mg", "ALPRAZOLAM", "4", "TAB", 100, 1.0, 0.0)
LINES = (OrderLine(1, OXY.ndc, OXY.product_name, OXY.strength, 100, 2),
         OrderLine(2, ALPRAZOLAM.ndc, ALPRAZOLAM.product_name, ALPRAZOLAM.strength, 100, 5))
DER = serialization.Encoding.DER
RECEIVED = "csos.orders.received"
SCHEMA = "csos.orders.ReceivedOrder"


def order(number: str) -> Order:
    return Order(number, Party(DEA, "Acme Pharmacy", "1 Main St, Springfield IL"), SUPPLIER,
                 NOW - timedelta(hours=1), LINES)


def received(order_id: str, document: bytes | None, signature: bytes, received_at: datetime = NOW) -> dict:
    """A ReceivedOrder as the sink sees it: through the real Avro codec."""
    codec = default_codec()
    rec = {"order_id": order_id, "received_at": received_at, "source": "test", "format": "csos-order/1",
           "document": document, "signature": signature}
    return codec.decode(codec.encode(SCHEMA, rec), expect=SCHEMA)[1]


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    p = TestPKI.create(now=NOW, reuse_keys=True)
    p.build_crl(NOW - timedelta(hours=2), NOW + timedelta(days=7))
    return p


@pytest.fixture(scope="module")
def cred(pki: TestPKI) -> Credential:
    return pki.issue_registrant(DEA, "Acme Pharmacy", ["2", "2N", "3", "3N", "4", "5"], NOW - YEAR, NOW + YEAR)


@pytest.fixture(scope="module")
def material(pki: TestPKI, tmp_path_factory) -> dict[str, Any]:
    """What an auditor is given besides the export: trust dir, the CRL current at receipt, product master."""
    d = pki.write_pki(tmp_path_factory.mktemp("pki"))
    products = d / "products.csv"
    ProductMaster([OXY, ALPRAZOLAM]).save(products)
    return {"trust": d / "trust", "crl": d / "crl" / "csos-sub-ca.crl", "root_crl": d / "crl" / "root.crl",
            "products": products, "pki": pki}


@pytest.fixture(scope="module")
def orders(cred: Credential) -> dict[str, tuple[bytes | None, bytes, bytes]]:
    """order id -> (document as received, signature, the signed content)."""
    doc1 = encode_order(order("26X000123"))
    sig1 = sign_order(doc1, cred.cert, cred.key, signing_time=NOW - timedelta(hours=1), detached=True,
                      intermediates=cred.chain)
    doc2 = encode_order(order("26X000124"))
    sig2 = sign_order(doc2, cred.cert, cred.key, signing_time=NOW - timedelta(hours=1), intermediates=cred.chain)
    doc3 = encode_order(order("26X000125"))
    return {
        "o-detached": (doc1, sig1, doc1),
        "o-detached-replay": (doc1, sig1, doc1),  # the same order sent again: its own order id
        "o-attached": (None, sig2, doc2),
        "o-malformed": (doc3, b"\x30\x82\x01\x00not a CMS at all \xff\xfe\x00", doc3),
        "o-garbage": (None, bytes(range(256)), b""),
    }


def crl_published(crl: x509.CertificateRevocationList, published_at: datetime) -> dict:
    """A CrlPublished as the sink sees it: through the real Avro codec."""
    codec = default_codec()
    rec = {"issuer": crl.issuer.rfc4514_string(), "crl_der": crl.public_bytes(DER),
           "this_update": crl.last_update_utc, "next_update": crl.next_update_utc, "published_at": published_at,
           "source": "test"}
    return codec.decode(codec.encode("pki.CrlPublished", rec), expect="pki.CrlPublished")[1]


def crl_loaded(n: int, crl: x509.CertificateRevocationList, at: datetime) -> dict:
    """A worker's ``crl.loaded`` audit event for ``crl`` (streams.pipeline.agents.verify)."""
    detail = {"issuer": crl.issuer.rfc4514_string(), "crl_sha256": hashlib.sha256(crl.public_bytes(DER)).hexdigest()}
    return {"event_id": f"crl-loaded-{n}", "occurred_at": at, "stage": "verify", "action": "crl.loaded",
            "order_id": None, "purchaser_dea": None, "outcome": "LOADED", "detail": json.dumps(detail),
            "actor": "verify-agent"}


@pytest.fixture(scope="module")
def forged_crl(pki: TestPKI) -> x509.CertificateRevocationList:
    """Published after the genuine sub-CA CRL and before receipt, under the sub-CA's name; the workers refused it."""
    return pki.crl_signed_by_wrong_key(NOW - timedelta(hours=1), NOW + timedelta(days=7))


@pytest.fixture(scope="module")
def later_crl(pki: TestPKI, cred: Credential) -> x509.CertificateRevocationList:
    """The sub-CA's CRL of the next day, listing the signer as revoked since an hour after receipt."""
    return pki.build_crl(NOW + timedelta(days=1), NOW + timedelta(days=8),
                         revoked={cred.cert.serial_number: NOW + timedelta(hours=1)})


@pytest.fixture(scope="module")
def client(tmp_path_factory, orders, cred, pki, later_crl, forged_crl):
    """One embedded ClickHouse per module (chdb is process-global), filled through the sink."""
    c = open_client(Settings().with_(data_dir=tmp_path_factory.mktemp("ch")))
    apply_ddl(c)
    apply_ddl(c)  # idempotent
    batch = []
    for offset, (oid, (doc, sig, _)) in enumerate(orders.items()):
        at = NOW + timedelta(minutes=offset)
        batch.append(SourceRecord(RECEIVED, 0, offset, SCHEMA, received(oid, doc, sig, at)))
    batch.append(SourceRecord("csos.orders.rejected", 0, 0, "csos.orders.Rejection", {
        "order_id": "o-malformed", "received_at": NOW, "rejected_at": NOW, "reason_code": "MALFORMED_SIGNATURE",
        "reason": "unreadable", "order_number": None, "purchaser_dea": None, "signer_subject": None,
        "checks": [{"check": "signature_format", "passed": False, "detail": "not CMS"}]}))
    batch.append(SourceRecord("som.verdicts", 0, 0, "som.Verdict", {
        "order_id": "o-detached", "order_number": "26X000123", "purchaser_dea": DEA, "verdict": "RELEASE",
        "decided_at": NOW, "received_at": NOW, "signed_at": NOW, "model_version": "t", "reasons": [],
        "lines": [], "total_dosage_units": 700}))
    # The CRLs published to the pipeline: the sub-CA's and the root's before receipt, a forged one the workers
    # refused (so never loaded), the sub-CA's next one after; and the workers' loads, as audited.
    published = [(pki.crl, NOW - timedelta(hours=2)), (pki.root_crl, NOW - timedelta(hours=2)),
                 (forged_crl, NOW - timedelta(hours=1)), (later_crl, NOW + timedelta(days=1))]
    for offset, (crl, at) in enumerate(published):
        batch.append(SourceRecord(t.CRL, 0, offset, "pki.CrlPublished", crl_published(crl, at)))
    for offset, (crl, at) in enumerate(p for p in published if p[0] is not forged_crl):
        batch.append(SourceRecord(t.AUDIT, 0, offset, "audit.AuditEvent", crl_loaded(offset, crl, at)))
    sink = ClickHouseSink(c)
    written = sink.write(batch)
    assert written["order_archive"] == len(orders) and written["crl_archive"] == 4
    sink.write(batch)  # a retried batch: same deduplication token, not doubled
    yield c
    c.close()


def archive_count(client) -> int:
    return int(client.query("SELECT count() FROM order_archive FINAL").result_rows[0][0])


# ---------------------------------------------------------------------------- storage
def test_bytes_come_back_byte_identical(client, orders, cred):
    assert archive_count(client) == len(orders)
    rows = find_archived(client, "26X000123", DEA)
    assert [r.order_id for r in rows] == ["o-detached", "o-detached-replay"]  # replays: both kept, oldest first
    doc, sig, _ = orders["o-detached"]
    signer = cred.cert.public_bytes(DER)
    for r in rows:
        assert r.document == doc and r.signature == sig
        assert r.certificates == (signer,) + tuple(c.public_bytes(DER) for c in cred.chain)
        assert r.certificates[0] == signer
        assert r.signer_fingerprint == hashlib.sha256(signer).hexdigest()
        assert (r.order_number, r.purchaser_dea, r.source, r.format) == ("26X000123", DEA, "test", "csos-order/1")
        assert r.received_at.tzinfo is not None
    attached = find_archived(client, "26X000124")
    assert len(attached) == 1 and attached[0].document is None and attached[0].attached
    assert attached[0].signature == orders["o-attached"][1]
    assert attached[0].signed_content() == orders["o-attached"][2]
    assert attached[0].certificates[0] == signer
    assert find_archived(client, "26X000123", "BR1234563") == []


def test_arbitrary_bytes_and_a_malformed_signature_are_archived(client, orders):
    bad = archived_by_id(client, "o-malformed")
    assert bad is not None
    assert bad.signature == orders["o-malformed"][1]  # non-UTF-8 bytes intact
    assert bad.document == orders["o-malformed"][0]
    assert bad.certificates == () and bad.signer_fingerprint == ""
    assert (bad.order_number, bad.purchaser_dea) == ("26X000125", DEA)  # still found by number
    garbage = archived_by_id(client, "o-garbage")
    assert garbage is not None and garbage.signature == bytes(range(256)) and garbage.document is None
    assert garbage.certificates == () and garbage.order_number is None and garbage.purchaser_dea is None


def test_archive_row_never_raises():
    for doc, sig in [(None, b""), (b"", b""), (b"\xff" * 10, b"\x30\x00"), (b"{}", b"\x30\x80\x00\x00"),
                     (b'{"order_number": 5, "purchaser": "x"}', b"\x06\x01\x00")]:
        row = archive_row({"order_id": "x", "received_at": NOW, "source": "s", "format": "f",
                           "document": doc, "signature": sig})
        assert row[4] == doc and row[5] == sig and row[6] == [] and row[8] is None
    assert rows_for(SCHEMA, {"order_id": "x", "received_at": NOW, "source": "s", "format": "f",
                             "document": None, "signature": b""})["order_archive"][0][0] == "x"


def test_retention_is_at_least_two_years(client):
    ddl = client.command("SHOW CREATE TABLE order_archive")
    ddl = ddl if isinstance(ddl, str) else " ".join(map(str, ddl))
    assert "TTL" in ddl and "toIntervalYear(2)" in ddl, ddl
    engine = client.query("SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
                          "AND name = 'order_archive'").result_rows[0][0]
    assert "TTL" in engine and "ReplacingMergeTree" in engine
    # the TTL expression itself, evaluated: no row expires before two years after receipt
    expires = client.query("SELECT min(toDateTime(received_at) + INTERVAL 2 YEAR + INTERVAL 90 DAY "
                           "- toDateTime(received_at)) FROM order_archive").result_rows[0][0]
    assert int(expires) >= 2 * 366 * 86400


# ---------------------------------------------------------------------------- export and offline re-verification
def test_export_reverifies_offline(client, orders, material, tmp_path):
    files = export_order(client, "26X000123", DEA, tmp_path)
    manifests = sorted(p for p in files if p.name == "manifest.json")
    assert len(manifests) == 2  # the order and its replay
    for m in manifests:
        man = json.loads(m.read_text())
        d = m.parent
        doc = (d / man["document_file"]).read_bytes()
        sig = (d / man["signature_file"]).read_bytes()
        assert (doc, sig) == orders["o-detached"][:2]
        chain = x509.load_pem_x509_certificates((d / man["certificates_file"]).read_bytes())
        assert chain[0].public_bytes(DER) == archived_by_id(client, man["order_id"]).certificates[0]
        for name, digest in man["files_sha256"].items():
            assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest
        assert man["signature_attached"] is False and man["received_at"].startswith("2026-03-02T12:0")
        received_at = datetime.fromisoformat(man["received_at"])
        out = reverify(doc, sig, material["trust"], [material["crl"], material["root_crl"]], material["products"], received_at)
        assert out.ok, out.checks
        text = render(out, received_at=received_at)
        assert "RESULT: VALID" in text and all(c in text for c in CHECKS)
    outcomes = {json.loads(m.read_text())["order_id"]: json.loads(m.read_text())["outcome"] for m in manifests}
    assert outcomes["o-detached"]["status"] == "RELEASE"
    assert outcomes["o-detached-replay"]["status"] == "NOT_RECORDED"


def test_export_carries_the_crls_the_pipeline_held_and_they_reproduce_its_decision(client, orders, material,
                                                                                   later_crl, tmp_path):
    """The export's CRLs are those published before the order was verified: with them the order re-verifies
    VALID as it did then; with the next day's CRL, which lists the signer, it would be rejected."""
    files = export_order(client, "26X000123", DEA, tmp_path)
    m = next(p for p in files if p.name == "manifest.json" and json.loads(p.read_text())["order_id"] == "o-detached")
    man, d = json.loads(m.read_text()), m.parent
    assert sorted(c["issuer"].split("CN=")[1].split(",")[0] for c in man["crls"]) == sorted(
        c.issuer.rfc4514_string().split("CN=")[1].split(",")[0] for c in (material["pki"].crl, material["pki"].root_crl))
    crl_paths = [d / c["file"] for c in man["crls"]]
    assert all(f"--crl {c['file']}" in man["reverify"] for c in man["crls"])
    assert later_crl.public_bytes(DER) not in [p.read_bytes() for p in crl_paths]
    doc, sig = (d / man["document_file"]).read_bytes(), (d / man["signature_file"]).read_bytes()
    received_at = datetime.fromisoformat(man["received_at"])
    out = reverify(doc, sig, material["trust"], crl_paths, material["products"], received_at)
    assert out.ok, out.checks
    later = d / "later.crl"
    later.write_bytes(later_crl.public_bytes(DER))
    root = next(p for p in crl_paths if p.read_bytes() == material["pki"].root_crl.public_bytes(DER))
    assert reverify(doc, sig, material["trust"], [later, root], material["products"], received_at).reason_code \
        == "CERT_REVOKED"


def test_crls_held_at_are_the_ones_the_workers_had_loaded(client, pki, later_crl, forged_crl):
    before = [c.crl_der for c in crls_held_at(client, NOW)]
    assert sorted(before) == sorted(c.public_bytes(DER) for c in (pki.crl, pki.root_crl))  # not the forged one
    after = [c.crl_der for c in crls_held_at(client, NOW + timedelta(days=2))]
    assert sorted(after) == sorted(c.public_bytes(DER) for c in (later_crl, pki.root_crl))
    assert crls_held_at(client, NOW - timedelta(days=1)) == []  # nothing loaded or published yet


def test_attached_export_reverifies_offline(client, orders, material, tmp_path):
    files = export_order(client, "26X000124", None, tmp_path)
    doc = next(p for p in files if p.suffix == ".document").read_bytes()
    sig = next(p for p in files if p.suffix == ".p7s").read_bytes()
    assert doc == orders["o-attached"][2]
    man = json.loads(next(p for p in files if p.name == "manifest.json").read_text())
    assert man["signature_attached"] is True and "--document" not in man["reverify"]
    out = reverify(None, sig, material["trust"], [material["crl"], material["root_crl"]], material["products"], NOW)
    assert out.ok, out.checks


def test_a_tampered_export_fails_with_every_check_listed(client, material, tmp_path):
    files = export_order(client, "26X000123", DEA, tmp_path)
    doc_path = next(p for p in files if p.suffix == ".document")
    sig = doc_path.with_suffix(".p7s").read_bytes()
    tampered = doc_path.read_bytes().replace(b'"packages":2', b'"packages":9')
    assert tampered != doc_path.read_bytes()
    doc_path.write_bytes(tampered)
    out = reverify(doc_path.read_bytes(), sig, material["trust"], [material["crl"], material["root_crl"]], material["products"], NOW)
    assert not out.ok and out.reason_code == BAD_SIGNATURE
    text = render(out, received_at=NOW)
    assert f"RESULT: INVALID ({BAD_SIGNATURE})" in text and "altered" in text
    for name in CHECKS:
        assert name in text
    lines = text.splitlines()
    status = {name: next(ln for ln in lines if f". {name} " in ln) for name in CHECKS}
    assert "PASS" in status["signature_format"] and "FAIL" in status["signature"]
    assert all("NOT CHECKED" in status[n] for n in CHECKS[CHECKS.index("signature") + 1:])


def test_malformed_signature_exports_with_its_rejection(client, tmp_path, material, orders):
    files = export_order(client, "26X000125", DEA, tmp_path)
    man = json.loads(next(p for p in files if p.name == "manifest.json").read_text())
    assert man["outcome"]["status"] == "REJECTED" and man["outcome"]["reason_code"] == "MALFORMED_SIGNATURE"
    assert man["certificates"] == [] and man["signer_fingerprint_sha256"] is None
    sig = next(p for p in files if p.suffix == ".p7s").read_bytes()
    assert sig == orders["o-malformed"][1]
    out = reverify(orders["o-malformed"][0], sig, material["trust"], [material["crl"], material["root_crl"]], material["products"], NOW)
    assert out.reason_code == "MALFORMED_SIGNATURE"
    assert "RESULT: INVALID (MALFORMED_SIGNATURE)" in render(out)


def test_export_of_an_unknown_order_is_a_clear_error(client, tmp_path):
    with pytest.raises(ArchiveNotFound, match="26X999999"):
        export_order(client, "26X999999", None, tmp_path)


# ---------------------------------------------------------------------------- the sink service
def test_sink_consumes_received_but_does_not_dead_letter_it_twice(orders):
    assert sink_service.EXPECTED[t.RECEIVED] == SCHEMA
    svc = object.__new__(sink_service.SinkService)  # decode() only: no broker, no ClickHouse
    publisher = MemoryPublisher()
    svc.codec, svc.emitter, svc.dead_lettered = default_codec(), Emitter(publisher, "clickhouse-sink"), 0
    good = default_codec().encode(SCHEMA, received("o-x", *orders["o-detached"][:2]))
    records = svc.decode([MemoryMessage(t.RECEIVED, 0, 7, None, b"\x00garbage"),
                          MemoryMessage(t.RECEIVED, 0, 8, None, good), MemoryMessage(t.VERIFIED, 0, 7, None, b"\x00garbage")])
    assert [r.schema for r in records] == [SCHEMA]
    # the verify agent dead-letters the unreadable received message; the sink only dead-letters its own topics
    assert [d["source_topic"] for d in publisher.records(t.DLQ)] == [t.VERIFIED] and svc.dead_lettered == 1

"""Hostile input against the agents (issue 9): every order gets an outcome, and no failure undoes another's.

The processors run directly with a capturing publisher (real Avro, no
broker), real certificates from the test PKI and real CMS signatures, as in
tests/unit/test_cases.py; the broker end of the same rules is in
tests/test_verify_e2e.py.
"""
from __future__ import annotations

import io
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import fastavro
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from streams.tools.pki import Credential, TestPKI, pooled_key
from connectors.kafka.catalogue import TOPICS
from connectors.kafka.testing import MemoryPublisher
from connectors.kafka.topics import topic_config
from connectors.kafka import catalogue as t
from streams.pipeline.agents.monitor import MonitorProcessor
from streams.pipeline.agents.verify import VerifyProcessor
from streams.pipeline.app import handle_event, require_supplier_dea
from streams.pipeline.processor import InputMessage, ProcessorBase
from connectors.sources.reference_data import RegistrantDirectory
from streams.core.avro_codec import MAGIC, AvroCodec, default_codec
from streams.domain.cms import MAX_EMBEDDED_CERTS, sign_order
from streams.core.config import Settings
from connectors.kafka.emit import Emitter
from streams.domain.identifiers import make_dea_number
from streams.domain.model import Order, OrderLine, Party
from streams.monitoring import Monitor
from streams.domain.order_document import encode_order, parse_order
from streams.verification import Verifier
from streams.domain.x12_850 import encode_x12_850, parse_x12_850
from tests.unit.test_monitoring import order as verified_order
from tests.unit.test_verification import ALL_SCHEDULES, OXY, OXY_LINE, PRODUCTS

codec = default_codec()
NOW = datetime.now(timezone.utc).replace(microsecond=0)
DEA = "AP5836727"
SUPPLIER = Party(make_dea_number("PC", "482913"), "CSOS Test Distribution", "1200 Commerce Way, Norwood, MA 02062")
OTHER_SUPPLIER = Party(make_dea_number("PB", "111111"), "Another Distributor", "1 Elm St, Dover, DE 19901")
PURCHASER = Party(DEA, "Acme Pharmacy", "1 Main St, Springfield, IL 62701")


# ---------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI.create(now=NOW, reuse_keys=True)


@pytest.fixture(scope="module")
def cred(pki: TestPKI) -> Credential:
    return pki.issue_registrant(DEA, "Acme Pharmacy", ALL_SCHEDULES, NOW - timedelta(days=300),
                                NOW + timedelta(days=365))


@pytest.fixture
def verifier(pki: TestPKI) -> Verifier:
    return Verifier(pki.trust_anchors, pki.intermediates,
                    [pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=7)), pki.root_crl], PRODUCTS)


class Exploding:
    """A verifier that raises on one signature, as the real one did on a corrupted signer subject."""

    def __init__(self, inner: Verifier, poison: bytes) -> None:
        self.inner, self.poison = inner, poison

    def verify(self, document: bytes | None, signature: bytes, received_at: datetime, fmt: str) -> Any:
        if signature == self.poison:
            raise ValueError("corrupted signer subject")
        return self.inner.verify(document, signature, received_at, fmt)


def make_order(number: int, *, signed_at: datetime = NOW - timedelta(hours=1), supplier: Party = SUPPLIER,
               lines: tuple[OrderLine, ...] = (OXY_LINE,)) -> Order:
    return Order(f"{signed_at:%y}X{number:06d}", PURCHASER, supplier, signed_at, lines)


def signature(order: Order, cred: Credential, **kw: Any) -> bytes:
    return sign_order(encode_order(order), cred.cert, cred.key, signing_time=order.signed_at,
                      intermediates=cred.chain, **kw)


def message(sig: bytes, *, order_id: str | None = None, received_at: datetime = NOW - timedelta(minutes=59)) -> bytes:
    return codec.encode("csos.orders.ReceivedOrder", {
        "order_id": order_id or str(uuid.uuid4()), "received_at": received_at, "source": "test",
        "format": "csos-order/1", "document": None, "signature": sig})


def verify_agent(verifier: Any, table: dict[bytes, bytes] | None = None,
                 directory: RegistrantDirectory | None = None) -> tuple[VerifyProcessor, MemoryPublisher]:
    pub = MemoryPublisher()
    proc = VerifyProcessor(verifier, PRODUCTS, Emitter(pub, "verify-agent"),  # type: ignore[arg-type]
                           {} if table is None else table, directory, suppliers={SUPPLIER.dea_number})
    return proc, pub


def feed(proc: VerifyProcessor, *messages: bytes, appended_at: datetime | None = None) -> None:
    """One batch: every message keyed by the purchaser, as intake sends them."""
    proc.begin_batch()
    for offset, raw in enumerate(messages):
        proc.handle(InputMessage(t.RECEIVED, 0, offset, DEA.encode(), raw, appended_at=appended_at))
    proc.end_batch()


def outcomes(pub: MemoryPublisher) -> list[tuple[str, str]]:
    """(topic, order_id or reason) per decision, in order."""
    out = []
    for topic, value in ((m.topic(), m.value()) for m in pub.messages):
        if topic in (t.VERIFIED, t.REJECTED):
            rec = codec.decode(value)[1]
            out.append((topic, rec.get("reason_code") or "VERIFIED"))
        elif topic == t.DLQ:
            out.append((topic, codec.decode(value)[1]["reason"]))
    return out


# ---------------------------------------------------------------------------- replay
def test_replay_is_refused_even_after_a_failure_earlier_in_the_batch(verifier: Verifier, cred: Credential) -> None:
    a = signature(make_order(1), cred)
    poison = signature(make_order(2), cred)
    proc, pub = verify_agent(Exploding(verifier, poison))
    feed(proc, message(a), message(poison), message(a))  # A, a message the verifier chokes on, A replayed
    assert outcomes(pub) == [(t.VERIFIED, "VERIFIED"), (t.REJECTED, "VERIFICATION_ERROR"),
                             (t.REJECTED, "DUPLICATE_ORDER_NUMBER")]


def test_an_order_whose_outputs_fail_is_rejected_and_its_number_stays_used(verifier: Verifier,
                                                                          cred: Credential) -> None:
    # The failure comes from the registrant master, read while the outputs are written (the processor is
    # compiled: its own methods cannot be patched, the objects it is given can).
    class FailingOnce(RegistrantDirectory):
        calls = 0

        def get(self, dea: str) -> dict[str, Any] | None:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("registrant master unavailable")
            return super().get(dea)

    directory = FailingOnce()
    directory.apply(DEA, {"status": "ACTIVE", "name": "Acme Pharmacy", "expires_on": None,
                          "business_activity": "RETAIL PHARMACY", "state": "MA"})
    proc, pub = verify_agent(verifier, directory=directory)
    sig = signature(make_order(3), cred)
    feed(proc, message(sig), message(sig))  # the second copy has a new order id: a replay
    assert outcomes(pub) == [(t.REJECTED, "VERIFICATION_ERROR"), (t.REJECTED, "DUPLICATE_ORDER_NUMBER")]


def test_accepted_numbers_in_a_state_written_before_order_ids_still_refuse_replays(verifier: Verifier,
                                                                                   cred: Credential) -> None:
    v1 = next(s for s in codec.catalog.by_fingerprint.values()
              if s.source.name == "csos.state.PurchaserVerifyState.v1.avsc")
    buf = io.BytesIO()
    buf.write(MAGIC + v1.fingerprint)
    number = make_order(4).order_number
    fastavro.schemaless_writer(buf, v1.parsed, {"purchaser_dea": DEA, "pending": {},
                                                "accepted": {number: int((NOW + timedelta(days=9)).timestamp() * 1000)}})
    proc, pub = verify_agent(verifier, {DEA.encode(): buf.getvalue()})
    feed(proc, message(signature(make_order(4), cred)))
    assert outcomes(pub) == [(t.REJECTED, "DUPLICATE_ORDER_NUMBER")]


# ---------------------------------------------------------------------------- order ids
def test_a_redelivered_order_repeats_its_acceptance(verifier: Verifier, cred: Credential) -> None:
    proc, pub = verify_agent(verifier)
    raw = message(signature(make_order(5), cred), order_id="order-5")
    feed(proc, raw)
    feed(proc, raw)  # the same message again (at-least-once delivery)
    assert outcomes(pub) == [(t.VERIFIED, "VERIFIED"), (t.VERIFIED, "VERIFIED")]
    assert proc.counts["redelivered"] == 1


def test_an_order_id_reused_for_other_bytes_is_dead_lettered_not_judged(verifier: Verifier, cred: Credential) -> None:
    proc, pub = verify_agent(verifier)
    feed(proc, message(signature(make_order(6), cred), order_id="order-6"))
    feed(proc, message(signature(make_order(7), cred), order_id="order-6"))
    (first, _), (dlq, reason) = outcomes(pub)
    assert first == t.VERIFIED and dlq == t.DLQ and reason.startswith("DUPLICATE_ORDER_ID: order id order-6")
    assert not pub.on(t.REJECTED)  # nothing keyed order-6 overwrites the first order
    audits = [r for r in pub.records(t.AUDIT)]
    assert any(a["outcome"] == "DUPLICATE_ORDER_ID" and a["order_id"] == "order-6" for a in audits)


# ---------------------------------------------------------------------------- receipt time and supplier
def test_a_backdated_receipt_is_overruled_by_the_broker_append_time(verifier: Verifier, cred: Credential) -> None:
    signed = NOW - timedelta(days=61)
    sig = signature(make_order(8, signed_at=signed), cred)
    forged = message(sig, received_at=signed + timedelta(days=1))

    trusting, pub = verify_agent(verifier)
    feed(trusting, forged)  # without the broker's time the forged receipt would pass
    assert outcomes(pub) == [(t.VERIFIED, "VERIFIED")]

    proc, pub = verify_agent(verifier)
    feed(proc, forged, appended_at=NOW)
    assert outcomes(pub) == [(t.REJECTED, "ORDER_EXPIRED")]
    rejection = pub.records(t.REJECTED)[0]
    assert rejection["received_at"] == NOW
    assert rejection["checks"][0]["check"] == "receipt_time" and "append time" in rejection["checks"][0]["detail"]
    audits = [r for r in pub.records(t.AUDIT)]
    assert [a["action"] for a in audits] == ["order.receipt_time_overruled", "order.rejected"]


def test_a_receipt_within_the_skew_is_the_sender_s(verifier: Verifier, cred: Credential) -> None:
    proc, pub = verify_agent(verifier)
    stated = NOW - timedelta(minutes=59)
    feed(proc, message(signature(make_order(9), cred), received_at=stated), appended_at=stated + timedelta(seconds=90))
    [value] = [m.value() for m in pub.on(t.VERIFIED)]
    assert codec.decode(value)[1]["received_at"] == stated


def test_an_order_for_another_supplier_is_rejected(verifier: Verifier, cred: Credential) -> None:
    proc, pub = verify_agent(verifier)
    feed(proc, message(signature(make_order(10, supplier=OTHER_SUPPLIER), cred)))
    assert outcomes(pub) == [(t.REJECTED, "WRONG_SUPPLIER")]


def test_a_worker_without_supplier_dea_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="CSOS_SUPPLIER_DEA is not set"):
        require_supplier_dea(Settings())
    with pytest.raises(ValueError, match="not a valid DEA number"):
        require_supplier_dea(Settings(supplier_dea="PC0000001"))
    assert require_supplier_dea(Settings(supplier_dea=f" {SUPPLIER.dea_number.lower()} ")) == {SUPPLIER.dea_number}


def test_received_topic_records_carry_the_broker_append_time() -> None:
    spec = next(s for s in TOPICS if s.name == t.RECEIVED)
    assert topic_config(spec, 1)["message.timestamp.type"] == "LogAppendTime"


# ---------------------------------------------------------------------------- bounded cost
def _look_alikes(pki: TestPKI, n: int) -> list[x509.Certificate]:
    """CA certificates named like the real sub-CA, each with its own key: candidates a path builder must try."""
    key = pooled_key("ec", slot="look-alike")
    out = []
    for i in range(n):
        out.append(x509.CertificateBuilder()
                   .subject_name(pki.sub_ca.cert.subject).issuer_name(pki.root.cert.subject)
                   .public_key(pooled_key("ec", slot=("look-alike", i % 4)).public_key())
                   .serial_number(i + 1).not_valid_before(NOW - timedelta(days=1))
                   .not_valid_after(NOW + timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(key, hashes.SHA256()))
    return out


@pytest.mark.parametrize("n, limit", [(700, "MAX_SIGNATURE_BYTES"), (MAX_EMBEDDED_CERTS, "MAX_EMBEDDED_CERTS")])
def test_a_signature_stuffed_with_certificates_is_refused_before_path_building(
        verifier: Verifier, pki: TestPKI, cred: Credential, monkeypatch: pytest.MonkeyPatch, n: int, limit: str) -> None:
    order = make_order(11)
    sig = sign_order(encode_order(order), cred.cert, cred.key, signing_time=order.signed_at,
                     intermediates=list(cred.chain) + _look_alikes(pki, n))

    def no_path_building(*_: Any) -> None:
        raise AssertionError("path building was attempted")

    monkeypatch.setattr(verifier, "_pkix", no_path_building)
    outcome = verifier.verify(None, sig, NOW)
    assert outcome.reason_code == "MALFORMED_SIGNATURE" and limit in (outcome.reason or "")


# ---------------------------------------------------------------------------- order documents
def test_duplicate_line_numbers_are_a_defective_order_in_both_formats() -> None:
    twice = make_order(12, lines=(OXY_LINE, OrderLine(1, OXY.ndc, OXY.product_name, OXY.strength, 100, 3)))
    for parse, doc in ((parse_order, encode_order(twice)), (parse_x12_850, encode_x12_850(twice))):
        with pytest.raises(ValueError, match="line number 1 appears more than once") as err:
            parse(doc)
        assert err.value.element == "lines[2].line_no"  # type: ignore[attr-defined]


@pytest.mark.parametrize("field, value", [("line_no", 70_000), ("packages", 2 ** 40), ("package_quantity", 10 ** 7)])
def test_quantities_that_would_overflow_downstream_are_a_defective_order(field: str, value: int) -> None:
    line = dict(line_no=1, ndc=OXY.ndc, product_name=OXY.product_name, strength=OXY.strength, package_quantity=100,
                packages=2)
    line[field] = value
    order = make_order(13, lines=(OrderLine(**line),))
    for parse, doc in ((parse_order, encode_order(order)), (parse_x12_850, encode_x12_850(order))):
        if parse is parse_x12_850 and value >= 10 ** 9:
            continue  # more than nine digits is refused as not a whole number already
        with pytest.raises(ValueError, match="out of range") as err:
            parse(doc)
        assert err.value.element == f"lines[1].{field}"  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- the monitor
def monitor_agent(codec: AvroCodec | None = None) -> tuple[MonitorProcessor, MemoryPublisher, dict[bytes, bytes]]:
    pub, table = MemoryPublisher(), {}
    return (MonitorProcessor(Monitor(), table, Emitter(pub, "monitor-agent"), codec),  # type: ignore[arg-type]
            pub, table)


def test_monitor_decides_every_order_of_a_batch_with_a_huge_quantity_in_it() -> None:
    proc, pub, _ = monitor_agent()
    at = NOW - timedelta(hours=1)
    huge = verified_order("BP1234563", at, {"OXYCODONE": 400})
    huge["lines"][0].update(packages=2 ** 40, dosage_units=2 ** 40 * 100)  # fastavro writes it; an Avro int can't hold it
    normal = [verified_order("BP1234563", at + timedelta(minutes=i), {"OXYCODONE": 400}) for i in (1, 2)]
    proc.begin_batch()
    for i, o in enumerate([normal[0], huge, normal[1]]):
        proc.handle(InputMessage(t.VERIFIED, 0, i, b"BP1234563", codec.encode("csos.orders.VerifiedOrder", o)))
    proc.end_batch()
    verdicts = [r["order_id"] for r in pub.records(t.VERDICTS)]
    assert verdicts == [normal[0]["order_id"], normal[1]["order_id"]]
    [dead] = [r for r in pub.records(t.DLQ)]
    # Refused where it enters (the codec range-checks every int), so no stage ever has to carry it.
    assert "csos.orders.OrderLine.packages = 1099511627776" in dead["reason"]
    released = [r["order_id"] for r in pub.records(t.RELEASE)]
    assert huge["order_id"] not in released


def test_monitor_dead_letters_an_order_whose_hold_cannot_be_written() -> None:
    """Fail closed to the end: no hold can be encoded, so the order is dead-lettered, never released."""
    at = NOW - timedelta(hours=1)
    orders = [verified_order("BP1234563", at + timedelta(minutes=i), {"OXYCODONE": 400}) for i in (0, 1)]
    doomed = orders[1]["order_id"]

    # The failure comes from the codec the outputs are encoded with (the processor is compiled: its own
    # methods cannot be patched, the objects it is given can). Every verdict of the doomed order fails,
    # the error verdict's hold included.
    class FailingCodec(AvroCodec):
        def encode(self, fullname: str, record: dict[str, Any], **kw: Any) -> bytes:
            if fullname == "som.Verdict" and record.get("order_id") == doomed:
                raise ValueError("cannot encode")
            return super().encode(fullname, record, **kw)

    proc, pub, _ = monitor_agent(FailingCodec(codec.catalog))
    proc.begin_batch()
    for i, o in enumerate(orders):
        proc.handle(InputMessage(t.VERIFIED, 0, i, b"BP1234563", codec.encode("csos.orders.VerifiedOrder", o)))
    proc.end_batch()
    [dead] = [r for r in pub.records(t.DLQ)]
    assert dead["reason"].startswith("monitor_error: ") and "not released" in dead["reason"]
    released = [r["order_id"] for r in pub.records(t.RELEASE)]
    assert released == [orders[0]["order_id"]]


def test_monitor_holds_an_order_it_cannot_learn_and_keeps_what_the_batch_learned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    at = NOW - timedelta(days=1)
    first, bad = (verified_order("BP1234563", at + timedelta(hours=h), {"OXYCODONE": 400}) for h in (0, 1))
    reference, _, ref_table = monitor_agent()
    reference.handle(InputMessage(t.VERIFIED, 0, 0, b"BP1234563",
                                  codec.encode("csos.orders.VerifiedOrder", first)))
    reference.end_batch()

    proc, pub, table = monitor_agent()
    real = proc.monitor.learn_into

    def learn_into(base: Any, order: dict[str, Any]) -> None:
        real(base, order)  # half-updated, then it fails
        if order["order_id"] == bad["order_id"]:
            raise ArithmeticError("overflow while learning")

    monkeypatch.setattr(proc.monitor, "learn_into", learn_into)
    proc.begin_batch()
    for i, o in enumerate((first, bad)):
        proc.handle(InputMessage(t.VERIFIED, 0, i, b"BP1234563", codec.encode("csos.orders.VerifiedOrder", o)))
    proc.end_batch()
    verdicts = {r["order_id"]: r for r in pub.records(t.VERDICTS)}
    assert verdicts[first["order_id"]]["verdict"] == "RELEASE"
    assert verdicts[bad["order_id"]]["verdict"] == "HOLD"
    assert [r["detector"] for r in verdicts[bad["order_id"]]["reasons"]] == ["monitor_error"]
    # the first order's learning survived; the failed one left no trace but its (held) decision
    state, ref = (codec.decode(tb[b"BP1234563"], expect="som.state.RegistrantState")[1] for tb in (table, ref_table))
    decided = {oid: (o["decision"], o["learned"]) for oid, o in state.pop("outcomes").items()}
    ref.pop("outcomes")
    assert state == ref
    assert decided == {first["order_id"]: ("RELEASE", True), bad["order_id"]: ("HOLD", False)}


# ---------------------------------------------------------------------------- the agent loop
def test_an_exception_escaping_a_processor_dead_letters_that_event_only() -> None:
    pub = MemoryPublisher()

    class Fragile(ProcessorBase):
        stage = "verify"
        emitter = Emitter(pub, "verify-agent")  # type: ignore[arg-type]
        counts: dict[str, int] = {}
        seen: list[int] = []

        def handle(self, message: InputMessage) -> None:
            self.seen.append(message.offset)
            if message.offset == 1:
                raise KeyError("surprise")

    proc = Fragile()
    for offset in range(3):
        event = SimpleNamespace(message=SimpleNamespace(topic=t.RECEIVED, partition=0, offset=offset, key=b"k",
                                                        value=b"v", timestamp=NOW.timestamp(), timestamp_type=1))
        handle_event(proc, event)  # type: ignore[arg-type]
    assert proc.seen == [0, 1, 2]
    [dead] = [r for r in pub.records(t.DLQ)]
    assert (dead["source_offset"], dead["reason"]) == (1, "unhandled: KeyError: 'surprise'")
    assert proc.counts["unhandled"] == 1

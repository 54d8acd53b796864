"""Hostile input for the running pipeline: a generator, a publisher that remembers offsets, a judge.

Non-production tooling, like the simulator. An attacker who can write to an
input topic (a compromised trading partner, a broken warehouse system, a
stolen CSOS certificate) must not be able to crash a worker, stall the
ClickHouse sink, lose a message without a trace or get an order shipped.
This module makes that checkable: :func:`generate` builds hostile messages
of every class the issue-9 attacker found (deterministically from a seed),
:func:`publish_hostile` puts them on their topics and records each one's
partition and offset, and :func:`collect_report` finds every message's
trace in ClickHouse and judges it against what was expected.

A *trace* is what the pipeline leaves for one message: a rejection, a
verdict (RELEASE or HOLD), a parked (pending) order that has no final
outcome yet, or a dead letter. Rejections, verdicts and parked orders are
attributed to a message by order id and order number (a reused order id
with a different order number is told apart by the number); dead letters by
the source topic, partition and offset they name. Every hostile message must
have exactly one trace and none may be released.

Expectations (``HostileMessage.expected``):

``rejected:<CODE>``  one rejection with that reason code (``rejected:any``: any code)
``dead_letter``      one dead letter naming the message's offset
``not_released``     one trace that is not a release: a rejection, a HOLD, a parked order or a dead letter
``decided``          one trace of any kind: the legitimate order an attack rides on (the original
                     of a replay, the first user of a reused order id) and the normal orders mixed in;
                     these may be released

Determinism: the classes, the order of messages, order ids, order numbers,
documents and garbage bytes follow from the seed. Signature bytes also depend
on the PKI's keys, which are random per PKI.
"""
from __future__ import annotations

import random
import string
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from confluent_kafka import Producer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from connectors.kafka import catalogue as t
from streams.core.avro_codec import AvroCodec, DecodeError, default_codec
from streams.domain.cms import sign_order
from streams.domain.identifiers import make_dea_number
from streams.domain.model import Order, OrderLine, Party
from streams.domain.order_document import encode_order
from streams.domain.products import Product, ProductMaster

from connectors.kafka.io import consume_all, producer_defaults
from connectors.kafka.security import client_config
from streams.tools.pki import Credential, TestPKI, pooled_key
from streams.tools.simulator import Registrant, SigningKit

# ----------------------------------------------------------------------------- expectations
DEAD_LETTER = "dead_letter"
NOT_RELEASED = "not_released"
DECIDED = "decided"
REJECTED_ANY = "rejected:any"

#: Reason codes this module expects that the verifier names after issue 9's fixes.
WRONG_SUPPLIER = "WRONG_SUPPLIER"
ORDER_EXPIRED = "ORDER_EXPIRED"
DUPLICATE_ORDER_NUMBER = "DUPLICATE_ORDER_NUMBER"
MALFORMED_ORDER = "MALFORMED_ORDER"
MALFORMED_SIGNATURE = "MALFORMED_SIGNATURE"

#: A hostile "another supplier": a distributor DEA number with a valid check digit that is not ours.
OTHER_SUPPLIER = Party(make_dea_number("RD", "731904"), "SOME OTHER DISTRIBUTOR (HOSTILE TEST)",
                       "1 ELSEWHERE RD, NOWHERE, NV 89001")

#: Bytes of the ~1 MB unreadable message: just under librdkafka's default message.max.bytes
#: (1,000,000), so it reaches the topic while the dead letter that wraps it (payload + reason +
#: ids) does not fit into one message any more.
UNREADABLE_BYTES = 999_900
#: Bytes of the oversize document's defective element, echoed by a naive MALFORMED_ORDER reason.
OVERSIZE_ELEMENT_BYTES = 900_000
#: Look-alike intermediate certificates carried by one CMS (all named like the CSOS sub-CA).
LOOKALIKE_CERTS = 700
#: Months with an order in the "many months in one batch" unit (ClickHouse refuses an insert
#: touching more than 100 partitions by default, and tables are partitioned by month).
MONTHS = 120
HUGE_PACKAGES = 2 ** 40  # beyond Avro int and ClickHouse UInt32
HUGE_LINE_NO = 70_000  # beyond ClickHouse UInt16


@dataclass(frozen=True)
class HostileMessage:
    """One message to put on ``topic``, and what the pipeline must do with it."""

    topic: str
    key: bytes | None
    value: bytes
    kind: str
    expected: str
    order_id: str | None = None  # the envelope's order id, when the envelope is readable
    order_number: str | None = None  # the signed order number, when there is one


@dataclass(frozen=True)
class HostileContext:
    """What signing valid-looking orders needs: the test PKI, registered purchasers, our supplier DEA."""

    pki: TestPKI
    registrants: tuple[Registrant, ...]
    supplier: Party
    products: ProductMaster
    now: datetime

    @classmethod
    def from_feed(cls, feed: Any, now: datetime | None = None) -> "HostileContext":
        """The context of a prepared simulator feed (``streams.tools.feed.PreparedFeed``): its PKI and population.

        Its registrants are the ones ``publish_reference_data`` registers, so a valid hostile order is judged
        on its content, not parked for an unknown purchaser.
        """
        population = feed.result.population
        return cls(feed.pki, tuple(population.registrants), population.supplier, population.products,
                   (now or datetime.now(timezone.utc)).replace(microsecond=0))


# ----------------------------------------------------------------------------- the classes
@dataclass(frozen=True)
class KindSpec:
    """A class of hostile input: how to build one unit of it and its share of the messages."""

    build: Callable[["_Builder", int], list[HostileMessage]]
    weight: float = 1.0  # relative share of the messages (heavy classes get little)
    unit_size: int = 1  # messages per unit (a replay is an original and its copy)


#: Input topics other than the received one, and the record types their consumers accept.
OTHER_INPUTS: dict[str, frozenset[str]] = {
    t.CRL: frozenset({"pki.CrlPublished"}),
    t.REGISTRANTS: frozenset({"csos.registry.Registrant"}),
    t.DECISIONS: frozenset({"som.Decision", "som.Hold"}),
    t.HOLD: frozenset({"som.Decision", "som.Hold"}),
    t.CLEARED: frozenset({"som.ClearedOrder"}),
    t.SHIPMENTS: frozenset({"warehouse.ShipmentConfirmation"}),
}
_SHORT = {t.CRL: "crl", t.REGISTRANTS: "registrants", t.DECISIONS: "decisions", t.HOLD: "hold",
          t.CLEARED: "cleared", t.SHIPMENTS: "shipments"}


class _Builder:
    """Builds units of each class from one seeded RNG."""

    def __init__(self, ctx: HostileContext, seed: int, codec: AvroCodec | None = None) -> None:
        self.ctx = ctx
        self.rng = random.Random(f"hostile:{seed}")
        self.codec = codec or default_codec()
        self.kit = SigningKit(ctx.pki, key_pool=16)
        self.numbers: set[str] = set()
        self._lookalikes: tuple[x509.Certificate, ...] | None = None
        self._lookalike_issuer: Credential | None = None
        # Registrants that may order at least one product of their habits (all of them, in the simulator).
        self.purchasers = [r for r in ctx.registrants if self._products_of(r)]
        if not self.purchasers:
            raise ValueError("no registrant in the context can order any product")

    # -- ids, orders, signatures
    def order_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def order_number(self, signed_at: datetime) -> str:
        """``YYX`` + ``H`` + 5 characters: the ``H`` keeps them apart from the simulator's all-digit numbers."""
        while True:
            tail = "".join(self.rng.choice(string.digits + string.ascii_uppercase) for _ in range(5))
            number = f"{signed_at.year % 100:02d}XH{tail}"
            if number not in self.numbers:
                self.numbers.add(number)
                return number

    def _products_of(self, reg: Registrant) -> list[Product]:
        out = []
        for habit in reg.habits:
            for ndc, _share in habit.items:
                p = self.ctx.products.get(ndc)
                if p is not None and reg.may_order(p.schedule):
                    out.append(p)
        return out

    def purchaser(self) -> Registrant:
        return self.rng.choice(self.purchasers)

    def lines(self, reg: Registrant, n: int = 2) -> list[OrderLine]:
        """A modest order of products the registrant stocks (small enough not to look suspicious)."""
        products = self._products_of(reg)
        chosen = self.rng.sample(products, min(n, len(products)))
        return [OrderLine(i, p.ndc, p.product_name, p.strength, p.units_per_package, self.rng.randint(1, 2))
                for i, p in enumerate(chosen, start=1)]

    def order(self, reg: Registrant, signed_at: datetime, lines: Sequence[OrderLine] | None = None,
              supplier: Party | None = None) -> Order:
        return Order(self.order_number(signed_at), reg.party, supplier or self.ctx.supplier,
                     signed_at.replace(microsecond=0), tuple(lines if lines is not None else self.lines(reg)))

    def sign(self, reg: Registrant, document: bytes, signed_at: datetime, *, detached: bool = False,
             credential: Credential | None = None,
             intermediates: Sequence[x509.Certificate] | None = None) -> bytes:
        cred = credential or self.kit.credential(reg, self.ctx.now)
        return sign_order(document, cred.cert, cred.key, signing_time=signed_at, detached=detached,
                          intermediates=tuple(cred.chain if intermediates is None else intermediates))

    def envelope(self, order_id: str, signature: bytes, *, document: bytes | None = None,
                 received_at: datetime | None = None) -> bytes:
        return self.codec.encode("csos.orders.ReceivedOrder", {
            "order_id": order_id, "received_at": received_at or self.ctx.now, "source": "hostile",
            "format": "csos-order/1", "document": document, "signature": signature})

    def signed(self, kind: str, expected: str, reg: Registrant, order: Order, *, document: bytes | None = None,
               order_id: str | None = None, received_at: datetime | None = None,
               credential: Credential | None = None,
               intermediates: Sequence[x509.Certificate] | None = None) -> HostileMessage:
        """A ReceivedOrder carrying ``order`` (or ``document``) signed by ``reg``, keyed by its DEA number."""
        doc = document if document is not None else encode_order(order)
        detached = self.rng.random() < 0.5
        signature = self.sign(reg, doc, order.signed_at, detached=detached, credential=credential,
                              intermediates=intermediates)
        oid = order_id or self.order_id()
        value = self.envelope(oid, signature, document=doc if detached else None, received_at=received_at)
        return HostileMessage(t.RECEIVED, reg.dea_number.encode(), value, kind, expected, oid, order.order_number)

    def recent(self) -> datetime:
        """A signing time a few minutes before now (before the message is received)."""
        return self.ctx.now - timedelta(minutes=self.rng.randint(2, 50))

    def garbage(self, low: int = 24, high: int = 400) -> bytes:
        data = bytearray(self.rng.randbytes(self.rng.randint(low, high)))
        if data[:2] == b"\xc3\x01":  # never a valid single-object header by chance
            data[0] = 0x7B
        return bytes(data)

    def wrong_record(self, accepted: frozenset[str], i: int) -> bytes:
        """A valid Avro record of a type the topic's consumer does not take (rotating over four types)."""
        now = self.ctx.now
        candidates = [
            ("audit.AuditEvent", {"event_id": self.order_id(), "occurred_at": now, "stage": "hostile",
                                  "action": "hostile", "order_id": None, "purchaser_dea": None,
                                  "outcome": "x", "detail": "{}", "actor": "mallory"}),
            ("csos.registry.Registrant", {"dea_number": "BX0000000", "name": "HOSTILE", "business_activity": None,
                                          "state": None, "schedules": ["2"], "status": "ACTIVE",
                                          "expires_on": None, "updated_at": now}),
            ("som.Decision", {"decision_id": self.order_id(), "order_id": self.order_id(), "action": "RELEASE",
                              "actor": "mallory", "actor_role": "analyst", "rationale": "hostile",
                              "evidence_notes": "", "decided_at": now}),
            ("pki.CrlPublished", {"issuer": "CN=hostile", "crl_der": self.garbage(), "this_update": now,
                                  "next_update": None, "published_at": now, "source": "hostile"}),
        ]
        usable = [c for c in candidates if c[0] not in accepted]
        name, record = usable[i % len(usable)]
        return self.codec.encode(name, record)

    # -- look-alike intermediates (built once per generator: 700 certificate signatures)
    def lookalikes(self) -> tuple[Credential, tuple[x509.Certificate, ...]]:
        """An issuer and ``LOOKALIKE_CERTS`` CA certificates named like our sub-CA, under our root's name.

        Each carries the real root's key identifier, so a path builder must try every one of them
        before it can tell that none chains to the trust anchor.
        """
        if self._lookalikes is None:
            pki = self.ctx.pki
            key = pooled_key("rsa", slot="hostile-lookalike")
            root_aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.root.key.public_key())
            start = pki.sub_ca.cert.not_valid_before_utc
            end = pki.sub_ca.cert.not_valid_after_utc
            certs = []
            for _ in range(LOOKALIKE_CERTS):
                certs.append(x509.CertificateBuilder()
                             .subject_name(pki.sub_ca.cert.subject).issuer_name(pki.root.cert.subject)
                             .public_key(key.public_key()).serial_number(self.rng.getrandbits(63) + 1)
                             .not_valid_before(start).not_valid_after(end)
                             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                            critical=False)
                             .add_extension(root_aki, critical=False)
                             .sign(key, hashes.SHA256()))
            self._lookalike_issuer = Credential(certs[0], key, ())
            self._lookalikes = tuple(certs)
        assert self._lookalike_issuer is not None
        return self._lookalike_issuer, self._lookalikes


def _b(kind: str, expected: str, fn: Callable[["_Builder", str, str, int], list[HostileMessage]],
       weight: float = 1.0, unit_size: int = 1) -> tuple[str, KindSpec]:
    return kind, KindSpec(lambda b, i: fn(b, kind, expected, i), weight, unit_size)


# -- received topic: unreadable
def _random_bytes(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    return [HostileMessage(t.RECEIVED, b.purchaser().dea_number.encode(), b.garbage(), kind, expected)]


def _truncated_avro(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    reg = b.purchaser()
    whole = b.signed(kind, expected, reg, b.order(reg, b.recent()))
    cut = b.rng.randint(11, len(whole.value) - 1)
    return [HostileMessage(t.RECEIVED, whole.key, whole.value[:cut], kind, expected)]


def _wrong_schema(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    value = b.wrong_record(frozenset({"csos.orders.ReceivedOrder"}), i)
    return [HostileMessage(t.RECEIVED, b.purchaser().dea_number.encode(), value, kind, expected)]


def _unreadable_1mb(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    payload = bytearray(b.rng.randbytes(UNREADABLE_BYTES))
    payload[0] = 0x7B
    return [HostileMessage(t.RECEIVED, b"HOSTILE", bytes(payload), kind, expected)]


# -- received topic: readable envelope, bad signature or signer
def _garbage_signature(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    reg = b.purchaser()
    order = b.order(reg, b.recent())
    oid = b.order_id()
    signature = (b"\x30\x82" if i % 2 else b"") + b.garbage(16, 600)
    value = b.envelope(oid, signature, document=encode_order(order) if i % 3 else None)
    return [HostileMessage(t.RECEIVED, reg.dea_number.encode(), value, kind, expected, oid, None)]


def _corrupt_subject_credential(b: _Builder, reg: Registrant) -> Credential:
    """The registrant's certificate with its subject's organization bytes made invalid UTF-8.

    It still loads, and the CMS still names it by issuer and serial number, but reading its
    subject raises: a verifier that lets that escape fails on this order (the attacker's "raising
    message").
    """
    cred = b.kit.credential(reg, b.ctx.now)
    der = cred.cert.public_bytes(serialization.Encoding.DER)
    at = der.find(reg.name.encode())
    if at < 0:
        raise ValueError(f"{reg.dea_number}: the subject name is not in the certificate")
    broken = der[:at] + b"\xff\xfe" + der[at + 2:]
    return Credential(x509.load_der_x509_certificate(broken), cred.key, cred.chain)


def _corrupt_signer_subject(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    """A validly signed order whose embedded signer certificate then has its subject bytes broken in place.

    Patched after signing (same length, so the CMS stays well-formed DER): building the CMS
    around an already broken certificate makes asn1crypto re-read the name on some inputs.
    """
    reg = b.purchaser()
    order = b.order(reg, b.recent())
    good = b.kit.credential(reg, b.ctx.now)
    msg = b.signed(kind, expected, reg, order, credential=good)
    broken = _corrupt_subject_credential(b, reg).cert.public_bytes(serialization.Encoding.DER)
    _, envelope = b.codec.decode(msg.value)
    whole = good.cert.public_bytes(serialization.Encoding.DER)
    if whole not in envelope["signature"]:
        raise ValueError(f"{reg.dea_number}: the signer certificate is not embedded in its signature")
    envelope["signature"] = envelope["signature"].replace(whole, broken, 1)
    value = b.codec.encode("csos.orders.ReceivedOrder", envelope)
    return [HostileMessage(msg.topic, msg.key, value, kind, expected, msg.order_id, msg.order_number)]


def _lookalike_intermediates(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    reg = b.purchaser()
    issuer, certs = b.lookalikes()
    leaf = b.ctx.pki.issue_registrant(reg.dea_number, reg.name, reg.schedules, key=issuer.key,
                                      issuer=issuer, record=False,
                                      not_before=b.ctx.now - timedelta(days=30),
                                      not_after=b.ctx.now + timedelta(days=300))
    order = b.order(reg, b.recent())
    return [b.signed(kind, expected, reg, order, credential=leaf, intermediates=certs)]


def _oversize_document(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    """A signed ~900 KB document whose order number element is the bulk: defective, and echoed by a
    rejection that quotes the element it refuses (twice: reason and check detail)."""
    reg = b.purchaser()
    order = b.order(reg, b.recent())
    oversize = Order("26X" + "9" * OVERSIZE_ELEMENT_BYTES, order.purchaser, order.supplier, order.signed_at,
                     order.lines)
    msg = b.signed(kind, expected, reg, order, document=encode_order(oversize))
    return [HostileMessage(msg.topic, msg.key, msg.value, kind, expected, msg.order_id, None)]


# -- received topic: validly signed orders with hostile content
def _with_lines(lines_of: Callable[[_Builder, Registrant], list[OrderLine]]):
    def build(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
        reg = b.purchaser()
        return [b.signed(kind, expected, reg, b.order(reg, b.recent(), lines_of(b, reg)))]
    return build


def _replace_line(line: OrderLine, **changes: int) -> OrderLine:
    values = dict(line_no=line.line_no, ndc=line.ndc, product_name=line.product_name, strength=line.strength,
                  package_quantity=line.package_quantity, packages=line.packages)
    values.update(changes)
    return OrderLine(**values)


def _huge_packages(b: _Builder, reg: Registrant) -> list[OrderLine]:
    first, *rest = b.lines(reg)
    return [_replace_line(first, packages=HUGE_PACKAGES), *rest]


def _huge_line_no(b: _Builder, reg: Registrant) -> list[OrderLine]:
    first, *rest = b.lines(reg)
    return [_replace_line(first, line_no=HUGE_LINE_NO), *rest]


def _zero_or_negative_packages(b: _Builder, reg: Registrant) -> list[OrderLine]:
    first, *rest = b.lines(reg)
    return [_replace_line(first, packages=b.rng.choice([0, -1, -5, -(2 ** 31)])), *rest]


def _duplicate_line_no(b: _Builder, reg: Registrant) -> list[OrderLine]:
    lines = b.lines(reg, 3)
    if len(lines) < 2:  # a registrant stocking one product: the same item twice
        lines = lines * 2
    return [_replace_line(ln, line_no=1) for ln in lines]


def _forged_receipt(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    """Signed 61 days ago; the envelope claims it arrived the day after signing."""
    reg = b.purchaser()
    signed_at = b.ctx.now - timedelta(days=61, minutes=b.rng.randint(0, 600))
    order = b.order(reg, signed_at)
    return [b.signed(kind, expected, reg, order, received_at=signed_at + timedelta(days=1))]


def _other_supplier(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    reg = b.purchaser()
    return [b.signed(kind, expected, reg, b.order(reg, b.recent(), supplier=OTHER_SUPPLIER))]


def _months(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    """``MONTHS`` orders, one per calendar month going back from three months ago, published together.

    Each is signed an hour before the receipt time its envelope claims (the first of its month, noon
    UTC). Trusting the envelope puts every order's archive row, rejection or verdict in another
    monthly ClickHouse partition (``toYYYYMM(received_at)``) within one sink batch. Those signed
    within the certificates' validity (the last year) verify unless receipt is taken from the broker:
    then every one is more than 60 days old (ORDER_EXPIRED). Older ones fail certificate validity.
    """
    out = []
    month = (b.ctx.now.replace(day=1, hour=12, minute=0, second=0) - timedelta(days=80)).replace(day=1)
    for _ in range(MONTHS):
        reg = b.purchaser()
        out.append(b.signed(kind, expected, reg, b.order(reg, month - timedelta(hours=1)), received_at=month))
        month = (month - timedelta(days=1)).replace(day=1)
    return out


def _replay(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    """A valid order, then the same bytes again under a new order id."""
    reg = b.purchaser()
    original = b.signed("replay_original", DECIDED, reg, b.order(reg, b.recent()))
    copy = _reenveloped(b, original, b.order_id())
    return [original, HostileMessage(copy.topic, copy.key, copy.value, kind, expected, copy.order_id,
                                     original.order_number)]


def _reenveloped(b: _Builder, msg: HostileMessage, order_id: str) -> HostileMessage:
    _, rec = b.codec.decode(msg.value, expect="csos.orders.ReceivedOrder")
    value = b.envelope(order_id, rec["signature"], document=rec["document"], received_at=rec["received_at"])
    return HostileMessage(msg.topic, msg.key, value, msg.kind, msg.expected, order_id, msg.order_number)


def _replay_after_raiser(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    """Original, a message that makes verification raise (same purchaser, same partition), then the replay.

    A verifier that discards the purchaser's unsaved state when one order raises forgets that the
    original's number was just accepted, and accepts the replay.
    """
    reg = b.purchaser()
    original = b.signed("replay_original", DECIDED, reg, b.order(reg, b.recent()))
    raiser = b.signed("corrupt_signer_subject", NOT_RELEASED, reg, b.order(reg, b.recent()),
                      credential=_corrupt_subject_credential(b, reg))
    copy = _reenveloped(b, original, b.order_id())
    return [original, raiser, HostileMessage(copy.topic, copy.key, copy.value, kind, expected, copy.order_id,
                                             original.order_number)]


def _reused_order_id(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    """A valid order, then another valid order (other number, other bytes) under the same order id."""
    reg = b.purchaser()
    first = b.signed("reused_order_id_first", DECIDED, reg, b.order(reg, b.recent()))
    second = b.signed(kind, expected, reg, b.order(reg, b.recent()), order_id=first.order_id)
    return [first, second]


def _normal(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
    reg = b.purchaser()
    return [b.signed(kind, expected, reg, b.order(reg, b.recent(), b.lines(reg, 1)))]


# -- other input topics
def _other_garbage(topic: str) -> Callable[[_Builder, str, str, int], list[HostileMessage]]:
    def build(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
        return [HostileMessage(topic, f"HOSTILE-{b.rng.getrandbits(32):08x}".encode(), b.garbage(), kind, expected)]
    return build


def _other_wrong_schema(topic: str) -> Callable[[_Builder, str, str, int], list[HostileMessage]]:
    def build(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
        return [HostileMessage(topic, f"HOSTILE-{b.rng.getrandbits(32):08x}".encode(),
                               b.wrong_record(OTHER_INPUTS[topic], i), kind, expected)]
    return build


def _shipment(packages: Callable[[_Builder], int]) -> Callable[[_Builder, str, str, int], list[HostileMessage]]:
    """A shipment confirmation whose shipped quantity does not fit the table (negative, or beyond 32 bits).

    fastavro (1.13) writes an out-of-range ``int`` as the varint it is, which is exactly what a
    hostile producer can send; the round trip is checked so a future fastavro that refuses is noticed.
    """
    def build(b: _Builder, kind: str, expected: str, i: int) -> list[HostileMessage]:
        reg = b.purchaser()
        oid = b.order_id()
        n = packages(b)
        record = {"shipment_id": b.order_id(), "order_id": oid, "order_number": b.order_number(b.ctx.now),
                  "purchaser_dea": reg.dea_number, "supplier_dea": b.ctx.supplier.dea_number,
                  "shipped_at": b.ctx.now,
                  "lines": [{"line_no": 1, "ndc": b.lines(reg, 1)[0].ndc, "packages_shipped": n}]}
        value = b.codec.encode("warehouse.ShipmentConfirmation", record)
        try:
            decoded = b.codec.decode(value)[1]["lines"][0]["packages_shipped"]
        except DecodeError as exc:  # the codec's range check refuses it: the bytes carry the value as is
            decoded = n if str(n) in str(exc) else None
        if decoded != n:
            raise RuntimeError(f"fastavro no longer writes packages_shipped={n} as is (read back {decoded})")
        return [HostileMessage(t.SHIPMENTS, oid.encode(), value, kind, expected)]
    return build


HEAVY = 0.05  # share of the ~1 MB classes: a few per thousand messages

KINDS: dict[str, KindSpec] = dict([
    _b("random_bytes", DEAD_LETTER, _random_bytes),
    _b("truncated_avro", DEAD_LETTER, _truncated_avro),
    _b("wrong_schema", DEAD_LETTER, _wrong_schema),
    _b("unreadable_1mb", DEAD_LETTER, _unreadable_1mb, HEAVY),
    _b("garbage_signature", f"rejected:{MALFORMED_SIGNATURE}", _garbage_signature),
    _b("corrupt_signer_subject", NOT_RELEASED, _corrupt_signer_subject),
    _b("lookalike_intermediates", NOT_RELEASED, _lookalike_intermediates, HEAVY),
    _b("oversize_document", REJECTED_ANY, _oversize_document, HEAVY),
    _b("huge_packages", NOT_RELEASED, _with_lines(_huge_packages)),
    _b("huge_line_no", NOT_RELEASED, _with_lines(_huge_line_no)),
    _b("zero_or_negative_packages", f"rejected:{MALFORMED_ORDER}", _with_lines(_zero_or_negative_packages)),
    _b("duplicate_line_no", f"rejected:{MALFORMED_ORDER}", _with_lines(_duplicate_line_no)),
    _b("forged_receipt", f"rejected:{ORDER_EXPIRED}", _forged_receipt),
    _b("other_supplier", f"rejected:{WRONG_SUPPLIER}", _other_supplier),
    _b("months_in_one_batch", NOT_RELEASED, _months, 1.0, MONTHS),
    _b("replay", f"rejected:{DUPLICATE_ORDER_NUMBER}", _replay, 1.0, 2),
    _b("replay_after_raiser", f"rejected:{DUPLICATE_ORDER_NUMBER}", _replay_after_raiser, 1.0, 3),
    _b("reused_order_id", NOT_RELEASED, _reused_order_id, 1.0, 2),
    _b("normal", DECIDED, _normal, 3.0),
    *(_b(f"{_SHORT[topic]}_random_bytes", DEAD_LETTER, _other_garbage(topic)) for topic in OTHER_INPUTS),
    *(_b(f"{_SHORT[topic]}_wrong_schema", DEAD_LETTER, _other_wrong_schema(topic)) for topic in OTHER_INPUTS),
    _b("shipment_negative_packages", DEAD_LETTER, _shipment(lambda b: -b.rng.randint(1, 500))),
    _b("shipment_huge_packages", DEAD_LETTER, _shipment(lambda b: HUGE_PACKAGES)),
])


def _plan(count: int, kinds: Sequence[str], rng: random.Random) -> list[str]:
    """Which unit of which kind, in publishing order: every kind at least once, ``count`` messages in all."""
    total_weight = sum(KINDS[k].weight for k in kinds)
    units = {k: max(1, round(count * KINDS[k].weight / total_weight / KINDS[k].unit_size)) for k in kinds}
    minimum = sum(KINDS[k].unit_size for k in kinds)
    if count < minimum:
        raise ValueError(f"count {count} is too small for one unit of every kind asked for ({minimum} messages)")

    def size() -> int:
        return sum(n * KINDS[k].unit_size for k, n in units.items())

    while size() > count:  # trim the kind with the most messages
        k = max((k for k in kinds if units[k] > 1), key=lambda k: units[k] * KINDS[k].unit_size)
        units[k] -= 1
    singles = [k for k in kinds if KINDS[k].unit_size == 1 and KINDS[k].weight >= 1.0] or \
              [k for k in kinds if KINDS[k].unit_size == 1]
    i = 0
    while size() < count:
        if not singles:
            break
        units[singles[i % len(singles)]] += 1
        i += 1
    order = [k for k in kinds for _ in range(units[k])]
    rng.shuffle(order)
    return order


def generate(ctx: HostileContext, seed: int, count: int, kinds: Iterable[str] | None = None) -> list[HostileMessage]:
    """``count`` hostile messages (normal orders mixed in), deterministic in ``seed``.

    ``kinds`` restricts the classes (default: all of :data:`KINDS`). Multi-message units (a replay and
    its original, the 120 months) stay together and in order. Exactly ``count`` messages unless the
    chosen kinds are all multi-message units that cannot add up to it.
    """
    chosen = list(kinds) if kinds is not None else list(KINDS)
    unknown = [k for k in chosen if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown hostile kinds: {unknown}; known: {sorted(KINDS)}")
    builder = _Builder(ctx, seed)
    seen: Counter[str] = Counter()
    out: list[HostileMessage] = []
    for kind in _plan(count, chosen, builder.rng):
        out.extend(KINDS[kind].build(builder, seen[kind]))
        seen[kind] += 1
    return out


def sentinel_order(ctx: HostileContext, seed: int) -> HostileMessage:
    """A normal order to publish after the hostile ones: once it is decided and in ClickHouse, the
    worker and the sink got past everything before it."""
    b = _Builder(ctx, seed=seed + 7_000_003)
    return _normal(b, "sentinel", DECIDED, 0)[0]


# ----------------------------------------------------------------------------- publishing
@dataclass(frozen=True)
class SentMessage:
    """A hostile message and where the broker put it (dead letters name this offset)."""

    message: HostileMessage
    partition: int
    offset: int


def publish_hostile(bootstrap: str, messages: Sequence[HostileMessage], timeout: float = 120.0) -> list[SentMessage]:
    """Produce every message (same producer settings as the pipeline's) and return where each landed.

    Raises if one could not be written: a message the broker refused has no trace to look for.
    """
    # Every delivery reported (the pipeline's producers report failures only): where each message landed.
    producer = Producer(dict(producer_defaults(), **{"bootstrap.servers": bootstrap,
                                                     "delivery.report.only.error": False}, **client_config()))
    placed: dict[int, tuple[int, int]] = {}
    errors: list[str] = []

    def report(i: int) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(f"message {i} ({messages[i].kind}) on {msg.topic()}: {err.str()}")
            else:
                placed[i] = (msg.partition(), msg.offset())
        return on_delivery

    for i, m in enumerate(messages):
        while True:
            try:
                producer.produce(m.topic, value=m.value, key=m.key, on_delivery=report(i))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(timeout)
    if remaining or errors:
        raise RuntimeError(f"{remaining} hostile messages not delivered; errors: {errors[:5]}")
    return [SentMessage(m, *placed[i]) for i, m in enumerate(messages)]


# ----------------------------------------------------------------------------- traces and the judge
@dataclass(frozen=True)
class Trace:
    """One thing the pipeline left for a message: ``source`` and its outcome."""

    source: str  # "rejection", "verdict", "pending" or "dead_letter"
    outcome: str  # reason code, RELEASE/HOLD, parking reason code, or the dead-lettering stage

    def __str__(self) -> str:
        return f"{self.source}:{self.outcome}"


def _owner(by_id: dict[str, list[int]], sent: Sequence[SentMessage], order_id: str,
           order_number: str | None) -> int | None:
    """The message an outcome row belongs to: same order id, and same order number when several share it
    (else the last one: a reused order id's intruder)."""
    candidates = by_id.get(order_id)
    if not candidates:
        return None
    same = [i for i in candidates if order_number is not None and sent[i].message.order_number == order_number]
    return same[0] if same else candidates[-1]


def collect_traces(query: Callable[[str], list[list[Any]]], sent: Sequence[SentMessage]) -> list[list[Trace]]:
    """Every message's traces, read with ``query`` (SQL -> rows; e.g. ``connectors.clickhouse.query.run_query``).

    Rows are read without FINAL and de-duplicated on their content, so an at-least-once redelivery
    counts once while two different outcomes for one message count twice.
    """
    traces: list[list[Trace]] = [[] for _ in sent]
    by_offset = {(s.message.topic, s.partition, s.offset): i for i, s in enumerate(sent)}
    for topic, partition, offset, stage in query(
            "SELECT DISTINCT source_topic, source_partition, source_offset, stage FROM dead_letters"):
        i = by_offset.get((topic, int(partition), int(offset)))
        if i is not None:
            traces[i].append(Trace("dead_letter", stage))
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sent):
        if s.message.order_id:
            by_id[s.message.order_id].append(i)
    decided: set[int] = set()
    for source, sql in (("rejection", "SELECT DISTINCT order_id, order_number, reason_code FROM rejections"),
                        ("verdict", "SELECT DISTINCT order_id, order_number, verdict FROM verdicts")):
        for order_id, number, outcome in query(sql):
            i = _owner(by_id, sent, order_id, number)
            if i is not None:
                traces[i].append(Trace(source, outcome))
                decided.add(i)
    for order_id, number, code in query("SELECT DISTINCT order_id, order_number, reason_code FROM pending_orders"):
        i = _owner(by_id, sent, order_id, number)
        if i is not None and i not in decided and not any(tr.source == "pending" for tr in traces[i]):
            traces[i].append(Trace("pending", code))  # parked and still waiting: its one trace so far
    return traces


def released_on_topic(bootstrap: str, sent: Sequence[SentMessage], timeout: float = 60.0) -> set[int]:
    """Indices of messages whose order went out on ``som.release`` (what the warehouse would ship)."""
    codec = default_codec()
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sent):
        if s.message.order_id:
            by_id[s.message.order_id].append(i)
    out: set[int] = set()
    for m in consume_all(bootstrap, [t.RELEASE], idle_seconds=3.0, timeout=timeout):
        try:
            rec = codec.decode(m.value(), expect="som.Release")[1]
        except Exception:  # noqa: BLE001 - the release topic's own hygiene is not judged here
            continue
        i = _owner(by_id, sent, rec["order_id"], rec["order_number"])
        if i is not None:
            out.add(i)
    return out


def problems(message: HostileMessage, traces: Sequence[Trace], released: bool) -> list[str]:
    """What is wrong with how the pipeline treated ``message`` (empty: all is well)."""
    out = []
    if not traces:
        out.append("no trace")
    elif len(traces) > 1:
        out.append(f"{len(traces)} traces ({', '.join(map(str, traces))})")
    was_released = released or any(tr == Trace("verdict", "RELEASE") for tr in traces)
    if was_released and message.expected != DECIDED:
        out.append("released")
    if len(traces) == 1:
        tr = traces[0]
        exp = message.expected
        if exp.startswith("rejected:"):
            code = exp.split(":", 1)[1]
            if tr.source != "rejection" or (code != "any" and tr.outcome != code):
                out.append(f"expected {exp}, got {tr}")
        elif exp == DEAD_LETTER and tr.source != "dead_letter":
            out.append(f"expected a dead letter, got {tr}")
    return out


@dataclass
class KindRow:
    kind: str
    expected: str
    sent: int = 0
    traced: int = 0
    released: int = 0
    dead_lettered: int = 0
    rejected: int = 0
    held: int = 0
    parked: int = 0
    failing: int = 0
    examples: list[str] = field(default_factory=list)  # a few problems, for the report


@dataclass
class HostileReport:
    sent: list[SentMessage]
    traces: list[list[Trace]]
    released: set[int]
    problems: list[list[str]]

    @property
    def rows(self) -> list[KindRow]:
        rows: dict[str, KindRow] = {}
        for s, trs, probs, i in zip(self.sent, self.traces, self.problems, range(len(self.sent))):
            m = s.message
            row = rows.setdefault(m.kind, KindRow(m.kind, m.expected))
            row.sent += 1
            row.traced += bool(trs)
            row.released += (i in self.released or any(tr == Trace("verdict", "RELEASE") for tr in trs))
            row.dead_lettered += any(tr.source == "dead_letter" for tr in trs)
            row.rejected += any(tr.source == "rejection" for tr in trs)
            row.held += any(tr == Trace("verdict", "HOLD") for tr in trs)
            row.parked += any(tr.source == "pending" for tr in trs)
            if probs:
                row.failing += 1
                if len(row.examples) < 3:
                    row.examples.append(f"{m.order_id or f'{m.topic}[{s.partition}]@{s.offset}'}: {'; '.join(probs)}")
        return sorted(rows.values(), key=lambda r: r.kind)

    def failures(self) -> dict[str, list[str]]:
        """Kind -> a few example problems, for the kinds with any."""
        return {r.kind: r.examples for r in self.rows if r.failing}

    def count(self, problem: str) -> int:
        """Messages with a problem starting with ``problem`` ("no trace", "released", ...)."""
        return sum(1 for probs in self.problems if any(p.startswith(problem) for p in probs))

    def render(self) -> str:
        header = ("kind", "expected", "sent", "traced", "released", "dead-lettered", "rejected", "held", "parked",
                  "failing")
        body = [(r.kind, r.expected, r.sent, r.traced, r.released, r.dead_lettered, r.rejected, r.held, r.parked,
                 r.failing) for r in self.rows]
        total = ("TOTAL", "", *(sum(int(row[c]) for row in body) for c in range(2, len(header))))
        cells = [tuple(map(str, row)) for row in (header, *body, total)]
        widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
        lines = ["  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(row, widths)))
                 for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, lines[1])
        for kind, examples in self.failures().items():
            lines.append(f"  {kind}: " + " | ".join(examples))
        return "\n".join(lines)


def collect_report(query: Callable[[str], list[list[Any]]], bootstrap: str,
                   sent: Sequence[SentMessage]) -> HostileReport:
    """Traces, releases on the topic, and the problems of every sent message."""
    traces = collect_traces(query, sent)
    released = released_on_topic(bootstrap, sent)
    probs = [problems(s.message, trs, i in released) for i, (s, trs) in enumerate(zip(sent, traces))]
    return HostileReport(list(sent), traces, released, probs)


def untraced(query: Callable[[str], list[list[Any]]], sent: Sequence[SentMessage]) -> int:
    """How many messages have no trace yet (the thing to wait on)."""
    return sum(1 for trs in collect_traces(query, sent) if not trs)


__all__ = [
    "DEAD_LETTER", "DECIDED", "HostileContext", "HostileMessage", "HostileReport", "KINDS", "KindSpec",
    "NOT_RELEASED", "OTHER_SUPPLIER", "REJECTED_ANY", "SentMessage", "Trace", "collect_report", "collect_traces",
    "generate", "problems", "publish_hostile", "released_on_topic", "sentinel_order", "untraced",
]

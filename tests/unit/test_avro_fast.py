"""The fast writer must publish exactly fastavro's bytes: every consumer and the audit trail's digests rely on it."""
from __future__ import annotations

import io
import random
from datetime import datetime, timedelta, timezone
from typing import Any

import fastavro
import pytest

from streams.core.avro_codec import MAGIC, AvroCodec, Schema
from streams.core.avro_fast import Unsupported, VarintMemo, varint

TEXTS = ["", "a", "OXYCODONE HCL 10MG TAB", "Zoë's Pharmacy — Québec", "日本語テキスト", "emoji 💊", "x" * 300]
LONGS = [0, 1, -1, 63, 64, -64, -65, 127, 128, 2 ** 31 - 1, -2 ** 31, 2 ** 40, 2 ** 63 - 1, -2 ** 63]
INTS = [0, 1, -1, 64, -65, 300, 2 ** 31 - 1, -2 ** 31]
HOT = {"som.Verdict", "som.Hold", "som.Release", "csos.orders.VerifiedOrder", "audit.AuditEvent",
       "csos.orders.Rejection", "som.state.RegistrantState", "csos.state.PurchaserVerifyState",
       "som.state.Case", "som.CaseEvent"}
DOUBLES = [0.0, -0.0, 1.5, -2.69, 4035.0, 1e300, float("inf"), 3, 0, -7]


def fastavro_bytes(schema: Schema, record: dict[str, Any]) -> bytes:
    fo = io.BytesIO()
    fo.write(MAGIC + schema.fingerprint)
    fastavro.schemaless_writer(fo, schema.parsed, record)
    return fo.getvalue()


class Records:
    """Random records that fit a parsed schema: optional fields null or set, empty and long lists, unicode."""

    def __init__(self, rng: random.Random, named: dict[str, Any]) -> None:
        self.rng, self.named, self.depth = rng, named, 0

    def of(self, node: Any) -> Any:
        rng = self.rng
        if isinstance(node, str):
            return {"string": lambda: rng.choice(TEXTS), "long": lambda: rng.choice(LONGS),
                    "int": lambda: rng.choice(INTS), "double": lambda: rng.choice(DOUBLES),
                    "float": lambda: rng.choice([0.0, 1.5, -2.25]), "boolean": lambda: rng.random() < 0.5,
                    "bytes": lambda: rng.randbytes(rng.choice([0, 1, 200])), "null": lambda: None,
                    }.get(node, lambda: self.of(self.named[node]))()
        if isinstance(node, list):
            # Deep recursive types (a case's nested records) end on their null branch.
            options = [b for b in node if b != "null"] if self.depth < 4 else [b for b in node if b == "null"] or node
            return self.of(rng.choice(options + (["null"] if "null" in node else [])))
        kind, logical = node["type"], node.get("logicalType")
        if logical in ("timestamp-millis", "timestamp-micros"):
            return datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(
                microseconds=rng.randrange(-10 ** 15, 10 ** 15))
        if logical == "date":
            return datetime(2026, 1, 1).date() + timedelta(days=rng.randrange(-4000, 4000))
        if kind in ("record", "error"):
            self.depth += 1
            try:
                return {f["name"]: self.of(f["type"]) for f in node["fields"]}
            finally:
                self.depth -= 1
        if kind == "array":
            return [self.of(node["items"]) for _ in range(rng.choice([0, 1, 3, 70]) if self.depth < 3 else 0)]
        if kind == "map":
            return {rng.choice(TEXTS) + str(i): self.of(node["values"]) for i in range(rng.choice([0, 1, 3, 70]))}
        if kind == "enum":
            return rng.choice(node["symbols"])
        if kind == "fixed":
            return rng.randbytes(node["size"])
        return self.of(kind)


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


def test_varint_is_avro_zigzag():
    assert [varint(n) for n in (0, -1, 1, -2, 63, -64, 64)] == [b"\x00", b"\x01", b"\x02", b"\x03", b"\x7e",
                                                                 b"\x7f", b"\x80\x01"]
    assert varint(2 ** 63 - 1) == b"\xfe" + b"\xff" * 8 + b"\x01"
    edges = [s * (2 ** k + d) for k in range(0, 64, 7) for d in (-1, 0, 1) for s in (1, -1)]
    for n in [n for n in edges if -2 ** 63 <= n < 2 ** 63] + list(range(-300, 300)):
        fo = io.BytesIO()
        fastavro.schemaless_writer(fo, "long", n)
        assert varint(n) == fo.getvalue(), n


def test_every_current_schema_encodes_as_fastavro_does(codec):
    """Random records of every schema (the hot path's and the rest) give fastavro's bytes exactly."""
    rng = random.Random(14)
    fast = 0
    for name, schema in sorted(codec.catalog.current.items()):
        writer = codec._writer(schema)
        gen = Records(rng, schema.parsed.get("__named_schemas", {}))
        for _ in range(60):
            record = gen.of(schema.parsed)
            assert codec.encode(name, record) == fastavro_bytes(schema, record), name
            if writer is not None and name in HOT:
                writer(record, [])  # the hot path's records are written by the fast writer itself
                fast += 1
    assert fast == 60 * len(HOT)


@pytest.mark.parametrize("change", [
    {"business_activity": None, "purchaser_state": None},   # optional fields null
    {"business_activity": "RETAIL PHARMACY", "purchaser_state": "NY"},
    {"purchaser_name": "Zoë's Pharmacy — 日本 💊"},
    {"lines": []},
    {"lines": ()},                                           # a tuple: fastavro writes it (fallback)
    {"signed_at": datetime(2026, 3, 1, 12, 0, 0, 999_999)},  # naive: fastavro's local-time rule (fallback)
    {"signed_at": 1_767_225_600_123},                        # already in milliseconds
    {"verified_at": datetime(1969, 12, 31, 23, 59, 59, 999_500, tzinfo=timezone.utc)},  # before the epoch
    {"verified_at": datetime(2026, 3, 1, 7, 0, 0, 1_999, tzinfo=timezone(timedelta(hours=-5)))},
])
def test_verified_order_cases_match_fastavro(codec, change):
    order = {
        "order_id": "o-1", "order_number": "26X000001", "purchaser_dea": "BE8821844", "purchaser_name": "Pharmacy",
        "supplier_dea": "RS1234563", "signed_at": datetime(2026, 3, 1, tzinfo=timezone.utc),
        "received_at": datetime(2026, 3, 1, 0, 1, tzinfo=timezone.utc),
        "verified_at": datetime(2026, 3, 1, 0, 1, 0, 5_000, tzinfo=timezone.utc), "signer_serial": "0a1b",
        "signer_fingerprint": "ff" * 32, "business_activity": None, "purchaser_state": "OH",
        "lines": [{"line_no": 1, "ndc": "00406-0512-01", "product_name": "OXYCODONE HCL 10MG TAB", "strength": "10 MG",
                   "package_quantity": 100, "packages": 3, "dosage_units": 300, "schedule": "2",
                   "drug_family": "OXYCODONE", "base_weight_g": 2.69, "mme": 4035}],
    }
    order.update(change)
    schema = codec.catalog.get("csos.orders.VerifiedOrder")
    assert codec.encode(schema.fullname, order) == fastavro_bytes(schema, order)
    assert codec.decode(codec.encode(schema.fullname, order))[1]["order_id"] == "o-1"


def test_a_missing_field_gets_fastavros_default(codec):
    """A Hold without decision_id/decision_version: fastavro fills the defaults, so the fast writer defers to it."""
    schema = codec.catalog.get("som.Release")
    release = {"order_id": "o", "order_number": "n", "purchaser_dea": "d", "released_at": 0, "released_by": "m",
               "lines": []}
    assert codec.encode("som.Release", release) == fastavro_bytes(schema, release)


@pytest.mark.parametrize("bad", [{"order_id": None}, {"lines": [{"line_no": "one"}]}, {"signed_at": "yesterday"}])
def test_a_bad_record_fails_as_fastavro_fails(codec, bad):
    order = {"order_id": "o", "order_number": "n", "purchaser_dea": "d", "purchaser_name": "p", "supplier_dea": "s",
             "signed_at": 0, "received_at": 0, "verified_at": 0, "signer_serial": "", "signer_fingerprint": "",
             "lines": []}
    order.update(bad)
    schema = codec.catalog.get("csos.orders.VerifiedOrder")
    with pytest.raises(Exception) as theirs:
        fastavro_bytes(schema, order)
    with pytest.raises(type(theirs.value)):
        codec.encode(schema.fullname, order)


NULLABLE_TIMESTAMP = {"type": "record", "name": "T", "fields": [
    {"name": "due", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
    {"name": "on", "type": [{"type": "int", "logicalType": "date"}, "null"]}]}


@pytest.mark.parametrize("due, on", [
    (None, None),
    (datetime(2026, 3, 1, 12, 0, 0, 999_999, tzinfo=timezone.utc), datetime(2026, 3, 1).date()),
    (1_767_225_600_123, 20_000),                                     # already in milliseconds / days
    (datetime(1969, 12, 31, 23, 59, 59, 999_500, tzinfo=timezone.utc), None),
    (datetime(2026, 3, 1, 12, 0, 0), None),                           # naive: fastavro's local-time rule
])
def test_an_optional_logical_value_is_written_as_fastavro_writes_it(due, on):
    """A case's deadlines and a registrant's expiry: null or set, the fast writer's bytes are fastavro's."""
    from streams.core.avro_fast import compile_writer

    parsed = fastavro.parse_schema(NULLABLE_TIMESTAMP)
    writer = compile_writer(parsed)
    assert writer is not None  # the union is compiled, not left to fastavro
    record = {"due": due, "on": on}
    fo = io.BytesIO()
    fastavro.schemaless_writer(fo, parsed, record)
    parts: list[bytes] = []
    try:
        writer(record, parts)
    except Unsupported:
        parts = []  # the codec then lets fastavro write it: the same bytes by definition
    assert not parts or b"".join(parts) == fo.getvalue()
    if isinstance(due, datetime) and due.tzinfo is not None or due is None or isinstance(due, int):
        assert parts, "an aware datetime, milliseconds or null is written by the fast writer itself"


@pytest.mark.parametrize("due", ["tomorrow", 1.5, ("long", 5)])
def test_an_optional_logical_value_of_another_type_is_left_to_fastavro(due):
    """A value neither null nor the logical type's: the fast writer declines; fastavro writes or refuses it."""
    from streams.core.avro_fast import compile_writer

    parsed = fastavro.parse_schema(NULLABLE_TIMESTAMP)
    with pytest.raises(Unsupported):
        compile_writer(parsed)({"due": due, "on": None}, [])


def verified_orders(codec: AvroCodec, n: int) -> list[dict[str, Any]]:
    """Random verified orders: optional fields null or set, unicode, no lines to seventy."""
    schema = codec.catalog.get("csos.orders.VerifiedOrder")
    gen = Records(random.Random(7), schema.parsed.get("__named_schemas", {}))
    return [gen.of(schema.parsed) for _ in range(n)]


def test_outputs_spliced_from_the_verified_order_are_fastavros_bytes(codec):
    """A hold embedding the order read, a verdict and a release repeating its lines: copied bytes == encoded."""
    for original in verified_orders(codec, 150):
        data = codec.encode("csos.orders.VerifiedOrder", original)
        _, order = codec.decode(data)
        for last_items in (None, len(order["lines"])):  # every field scanned; the lines by their blocks only
            found = codec.encoded_fields(data, "csos.orders.VerifiedOrder", last_items=last_items)
            assert found is not None
            check_splices(codec, order, found)


def check_splices(codec: AvroCodec, order: dict[str, Any], found: Any) -> None:
    """Each output built from ``order`` with its found encodings spliced is fastavro's encoding of it."""
    whole, fields = found
    common = {"order_id": order["order_id"], "order_number": order["order_number"],
              "purchaser_dea": order["purchaser_dea"], "decision_id": "d", "decision_version": 1}
    reason = {"detector": "size", "dimension": "size", "drug_family": "É", "value": 1.0, "baseline": 0.5,
              "threshold": 2, "window": "w", "fired": True, "explanation": "x", "enforced": True}
    outputs = {
        "som.Hold": (dict(common, held_at=order["verified_at"], reasons=[reason], summary="s", order=order),
                     {"order": whole}),
        "som.Release": (dict(common, supplier_dea="S", released_at=order["verified_at"], released_by="monitor",
                             lines=order["lines"]), {"lines": fields["lines"]}),
        "som.Verdict": (dict(common, verdict="RELEASE", decided_at=order["verified_at"],
                             received_at=order["received_at"], signed_at=order["signed_at"], model_version="m",
                             reasons=[], lines=order["lines"], total_dosage_units=0), {"lines": fields["lines"]}),
    }
    for name, (record, spliced) in outputs.items():
        schema = codec.catalog.get(name)
        assert codec.encode(name, record, spliced=spliced) == fastavro_bytes(schema, record), name


def _two_blocks(data: bytes) -> bytes:
    """The same order with its lines written as two blocks (valid Avro, not what fastavro writes)."""
    codec = AvroCodec()
    _, order = codec.decode(data)
    head = codec.encode("csos.orders.VerifiedOrder", dict(order, lines=[]))[:-1]  # without the end marker
    one = codec.encode("csos.orders.VerifiedOrder", dict(order, lines=order["lines"][:1]))[len(head):-1]
    rest = codec.encode("csos.orders.VerifiedOrder", dict(order, lines=order["lines"][1:]))[len(head):]
    return head + one + rest


@pytest.mark.parametrize("last_items", [None, 3])
@pytest.mark.parametrize("damage", [
    _two_blocks,
    lambda d: d[:2] + bytes(8) + d[10:],                        # another writer schema
    lambda d: d[:11] + b"\x80" + d[11:],                        # order_id's length as an overlong varint
])
def test_a_body_other_than_fastavros_is_never_spliced(codec, damage, last_items):
    order = verified_orders(codec, 1)[0]
    order["lines"] = [Records(random.Random(1), {}).of(codec.catalog.get("csos.orders.OrderLine").parsed)] * 3
    canonical = codec.encode("csos.orders.VerifiedOrder", order)
    data = damage(canonical)
    assert data != canonical
    assert codec.encoded_fields(data, "csos.orders.VerifiedOrder", last_items=last_items) is None


def test_an_overlong_varint_among_the_lines_still_copies_the_same_values(codec):
    """The limit of checking the lines by their blocks: an overlong end marker is copied, and reads the same."""
    order = verified_orders(codec, 1)[0]
    order["lines"] = [Records(random.Random(1), {}).of(codec.catalog.get("csos.orders.OrderLine").parsed)] * 3
    canonical = codec.encode("csos.orders.VerifiedOrder", order)
    odd = canonical[:-1] + b"\x80\x00"
    _, read = codec.decode(odd)
    assert codec.encoded_fields(odd, "csos.orders.VerifiedOrder") is None  # scanned item by item: refused
    found = codec.encoded_fields(odd, "csos.orders.VerifiedOrder", last_items=3)
    assert found is not None
    release = {"order_id": "o", "order_number": "n", "purchaser_dea": "d", "supplier_dea": "s", "released_at": 0,
               "released_by": "m", "lines": read["lines"], "decision_id": "x", "decision_version": 1}
    copied = codec.encode("som.Release", release, spliced={"lines": found[1]["lines"]})
    assert codec.decode(copied) == codec.decode(codec.encode("som.Release", release))


def test_a_two_block_body_still_reads_but_is_encoded_afresh(codec):
    order = verified_orders(codec, 1)[0]
    order["lines"] = [Records(random.Random(1), {}).of(codec.catalog.get("csos.orders.OrderLine").parsed)] * 3
    canonical = codec.encode("csos.orders.VerifiedOrder", order)
    other = _two_blocks(canonical)
    assert other != canonical and codec.decode(other)[1] == codec.decode(canonical)[1]
    assert codec.encoded_fields(other, "csos.orders.VerifiedOrder", last_items=3) is None


def test_a_splice_of_another_type_is_ignored(codec):
    """Bytes written as another type are never copied into a field: the field is encoded from the record."""
    release = {"order_id": "o", "order_number": "n", "purchaser_dea": "d", "supplier_dea": "s", "released_at": 0,
               "released_by": "m", "lines": [], "decision_id": "x", "decision_version": 1}
    wrong = {"lines": ('{"type":"array","items":"long"}', b"\x02\x04\x00")}
    assert codec.encode("som.Release", release, spliced=wrong) == codec.encode("som.Release", release)


@pytest.mark.parametrize("values", [
    list(range(-8192, -8180)) + list(range(8180, 8192)),   # one and two varint bytes either side of 0
    [0] * 9 + [8192],
    [-8193] + [1] * 9,
    [20430, 20433, 20458, 24310, 1200, 1767596661739],      # day and month numbers, units, epoch ms
    [2 ** 63 - 1, -2 ** 63] * 5,                            # the ends of a long
    [2 ** 31 - 1, -2 ** 31, 2 ** 31, -2 ** 31 - 1],         # the ends of an int, and one past each
    [2 ** 63, 1],                                           # one past a long
    [1] * 8 + [True],                                       # a bool among ints: fastavro decides
    [1] * 8 + [1.0],
    [1] * 3,
    [],
])
def test_arrays_of_ints_are_fastavros_bytes(codec, values):
    schema = codec.catalog.get("som.state.RegistrantState")
    gen = Records(random.Random(5), schema.parsed["__named_schemas"])
    state = gen.of(schema.parsed)
    state["learned_ids"] = [v for v in values if type(v) is not int or -2 ** 63 <= v < 2 ** 63]  # an int array
    state["families"] = {"F": dict(gen.of(schema.parsed["__named_schemas"]["som.state.FamilyBaseline"]),
                                   recent_ms=values)}                                            # a long array
    try:
        expected = fastavro_bytes(schema, state)
    except Exception as exc:  # noqa: BLE001 - then the codec must fail alike
        with pytest.raises(type(exc)):
            codec.encode(schema.fullname, state)
        return
    assert codec.encode(schema.fullname, state) == expected


@pytest.mark.parametrize("value", [2 ** 63, -2 ** 63 - 1, 2 ** 64, -2 ** 65, 2 ** 200, -2 ** 200])
def test_a_long_out_of_range_fails_as_fastavro_fails(codec, value):
    """The zig-zag form of a value outside 64 bits is 2**64 or more: the fast writer never writes one."""
    schema = codec.catalog.get("csos.state.PurchaserVerifyState")
    state = {"purchaser_dea": "d", "accepted": {"n": value}, "pending": {}, "order_ids": {}, "outcomes": {}}
    with pytest.raises(Exception) as theirs:
        fastavro_bytes(schema, state)
    with pytest.raises(type(theirs.value)):
        codec.encode(schema.fullname, state)


def test_the_varint_memo_stays_bounded_and_right():
    """Ever-new values (epoch milliseconds) empty the memo when it is full; every answer is still the varint."""
    memo = VarintMemo(1 << 64, max_entries=8)
    values = [1767596661739 + i for i in range(100)] + [-5, 0, 20430] * 3
    assert [memo[v] for v in values] == [varint(v) for v in values]
    assert len(memo) <= 8
    with pytest.raises(Unsupported):
        VarintMemo(1 << 32)[2 ** 31]  # past an int
    with pytest.raises(Unsupported):
        memo[-2 ** 63 - 1]            # past a long

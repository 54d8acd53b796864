"""The generated reader must give exactly fastavro's values, and every body fastavro's path refuses stays refused.

Consumers, the sink and the audit trail rely on a decoded message being the
same Python values whichever reader made them (types, dict order, datetimes),
and on a corrupt or crafted body being refused as a ``DecodeError``.
"""
from __future__ import annotations

import io
import random
from typing import Any

import fastavro
import pytest

from streams.core.avro_codec import HEADER_LEN, AvroCodec, DecodeError, check_ranges
from streams.core.avro_fast import varint
from streams.core.avro_read import compile_reader
from tests.unit.test_avro_fast import HOT, Records, fastavro_bytes, verified_orders

HOT_READ = HOT | {"csos.orders.ReceivedOrder", "csos.registry.Registrant"}


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


def fastavro_decode(codec: AvroCodec, data: bytes) -> tuple[str, dict[str, Any]]:
    """What ``decode`` did before the generated reader: fastavro's reader, the trailing-bytes and range checks."""
    writer = codec.writer_of(data)
    try:
        fo = io.BytesIO(data)
        fo.seek(HEADER_LEN)
        record = fastavro.schemaless_reader(fo, writer.parsed, None)
        if fo.tell() != len(data):
            raise DecodeError("trailing bytes")
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - as decode: any error of fastavro's is a corrupt body
        raise DecodeError(f"corrupt: {exc}") from None
    check_ranges(writer.fullname, record, writer.parsed)
    return writer.fullname, record


def outcome(fn: Any, *args: Any) -> str:
    """A decode's result as text that tells types, dict order and the error class apart."""
    try:
        return repr(fn(*args))
    except DecodeError:
        return "DecodeError"


def test_every_current_schema_reads_as_fastavro_reads(codec):
    """Random records of every schema: the generated reader reads the whole body into fastavro's values."""
    rng = random.Random(15)
    for name, schema in sorted(codec.catalog.current.items()):
        read = compile_reader(schema.parsed)
        assert read is not None, name
        gen = Records(rng, schema.parsed.get("__named_schemas", {}))
        for _ in range(40):
            data = fastavro_bytes(schema, gen.of(schema.parsed))
            value, end = read(data, HEADER_LEN)
            assert end == len(data), name
            assert repr(value) == repr(fastavro_decode(codec, data)[1]), name
            assert repr(codec.decode(data)) == repr(fastavro_decode(codec, data)), name


def mutations(rng: random.Random, data: bytes) -> list[bytes]:
    """Corrupt copies of a message body: bytes changed, cut, added, a varint made longer, a byte set high."""
    out = []
    for _ in range(12):
        at = rng.randrange(HEADER_LEN, len(data))
        out.append(data[:at] + bytes((rng.randrange(256),)) + data[at + 1:])
        out.append(data[:at])
        out.append(data[:at] + b"\x80" + data[at:])
        out.append(data[:at] + bytes((data[at] | 0x80,)) + data[at + 1:])
        out.append(data[:at] + bytes((data[at] ^ 1,)) + data[at + 1:])
    out.append(data + b"\x00")
    return out


@pytest.mark.parametrize("name", sorted(HOT_READ))
def test_a_corrupt_body_reads_or_fails_as_with_fastavro(codec, name):
    """Each corrupt body: a ``DecodeError`` where fastavro's path gave one, else the very same values."""
    rng = random.Random(name)
    schema = codec.catalog.get(name)
    gen = Records(rng, schema.parsed.get("__named_schemas", {}))
    for _ in range(6):
        data = fastavro_bytes(schema, gen.of(schema.parsed))
        for bad in mutations(rng, data):
            assert outcome(codec.decode, bad) == outcome(fastavro_decode, codec, bad)


def test_an_int_beyond_32_bits_is_refused_naming_the_field(codec):
    order = verified_orders(codec, 1)[0]
    order["lines"] = [Records(random.Random(2), {}).of(codec.catalog.get("csos.orders.OrderLine").parsed)]
    order["lines"][0]["line_no"] = 1
    head = codec.encode("csos.orders.VerifiedOrder", dict(order, lines=[]))[:-1]
    data = codec.encode("csos.orders.VerifiedOrder", order)
    at = len(head) + 1  # after the block count: the first line's line_no
    assert data[at:at + 1] == varint(1)
    for big in (2 ** 31, 2 ** 40, -2 ** 31 - 1):
        crafted = data[:at] + varint(big) + data[at + 1:]
        with pytest.raises(DecodeError, match=rf"out of range.*OrderLine\.line_no = {big} \(expected int\)"):
            codec.decode(crafted)
    for edge in (2 ** 31 - 1, -2 ** 31):
        assert codec.decode(data[:at] + varint(edge) + data[at + 1:])[1]["lines"][0]["line_no"] == edge


@pytest.mark.parametrize("body", [
    lambda d: d[:11] + b"\x80" + d[11:],                               # a length as an overlong (two-byte) varint
    lambda d: d[:10] + b"\x01" + d[11:],                               # a negative length
    lambda d: d[:11] + b"\x80" * 9 + b"\x00" + d[11:],                  # ten bytes: still 64 bits
    lambda d: d[:11] + b"\x80" * 10 + b"\x00" + d[11:],                 # eleven bytes: fastavro decides
    lambda d: d + b"\x00",                                             # trailing bytes
    lambda d: bytearray(d),                                            # not bytes: read the same
    lambda d: memoryview(d),
])
def test_odd_bodies_read_as_fastavro_reads_them(codec, body):
    order = verified_orders(codec, 1)[0]
    order["order_id"] = "o" * 100  # a length of two bytes
    data = body(codec.encode("csos.orders.VerifiedOrder", order))
    assert outcome(codec.decode, data) == outcome(fastavro_decode, codec, bytes(data))


def test_the_fast_path_reads_the_hot_messages(codec):
    """Not a fallback in disguise: a well-formed message of each hot type is read by the generated reader."""
    rng = random.Random(3)
    for name in sorted(HOT_READ):
        schema = codec.catalog.get(name)
        gen = Records(rng, schema.parsed.get("__named_schemas", {}))
        data = fastavro_bytes(schema, gen.of(schema.parsed))
        assert codec._read_fast(schema, data) is not None, name

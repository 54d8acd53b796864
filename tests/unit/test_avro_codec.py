"""The registry-less Avro wire format: what every consumer of every topic relies on."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

from streams.core.avro_codec import MAGIC, AvroCodec, DecodeError, SchemaCatalog, SCHEMA_DIR

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
LINE = {
    "line_no": 1, "ndc": "00406-0512-01", "product_name": "OXYCODONE HCL 10MG TAB", "strength": "10 MG",
    "package_quantity": 100, "packages": 3, "dosage_units": 300, "schedule": "2",
    "drug_family": "OXYCODONE", "base_weight_g": 2.69, "mme": 4035.0,
}
REASON = {
    "detector": "size", "dimension": "size", "drug_family": "OXYCODONE", "value": 3000.0,
    "baseline": 300.0, "threshold": 1200.0, "window": "EW mean", "fired": True, "explanation": "x",
}


def verdict(**kw):
    v = {
        "order_id": "o-1", "order_number": "26X000001", "purchaser_dea": "BE8821844",
        "verdict": "HOLD", "decided_at": NOW, "received_at": NOW, "signed_at": NOW,
        "model_version": "t", "reasons": [REASON], "lines": [LINE], "total_dosage_units": 300,
    }
    v.update(kw)
    return v


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


def test_every_message_type_has_a_schema(codec):
    names = set(codec.catalog.current)
    for required in ("csos.orders.ReceivedOrder", "csos.orders.VerifiedOrder", "csos.orders.Rejection",
                     "som.Verdict", "som.Hold", "som.Release", "audit.AuditEvent", "dlq.DeadLetter"):
        assert required in names


def test_round_trip_and_header(codec):
    data = codec.encode("som.Verdict", verdict())
    assert data[:2] == MAGIC
    schema = codec.catalog.get("som.Verdict")
    # The header is the CRC-64-AVRO fingerprint of the expanded schema's canonical form.
    expected = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema.parsed), "CRC-64-AVRO"))
    assert data[2:10] == expected
    name, rec = codec.decode(data)
    assert name == "som.Verdict"
    assert rec["reasons"][0]["threshold"] == 1200.0
    assert rec["lines"][0]["ndc"] == "00406-0512-01"
    assert rec["decided_at"] == NOW


def test_nested_change_changes_the_outer_fingerprint(tmp_path):
    for src in SCHEMA_DIR.glob("*.avsc"):
        (tmp_path / src.name).write_text(src.read_text())
    line = json.loads((tmp_path / "order_line.avsc").read_text())
    line["fields"].append({"name": "lot", "type": ["null", "string"], "default": None})
    (tmp_path / "order_line.avsc").write_text(json.dumps(line))
    changed = SchemaCatalog(tmp_path)
    original = SchemaCatalog()
    assert changed.get("som.Verdict").fingerprint != original.get("som.Verdict").fingerprint
    assert changed.get("som.Hold").fingerprint != original.get("som.Hold").fingerprint  # carries the order
    assert changed.get("som.Decision").fingerprint == original.get("som.Decision").fingerprint


def test_newer_reader_reads_older_records(codec):
    old = next(s for s in codec.catalog.by_fingerprint.values() if s.source.name == "som.Verdict.v1.avsc")
    assert old.fingerprint != codec.catalog.get("som.Verdict").fingerprint
    record = verdict()
    del record["total_dosage_units"]
    data = codec.encode_with(old, record)
    name, rec = codec.decode(data)
    assert name == "som.Verdict"
    assert rec["total_dosage_units"] == 0  # the reader's default fills the field the writer lacked
    assert rec["order_id"] == "o-1"


@pytest.mark.parametrize("payload, message", [
    (b"", "too short"),
    (b"not avro at all, just text", "marker"),
    (MAGIC + b"\x00" * 8 + b"\x02", "unknown writer schema"),
])
def test_garbage_is_refused_with_a_reason(codec, payload, message):
    with pytest.raises(DecodeError, match=message):
        codec.decode(payload)


def test_truncated_and_padded_bodies_are_refused(codec):
    data = codec.encode("som.Verdict", verdict())
    with pytest.raises(DecodeError, match="corrupt"):
        codec.decode(data[:-5])
    with pytest.raises(DecodeError, match="trailing"):
        codec.decode(data + b"\x00\x00")


def test_wrong_message_type_is_refused(codec):
    data = codec.encode("som.Verdict", verdict())
    with pytest.raises(DecodeError, match="expected csos.orders.ReceivedOrder"):
        codec.decode(data, expect="csos.orders.ReceivedOrder")

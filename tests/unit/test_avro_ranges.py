"""The decode's range check refuses exactly what fastavro's whole-record validator refused, on every schema.

``check_ranges`` no longer runs fastavro's validator (it cost 2-3x the decode); it visits only the
``int`` and ``long`` values. This walks every current and historical schema: a record made from the
schema passes both, and each of its ``int``/``long`` values set one past its range fails both, naming the
field.
"""
from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

import pytest
from fastavro.validation import ValidationError, validate

from streams.core.avro_codec import DecodeError, check_ranges, default_codec

CODEC = default_codec()
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
TOO_BIG = {"int": 2 ** 31, "long": 2 ** 63}


def sample(node: Any, named: dict[str, Any], paths: list[tuple[list[Any], str]], at: list[Any]) -> Any:
    """A valid datum of ``node``; every ``int``/``long`` value's path (keys from the root) goes to ``paths``."""
    if isinstance(node, str):
        if node in named:
            return sample(named[node], named, paths, at)
        if node in TOO_BIG:
            paths.append((list(at), node))  # the field named is the last string key that is not a map's "k"
            return 1
        return {"null": None, "boolean": True, "float": 1.0, "double": 1.0, "bytes": b"x", "string": "x"}[node]
    if isinstance(node, list):  # a union: its last branch (the non-null one in every schema here)
        return sample(node[-1], named, paths, at)
    kind = node["type"]
    logical = node.get("logicalType")
    if logical == "date":
        return date(2026, 3, 2)
    if logical and logical.startswith("timestamp"):
        return NOW
    if kind in ("record", "error"):
        named[node["name"]] = node
        return {f["name"]: sample(f["type"], named, paths, at + [f["name"]]) for f in node["fields"]}
    if kind == "array":
        return [sample(node["items"], named, paths, at + [0])]
    if kind == "map":
        return {"k": sample(node["values"], named, paths, at + [("k",)])}
    if kind == "enum":
        named[node["name"]] = node
        return node["symbols"][0]
    if kind == "fixed":
        named[node["name"]] = node
        return b"\0" * node["size"]
    return sample(kind, named, paths, at)


def schemas() -> list[Any]:
    seen, out = set(), []
    for schema in [*CODEC.catalog.current.values(), *CODEC.catalog.by_fingerprint.values()]:
        if schema.fingerprint not in seen:
            seen.add(schema.fingerprint)
            out.append(pytest.param(schema, id=f"{schema.fullname}-{schema.fingerprint.hex()[:6]}"))
    return out


def fastavro_accepts(record: Any, parsed: Any) -> bool:
    try:
        return validate(record, parsed, raise_errors=True)
    except ValidationError:
        return False


@pytest.mark.parametrize("schema", schemas())
def test_every_int_and_long_out_of_range_is_refused_as_fastavro_refused_it(schema: Any) -> None:
    paths: list[tuple[list[Any], str]] = []
    record = sample(schema.parsed, {}, paths, [])
    assert fastavro_accepts(record, schema.parsed)
    check_ranges(schema.fullname, record, schema.parsed)  # a valid record passes
    for path, avro_type in paths:
        for bad in (TOO_BIG[avro_type], -TOO_BIG[avro_type] - 1):
            holder = record
            keys = [k[0] if isinstance(k, tuple) else k for k in path]
            field = next(k for k in reversed(path) if isinstance(k, str))
            for key in keys[:-1]:
                holder = holder[key]
            good, holder[keys[-1]] = holder[keys[-1]], bad
            assert not fastavro_accepts(record, schema.parsed)
            with pytest.raises(DecodeError, match=rf"out of range.*\.{field} = {bad} \(expected {avro_type}\)"):
                check_ranges(schema.fullname, record, schema.parsed)
            holder[keys[-1]] = TOO_BIG[avro_type] - 1  # the largest value it holds passes
            check_ranges(schema.fullname, record, schema.parsed)
            holder[keys[-1]] = good

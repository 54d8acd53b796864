"""Avro on every topic, in single-object encoding, with no schema registry.

Wire format (Avro 1.8+ specification, "Single object encoding"):

    0xC3 0x01 | 8-byte little-endian CRC-64-AVRO fingerprint of the writer
    schema's Parsing Canonical Form | Avro binary body

A consumer looks the fingerprint up among the schemas it ships with (the
current ones in ``schemas/avro/`` and every earlier version kept in
``schemas/avro/history/``) and resolves the writer schema to its own reader
schema, so a newer consumer reads records written by an older producer. No
registry service has to be running for any message to be readable, which
matters for an audit trail that must stay readable for years.

Schemas in ``schemas/avro/`` may reference named types defined in sibling
files; they are expanded into self-contained schemas before fingerprinting so
that a change to a nested record changes the fingerprint of every schema that
embeds it.
"""
from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form
from streams.core.avro_read import Reader, compile_reader
from streams.core.avro_fast import (Scanner, SplicingWriter, Writer, compile_field_scanners, compile_writer, field_spans,
                                    type_key)
from streams.core.errors import CsosError

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas" / "avro"

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


class DecodeError(CsosError, ValueError):
    """A message is not a readable Avro single-object record."""
    code = "AVRO_DECODE"


#: A value already encoded: (``streams.core.avro_fast.type_key`` of the type it was written as, its bytes).
Encoded = tuple[str, bytes]


def schema_key(schema: "Schema") -> str:
    """The ``type_key`` of a whole schema (a record spliced into a field of another record)."""
    key = _SCHEMA_KEYS.get(schema.fingerprint)
    if key is None:
        key = _SCHEMA_KEYS[schema.fingerprint] = type_key(schema.parsed)
    return key


_SCHEMA_KEYS: dict[bytes, str] = {}


@dataclass(frozen=True)
class Schema:
    fullname: str
    fingerprint: bytes  # 8 bytes, little-endian CRC-64-AVRO
    parsed: Any  # fastavro parsed schema
    source: Path


def _fullname(schema: dict[str, Any], namespace: str | None) -> str:
    name = schema["name"]
    if "." in name:
        return name
    ns = schema.get("namespace", namespace)
    return f"{ns}.{name}" if ns else name


def _expand(node: Any, defs: dict[str, dict[str, Any]], seen: set[str], namespace: str | None) -> Any:
    """Inline named-type references so each schema stands alone."""
    if isinstance(node, str):
        if node in _PRIMITIVES:
            return node
        full = node if "." in node else (f"{namespace}.{node}" if namespace else node)
        if full in seen:
            return full
        if full not in defs:
            raise ValueError(f"unknown Avro type {node!r}")
        return _expand(defs[full], defs, seen, namespace)
    if isinstance(node, list):
        return [_expand(n, defs, seen, namespace) for n in node]
    if isinstance(node, dict):
        t = node.get("type")
        if t in ("record", "error", "enum", "fixed"):
            full = _fullname(node, namespace)
            if full in seen:
                return full
            seen.add(full)
            out = dict(node)
            out["name"] = full
            out.pop("namespace", None)
            ns = full.rsplit(".", 1)[0] if "." in full else None
            if t in ("record", "error"):
                out["fields"] = [dict(f, type=_expand(f["type"], defs, seen, ns)) for f in node["fields"]]
            return out
        if t == "array":
            return dict(node, items=_expand(node["items"], defs, seen, namespace))
        if t == "map":
            return dict(node, values=_expand(node["values"], defs, seen, namespace))
        if isinstance(t, (dict, list)) or (isinstance(t, str) and t not in _PRIMITIVES):
            return dict(node, type=_expand(t, defs, seen, namespace))
        return node
    raise ValueError(f"not an Avro schema node: {node!r}")


def _load_dir(directory: Path) -> list[tuple[dict[str, Any], Path]]:
    raw = []
    for path in sorted(directory.glob("*.avsc")):
        with open(path, encoding="utf-8") as fh:
            raw.append((json.load(fh), path))
    return raw


def _make_schema(expanded: dict[str, Any], source: Path) -> Schema:
    parsed = parse_schema(copy.deepcopy(expanded), named_schemas={})
    canonical = to_parsing_canonical_form(parsed)
    # fastavro gives the fingerprint bytes in little-endian order, as Java does and the wire wants.
    fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    return Schema(expanded["name"], fp, parsed, source)


class SchemaCatalog:
    """Every schema this build can read, by full name (current) and by fingerprint (all)."""

    def __init__(self, directory: Path = SCHEMA_DIR) -> None:
        current = _load_dir(directory)
        defs = {_fullname(s, None): s for s, _ in current}
        self.current: dict[str, Schema] = {}
        self.by_fingerprint: dict[bytes, Schema] = {}
        for name, schema in defs.items():
            src = next(p for s, p in current if _fullname(s, None) == name)
            compiled = _make_schema(_expand(schema, defs, set(), None), src)
            self.current[name] = compiled
            self.by_fingerprint[compiled.fingerprint] = compiled
        history = directory / "history"
        if history.is_dir():
            for schema, src in _load_dir(history):
                # History files are stored already expanded (self-contained).
                compiled = _make_schema(_expand(schema, {}, set(), None), src)
                self.by_fingerprint.setdefault(compiled.fingerprint, compiled)

    def get(self, fullname: str) -> Schema:
        try:
            return self.current[fullname]
        except KeyError:
            raise KeyError(f"no schema named {fullname!r} in {SCHEMA_DIR}") from None

    def expanded_json(self, fullname: str) -> dict[str, Any]:
        """The self-contained form of a current schema (what goes into history/ when it changes)."""
        schema = self.get(fullname)
        with open(schema.source, encoding="utf-8") as fh:
            raw = json.load(fh)
        defs = {_fullname(s, None): s for s, _ in _load_dir(schema.source.parent)}
        return _expand(raw, defs, set(), None)


class AvroCodec:
    """Encode and decode single-object Avro messages against a schema catalog."""

    def __init__(self, catalog: SchemaCatalog | None = None) -> None:
        self.catalog = catalog or SchemaCatalog()
        self._writers: dict[bytes, Writer | None] = {}
        self._splicers: dict[bytes, SplicingWriter | None] = {}
        self._scans: dict[bytes, tuple[list[tuple[str, str]], list[Scanner], bool] | None] = {}
        self._readers: dict[bytes, Reader | None] = {}

    def encode(self, fullname: str, record: dict[str, Any], *, spliced: dict[str, Encoded] | None = None) -> bytes:
        """The message of ``record`` as the current ``fullname``.

        ``spliced``: fields whose encoding the caller already has (``encoded_fields`` of the message the
        value was read from; the record still holds every value). They are copied instead of encoded again
        when their type is the field's, which gives the same bytes; otherwise the field is encoded.
        """
        schema = self.catalog.get(fullname)
        if spliced:
            splicer = self._splicer(schema)
            if splicer is not None:
                parts = [MAGIC, schema.fingerprint]
                try:
                    splicer(record, parts, spliced)
                    return b"".join(parts)
                except Exception:  # noqa: BLE001 - a value the fast writer does not take: fastavro decides
                    pass
        return self.encode_with(schema, record)

    def encoded_fields(self, data: bytes, fullname: str, *,
                       last_items: int | None = None) -> tuple[Encoded, dict[str, Encoded]] | None:
        """(the whole record, each field) of a message of ``fullname``, as encodings ``encode`` can splice.

        The caller must have decoded ``data`` without error. None unless the
        message was written with the current schema and its body is what
        this codec writes for the values it holds: minimal varints, union
        indexes, booleans 0 or 1, arrays and maps in one block
        (``streams.core.avro_fast.field_spans``). Only then are its bytes
        those a new encoding of the decoded values gives. ``last_items``: the
        number of items the decoded record's last field holds when it is an
        array or map (a verified order's lines); that field is then checked
        by its blocks only, as scanning its items would cost as much as
        encoding them.
        """
        schema = self.catalog.current.get(fullname)
        if schema is None or bytes(data[2:HEADER_LEN]) != schema.fingerprint:
            return None
        scanners = self._scanners(schema)
        if scanners is None:
            return None
        names, scan, blocks_last = scanners
        bounds = field_spans(scan, data, HEADER_LEN, blocks_last=last_items if blocks_last else None)
        if bounds is None:
            return None
        fields = {name: (key, data[bounds[i]:bounds[i + 1]]) for i, (name, key) in enumerate(names)}
        return (schema_key(schema), data[HEADER_LEN:]), fields

    def encode_with(self, schema: Schema, record: dict[str, Any]) -> bytes:
        """Encode with an explicit (e.g. historical) writer schema.

        The schema's compiled writer (``streams.core.avro_fast``) writes the
        record when it takes every value as it is; otherwise fastavro does,
        so the bytes (and any error) are always fastavro's.
        """
        writer = self._writer(schema)
        if writer is not None:
            parts = [MAGIC, schema.fingerprint]
            try:
                writer(record, parts)
                return b"".join(parts)
            except Exception:  # noqa: BLE001 - a value the fast writer does not take: fastavro decides
                pass
        fo = io.BytesIO()
        fo.write(MAGIC)
        fo.write(schema.fingerprint)
        fastavro.schemaless_writer(fo, schema.parsed, record)
        return fo.getvalue()

    def _splicer(self, schema: Schema) -> SplicingWriter | None:
        try:
            return self._splicers[schema.fingerprint]
        except KeyError:
            writer = self._writer(schema)
            splicer = self._splicers[schema.fingerprint] = None if writer is None else SplicingWriter(schema.parsed,
                                                                                                         writer)
            return splicer

    def _scanners(self, schema: Schema) -> tuple[list[tuple[str, str]], list[Scanner], bool] | None:
        """(each field's name and type key, each field's scanner, whether the last field is an array or map)."""
        try:
            return self._scans[schema.fingerprint]
        except KeyError:
            scanners = compile_field_scanners(schema.parsed)
            fields = schema.parsed["fields"]
            last = fields[-1]["type"] if fields else None
            found = self._scans[schema.fingerprint] = None if scanners is None else (
                [(f["name"], type_key(f["type"])) for f in fields], scanners,
                isinstance(last, dict) and last.get("type") in ("array", "map"))
            return found

    def _writer(self, schema: Schema) -> Writer | None:
        """The compiled writer of ``schema`` (made at its first use; None if it has a part fastavro must write)."""
        try:
            return self._writers[schema.fingerprint]
        except KeyError:
            writer = self._writers[schema.fingerprint] = compile_writer(schema.parsed)
            return writer

    def _read_fast(self, schema: Schema, data: bytes) -> dict[str, Any] | None:
        """The record the schema's generated reader (``streams.core.avro_read``) reads from ``data``, when it
        reads the whole body; else None, and fastavro reads it (its values, or its error)."""
        try:
            read = self._readers[schema.fingerprint]
        except KeyError:
            read = self._readers[schema.fingerprint] = compile_reader(schema.parsed)
        if read is None:
            return None
        body = data if type(data) is bytes else bytes(data)
        try:
            record, end = read(body, HEADER_LEN)
        except Exception:  # noqa: BLE001 - anything odd: fastavro decides
            return None
        return record if end == len(body) and type(record) is dict else None

    def writer_of(self, data: bytes) -> Schema:
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < HEADER_LEN:
            raise DecodeError("too short for an Avro single-object message")
        if bytes(data[:2]) != MAGIC:
            raise DecodeError("missing the Avro single-object marker C3 01")
        fp = bytes(data[2:HEADER_LEN])
        schema = self.catalog.by_fingerprint.get(fp)
        if schema is None:
            raise DecodeError(f"unknown writer schema fingerprint {fp.hex()}")
        return schema

    def decode(self, data: bytes, expect: str | None = None, *, range_check: bool = True) -> tuple[str, dict[str, Any]]:
        """Return (schema full name, record) read with the current reader schema.

        ``expect`` names the record type the caller accepts; any other type is
        a ``DecodeError`` (a verdict on the orders topic is as bad as garbage).
        ``range_check=False`` skips the range check of a record fastavro had to
        read (the generated reader refuses such values itself and leaves them to
        fastavro): for a caller that checks every value it keeps, as the sink
        checks each against its column's type.
        """
        writer = self.writer_of(data)
        if expect is not None and writer.fullname != expect:
            raise DecodeError(f"expected {expect}, got {writer.fullname}")
        reader = self.catalog.current.get(writer.fullname)
        if reader is None or reader.fingerprint == writer.fingerprint:
            record = self._read_fast(writer, data)
            if record is not None:
                return writer.fullname, record
        try:
            fo = io.BytesIO(data)
            fo.seek(HEADER_LEN)
            if reader is None or reader.fingerprint == writer.fingerprint:
                record = fastavro.schemaless_reader(fo, writer.parsed, None)
            else:
                record = fastavro.schemaless_reader(fo, writer.parsed, reader.parsed)
            if fo.tell() != len(data):
                raise DecodeError(f"{len(data) - fo.tell()} trailing bytes after the record")
        except DecodeError:
            raise
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise DecodeError(f"corrupt {writer.fullname} body: {exc.__class__.__name__}: {exc}") from None
        if range_check:
            check_ranges(writer.fullname, record, (reader or writer).parsed)
        return writer.fullname, record


#: The values an Avro ``int`` and ``long`` can hold (the specification's 32- and 64-bit signed ranges).
_RANGES = {"int": (-2 ** 31, 2 ** 31 - 1), "long": (-2 ** 63, 2 ** 63 - 1)}
#: A range check: (value, where) -> None, raising ``_OutOfRange`` at the first value its type cannot hold.
Check = Callable[[Any, str], None]


class _OutOfRange(Exception):
    def __init__(self, where: str, value: Any, avro_type: str) -> None:
        super().__init__(f"{where} = {repr(value)[:80]} (expected {avro_type})")


def check_ranges(fullname: str, record: dict[str, Any], schema: Any) -> None:
    """Raise ``DecodeError`` unless every value fits its Avro type (``int`` 32-bit, ``long`` 64-bit signed).

    Why: fastavro's reader accepts any zig-zag varint, so a crafted body carries
    e.g. 2^40 in an ``int`` field; nothing downstream expects that, and the
    ClickHouse sink could never insert it. Every other type the reader returns
    is already what its schema says (strings, enums, records, ...), so only the
    ``int`` and ``long`` values (logical types excepted: the reader converted
    them, or failed) are checked, by a function made once per schema that
    visits only the parts of a record that can hold one. (fastavro's whole-record
    validator did the same check at 2-3x the cost of the decode itself.)
    """
    check = _checker_of(schema)
    if check is None:
        return
    try:
        check(record, "")
    except _OutOfRange as exc:
        raise DecodeError(f"{fullname} value out of range for its Avro type: {exc}") from None


_CHECKERS: dict[int, tuple[Any, Check | None]] = {}


def _checker_of(schema: Any) -> Check | None:
    """The range check of a parsed schema, made at its first use (kept with the schema, which lives as long)."""
    known = _CHECKERS.get(id(schema))
    if known is None or known[0] is not schema:
        known = _CHECKERS[id(schema)] = (schema, _RangeChecks().of(schema))
    return known[1]


class _RangeChecks:
    """Builds the range check of one parsed schema; named types are looked up as they were defined."""

    def __init__(self) -> None:
        self.named: dict[str, Check | None] = {}
        self.building: dict[str, list[Check | None]] = {}

    def of(self, node: Any) -> Check | None:
        """The check of ``node``, or None when no value under it can be an ``int`` or ``long``."""
        if isinstance(node, str):
            return self._primitive(node) if node in _PRIMITIVES else self._reference(node)
        if isinstance(node, list):
            return self._union(node)
        kind = node.get("type")
        if node.get("logicalType") is not None and kind in _RANGES:
            return None  # converted by the reader (a date, a timestamp): out of range fails there
        if kind in ("record", "error"):
            return self._record(node)
        if kind == "array":
            return self._many(self.of(node["items"]), list)
        if kind == "map":
            return self._many(self.of(node["values"]), dict)
        if kind in ("enum", "fixed"):
            self.named[node["name"]] = None  # later references by name
            return None
        return self.of(kind)

    @staticmethod
    def _primitive(name: str) -> Check | None:
        if name not in _RANGES:
            return None
        low, high = _RANGES[name]

        def check(value: Any, where: str) -> None:
            if isinstance(value, int) and not low <= value <= high:
                raise _OutOfRange(where or "record", value, name)
        return check

    def _reference(self, name: str) -> Check | None:
        if name in self.named:
            return self.named[name]
        cell = self.building.get(name)
        if cell is None:
            raise ValueError(f"unknown Avro type {name!r}")

        def check(value: Any, where: str) -> None:  # a recursive type: its check is known once it is built
            if cell[0] is not None:
                cell[0](value, where)
        return check

    def _record(self, node: dict[str, Any]) -> Check | None:
        name = node["name"]
        cell: list[Check | None] = [None]
        self.building[name] = cell
        fields = [(f["name"], check) for f in node["fields"] if (check := self.of(f["type"])) is not None]
        if not fields:
            self.named[name] = None
            return None

        def check(record: Any, where: str) -> None:
            if isinstance(record, dict):
                for field, check_field in fields:
                    check_field(record.get(field), f"{name}.{field}")
        self.named[name] = cell[0] = check
        return check

    @staticmethod
    def _many(item: Check | None, container: type) -> Check | None:
        if item is None:
            return None

        def check(values: Any, where: str) -> None:
            if isinstance(values, container):
                for value in (values.values() if container is dict else values):
                    item(value, where)
        return check

    def _union(self, branches: list[Any]) -> Check | None:
        """A union's value passes if one branch that could have given it accepts it (reader: the branch it read)."""
        checks = [check for check in (self.of(b) for b in branches) if check is not None]
        if not checks:
            return None
        if len(checks) == 1:
            return checks[0]

        def check(value: Any, where: str) -> None:
            first: _OutOfRange | None = None
            for one in checks:
                try:
                    one(value, where)
                    return
                except _OutOfRange as exc:
                    first = first or exc
            raise first  # type: ignore[misc]
        return check


_default: AvroCodec | None = None


def default_codec() -> AvroCodec:
    """A process-wide codec (the catalog is parsed once)."""
    global _default
    if _default is None:
        _default = AvroCodec()
    return _default


"""A generated Avro binary reader for our schemas: the values fastavro's reader gives, at a fraction of its cost.

Why: fastavro's ``schemaless_reader`` re-walks the parsed schema on every
call and converts values through generic dispatch, so a verified order of
seven lines cost ~90 us to read, and the range check after it
(``avro_codec.check_ranges``) another ~18 us. This module turns a parsed
schema, once, into Python source that reads the body straight from the
``bytes``: fields in order into locals, then one dict per record; arrays and
maps looped in place; one-byte varints inline.

It is deliberately narrow, like the writer in ``streams.core.avro_fast``:
it only reads bodies it can read exactly as fastavro does. Anything else (a
varint longer than ten bytes or past 64 bits, a negative length or block
count, a union or enum index out of range, a boolean byte other than 0 or 1,
an ``int`` outside 32 bits, invalid UTF-8, a truncated body, any error at
all) raises, and the caller reads the message with fastavro instead, so the
values, and the errors, are fastavro's. Logical types are converted by
fastavro's own ``LOGICAL_READERS``, so a timestamp is exactly fastavro's
datetime. The range check is part of the reading: an ``int`` outside 32 bits
falls back (and fastavro's path refuses it), and a ``long`` read here is
within 64 bits by construction.
"""
from __future__ import annotations

import struct
from typing import Any, Callable

from fastavro.read import LOGICAL_READERS

from streams.core.avro_fast import GeneratedSource, Unsupported, checked_identifier

#: A generated reader: (body, position of the value) -> (value, position after it); raises on anything odd.
Reader = Callable[[bytes, int], tuple[Any, int]]

_PRIMITIVES = frozenset(("null", "boolean", "int", "long", "float", "double", "bytes", "string"))


def _varint_tail(data: bytes, pos: int, b: int) -> tuple[int, int]:
    """(zig-zag value, position after it) of a varint whose first byte ``b`` (>= 0x80) was just read.

    Only up to ten bytes and values below 2**64, where fastavro's 64-bit
    arithmetic gives the same number; else ``Unsupported`` (fastavro decides).
    """
    z, shift = b & 0x7F, 7
    while True:
        b = data[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise Unsupported("varint longer than ten bytes")
    if z >= 1 << 64:
        raise Unsupported("varint past 64 bits")
    return z, pos


def _length_tail(data: bytes, pos: int, b: int) -> tuple[int, int]:
    """As ``_varint_tail``, for a length: ``Unsupported`` when it is negative."""
    z, pos = _varint_tail(data, pos, b)
    if z & 1:
        raise Unsupported("negative length")
    return z >> 1, pos


class _ReaderGen:
    """Generates the source of one schema's reader; each method reads a value into the local it is given."""

    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.src = GeneratedSource()
        self.inlining: list[str] = []
        self.functions: dict[str, str] = {}
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.count = 0

    def fresh(self) -> str:
        self.count += 1
        return f"r{self.count}"

    def function(self, name: str, node: Any) -> None:
        """``def name(data, pos)`` returning (the value of ``node`` read at ``pos``, the position after it)."""
        self.src.add(0, f"def {name}(data, pos):")
        target = self.fresh()
        self.value(node, target, 1)
        self.src.add(1, f"return {target}, pos")

    def finish(self) -> None:
        while self.pending:
            fname, node = self.pending.pop()
            self.src.add(0, f"def {fname}(data, pos):")
            target = self.fresh()
            self.inlining.append(node["name"])
            self._record(node, target, 1)
            self.inlining.pop()
            self.src.add(1, f"return {target}, pos")

    def value(self, node: Any, t: str, i: int) -> None:
        if isinstance(node, str):
            if node in _PRIMITIVES:
                return self._primitive(node, t, i)
            return self._reference(node, t, i)
        if isinstance(node, list):
            return self._union(node, t, i)
        kind = node["type"]
        logical = node.get("logicalType")
        convert = LOGICAL_READERS.get(f"{kind}-{logical}") if logical and isinstance(kind, str) else None
        if convert is not None:
            self.value(kind, t, i)
            self.src.add(i, f"{t} = {self.src.constant(convert)}({t}, {self.src.constant(node)}, None)")
            return None
        if kind in ("record", "error"):
            self.inlining.append(node["name"])
            self._record(node, t, i)
            self.inlining.pop()
            return None
        if kind == "array":
            return self._blocks(node["items"], None, t, i)
        if kind == "map":
            return self._blocks(node["values"], "string", t, i)
        if kind == "enum":
            symbols = self.src.constant(tuple(node["symbols"]))
            self._index(t, i)
            self.src.add(i, f"if {t} >= len({symbols}): raise Unsupported")
            self.src.add(i, f"{t} = {symbols}[{t}]")
            return None
        if kind == "fixed":
            size = node["size"]
            if type(size) is not int:
                raise Unsupported(f"fixed size {size!r}")
            self.src.add(i, f"{t} = data[pos:pos + {size}]")
            self.src.add(i, f"pos += {size}")
            return None
        return self.value(kind, t, i)

    def _reference(self, name: str, t: str, i: int) -> None:
        if name in self.inlining or name in self.functions:
            if name not in self.functions:
                self.functions[name] = f"R{len(self.functions)}"
                self.pending.append((self.functions[name], self.named[name]))
            self.src.add(i, f"{t}, pos = {self.functions[name]}(data, pos)")
            return None
        if name not in self.named:
            raise Unsupported(f"unknown named type {name}")
        return self.value(self.named[name], t, i)

    def _record(self, node: dict[str, Any], t: str, i: int) -> None:
        parts = []
        for field in node["fields"]:
            local = self.fresh()
            self.value(field["type"], local, i)
            parts.append(f"{checked_identifier(field['name'])!r}: {local}")
        self.src.add(i, f"{t} = {{{', '.join(parts)}}}")

    def _zigzag(self, t: str, i: int) -> None:
        """``t`` = the zig-zag value of the varint at ``pos`` (most are one byte: no call)."""
        self.src.add(i, f"{t} = data[pos]")
        self.src.add(i, "pos += 1")
        self.src.add(i, f"if {t} >= 128: {t}, pos = varint_tail(data, pos, {t})")

    def _index(self, t: str, i: int) -> None:
        """``t`` = a length, a count or an index at ``pos`` (non-negative, else fastavro decides)."""
        self._zigzag(t, i)
        self.src.add(i, f"if {t} & 1: raise Unsupported")
        self.src.add(i, f"{t} >>= 1")

    def _primitive(self, kind: str, t: str, i: int) -> None:
        add = self.src.add
        if kind in ("long", "int"):
            add(i, f"{t} = data[pos]")
            add(i, "pos += 1")
            add(i, f"if {t} < 128: {t} = UNZIG[{t}]")
            add(i, "else:")
            add(i + 1, "b = data[pos]")  # two bytes inline (quantities, units), longer ones by a call
            add(i + 1, f"if b < 128: {t} = ({t} & 127) | (b << 7); pos += 1")
            add(i + 1, f"else: {t}, pos = varint_tail(data, pos, {t})")
            add(i + 1, f"{t} = ({t} >> 1) ^ -({t} & 1)")
            if kind == "int":
                add(i + 1, f"if not -2147483648 <= {t} <= 2147483647: raise Unsupported")
        elif kind in ("string", "bytes"):
            # ``LENGTH`` maps a one-byte varint to its length, and an odd one (a negative length) to a length
            # past any body; a length past the end reads short and leaves ``pos`` past the end: refused.
            add(i, "n = data[pos]")
            add(i, "pos += 1")
            add(i, "if n < 128: n = LENGTH[n]")
            add(i, "else: n, pos = length_tail(data, pos, n)")
            add(i, f"{t} = data[pos:pos + n]{'.decode()' if kind == 'string' else ''}")
            add(i, "pos += n")
        elif kind == "double":
            add(i, f"{t} = unpack_double(data, pos)[0]")
            add(i, "pos += 8")
        elif kind == "float":
            add(i, f"{t} = unpack_float(data, pos)[0]")
            add(i, "pos += 4")
        elif kind == "boolean":
            add(i, "b = data[pos]")
            add(i, "pos += 1")
            add(i, f"if b == 1: {t} = True")
            add(i, f"elif b == 0: {t} = False")
            add(i, "else: raise Unsupported")
        else:
            add(i, f"{t} = None")

    def _blocks(self, items: Any, key: str | None, t: str, i: int) -> None:
        """An array (``key`` None) or a map: blocks of items, each block's count first, until a count of 0."""
        add = self.src.add
        add(i, f"{t} = {'{}' if key else '[]'}")
        add(i, "while True:")
        count = self.fresh()
        self._index(count, i + 1)  # a negative count (a block with its size) is left to fastavro
        add(i + 1, f"if not {count}: break")
        add(i + 1, f"if {count} > len(data) - pos: raise Unsupported")  # every item takes a byte at least
        add(i + 1, f"for _ in range({count}):")
        if key:
            k = self.fresh()
            self._primitive("string", k, i + 2)
        item = self.fresh()
        self.value(items, item, i + 2)
        add(i + 2, f"{t}[{k}] = {item}" if key else f"{t}.append({item})")

    def _union(self, branches: list[Any], t: str, i: int) -> None:
        self._index(t, i)
        for n, branch in enumerate(branches):
            self.src.add(i, f"{'if' if n == 0 else 'elif'} {t} == {n}:")
            self.value(branch, t, i + 1)
        self.src.add(i, "else: raise Unsupported")


_GLOBALS: dict[str, Any] = {
    "Unsupported": Unsupported, "varint_tail": _varint_tail, "UNZIG": tuple((z >> 1) ^ -(z & 1) for z in range(128)),
    "LENGTH": tuple(1 << 62 if z & 1 else z >> 1 for z in range(128)), "length_tail": _length_tail,
    "unpack_double": struct.Struct("<d").unpack_from, "unpack_float": struct.Struct("<f").unpack_from,
}


def compile_reader(parsed: Any) -> Reader | None:
    """The generated reader of a fastavro-parsed schema, or None when it has a part this module does not read."""
    try:
        gen = _ReaderGen(parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {})
        gen.function("read", parsed)
        gen.finish()
        namespace = gen.src.define(_GLOBALS, "<avro_read reader>")
    except (Unsupported, SyntaxError, RecursionError):
        return None
    reader: Reader = namespace["read"]
    return reader

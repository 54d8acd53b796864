"""A faster Avro binary writer for the records the hot path publishes, byte for byte what fastavro writes.

Why: fastavro's writer dispatches on the schema for every value it writes
(about 1.5 us a field here), so a verdict with twenty findings cost ~275 us
and an audit event ~17 us, several times the work itself. This module turns
a parsed schema, once, into the Python source of one function
(``_WriterGen``) that appends the encoding of plain Python values to a list
of pieces, joined once by the caller: every record, array, map and union
inline (only a record type that contains itself is a function of its own),
varints from tables, arrays of doubles and of small ints in one call. The
source holds no schema text: field names are checked to be identifiers and
everything else (enum indexes, logical-type converters) is passed in as a
constant.

It is deliberately narrow: a writer handles only values whose Python type is
exactly the one the schema node expects (``str`` for a string, ``int`` for a
long, ``float`` or ``int`` for a double, ``dict`` for a record with every
field present, ``list`` for an array, ...). Anything else (a missing field
that fastavro would fill from its default, a tuple for an array, a naive
datetime, a value out of range, a union whose branch cannot be told by the
value's type alone) raises ``Unsupported``, and the caller encodes the whole
record with fastavro instead, so the bytes, and the errors, are fastavro's.
Logical types are converted by fastavro's own ``LOGICAL_WRITERS``, so a
timestamp gets exactly fastavro's milliseconds.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Callable

from fastavro.write import LOGICAL_WRITERS

from streams.core.errors import CsosError

#: A compiled writer: appends the encoding of ``value`` to the list ``buf``, in pieces (the caller joins them), or
#: raises ``Unsupported``. (Appending to a list costs about half of ``bytearray +=``, once per value.)
Writer = Callable[[Any, list[bytes]], None]

_pack_double = struct.Struct("<d").pack
_pack_float = struct.Struct("<f").pack


class Unsupported(CsosError):
    """A value (or schema) this writer does not take: encode the record with fastavro instead.

    Never reaches a user: the codec catches it and lets fastavro decide (its bytes or its error).
    """
    code = "AVRO_FAST_UNSUPPORTED"




#: The one Python type a union branch of each kind is chosen for (fastavro picks the same branch for it).
_BRANCH_TYPES: dict[str, type] = {
    "null": type(None), "string": str, "bytes": bytes, "long": int, "int": int, "double": float,
    "float": float, "boolean": bool, "record": dict, "error": dict, "map": dict, "array": list, "enum": str,
}
_PRIMITIVES = frozenset(("null", "boolean", "int", "long", "float", "double", "bytes", "string"))

# --- Varints from tables ---------------------------------------------------------------------------------------
#
# Why tables: a varint built byte by byte costs a Python loop per value; most values here (lengths, counts, days,
# units) have a zig-zag form below 2**14, and the rest (epoch milliseconds, offsets) below 2**42. ``_ZIG[z]`` is
# the minimal varint of a zig-zag value ``z`` < 2**14 (one or two bytes); ``_MID[z]`` the same 14 bits as two bytes
# that both carry the continuation bit, the low part of a longer varint. A value below 2**42 is then at most three
# lookups. The two tables hold 32,768 small bytes objects (~1 MB), made once per process.
_ZIG = tuple(bytes((z,)) if z < 0x80 else bytes(((z & 0x7F) | 0x80, z >> 7)) for z in range(1 << 14))
_MID = tuple(bytes(((z & 0x7F) | 0x80, (z >> 7) | 0x80)) for z in range(1 << 14))


def _zig_varint(z: int) -> bytes:
    """The varint of a zig-zag value ``z`` (0 <= z < 2**64): what the generated code calls past the tables."""
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def varint(n: int) -> bytes:
    """Avro's zig-zag varint of a long ``n`` (which must lie in the 64-bit signed range)."""
    z = (n << 1) ^ (n >> 63)
    return _ZIG[z] if z < 0x4000 else _zig_varint(z)


def _zig_long(z: int) -> bytes:
    """As ``_zig_varint``, for the zig-zag form of a long: ``Unsupported`` when it is 2**64 or more, which
    is exactly when the value lies outside the 64-bit signed range (then fastavro decides)."""
    if z >= 1 << 64:
        raise Unsupported
    return _zig_varint(z)


def _zig_int(z: int) -> bytes:
    """As ``_zig_long``, for an ``int``: the 32-bit signed range is exactly zig-zag values below 2**32."""
    if z >= 1 << 32:
        raise Unsupported
    return _zig_varint(z)


class VarintMemo(dict[int, bytes]):
    """The varints of the ints an array holds, remembered: ``map(memo.__getitem__, items)`` writes a whole array.

    Why: the state records are mostly short arrays of ints that recur from record to record (day and month
    numbers, units, counts), above the small-value table's range. A dict lookup per item, run by ``map``,
    costs a fraction of a Python loop writing each varint; a miss computes the varint once (``__missing__``).
    ``limit`` is the first zig-zag value the type cannot hold (2**32 for an ``int``, 2**64 for a ``long``):
    beyond it ``Unsupported`` is raised, as for a single value. The memo is emptied when it reaches
    ``max_entries`` (ever-new values such as epoch milliseconds would otherwise crowd it), so its size, and
    the cost of a value never seen again, stay bounded.
    """

    def __init__(self, limit: int, max_entries: int = 1 << 16) -> None:
        super().__init__()
        self.limit = limit
        self.max_entries = max_entries

    def __missing__(self, n: int) -> bytes:
        z = (n << 1) ^ (n >> 63)
        if z >= self.limit:
            raise Unsupported
        b = _ZIG[z] if z < 0x4000 else _zig_varint(z)
        if len(self) >= self.max_entries:
            self.clear()
        self[n] = b
        return b


def checked_identifier(name: Any) -> str:
    """A field name, checked to be a plain identifier before it is written into generated source (as a literal)."""
    if type(name) is not str or not name.isidentifier() or not name.isascii():
        raise Unsupported(f"field name {name!r} is not an identifier")
    return name


class GeneratedSource:
    """Python source being generated, and the constants it refers to (passed in, never written as text).

    Shared by the writers here and the readers of ``streams.core.avro_read``, so that generated code is
    compiled and run in one place (:meth:`define`).
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {}

    def add(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def constant(self, value: Any) -> str:
        """The name under which the generated code sees ``value``."""
        name = f"K{len(self.constants)}"
        self.constants[name] = value
        return name

    def define(self, globals_: dict[str, Any], filename: str) -> dict[str, Any]:
        """Run the source (its names checked as it was written; data only ever as constants): its namespace."""
        namespace = dict(globals_, **self.constants)
        exec(compile("\n".join(self.lines), filename, "exec"), namespace)  # noqa: S102 - see the class docstring
        return namespace


class _WriterGen:
    """Generates the Python source of one schema's writer: every record, array, map and union inline.

    Why generated rather than a tree of closures: on this hot path a Python
    call per value costs about what writing it does, and a varint written
    byte by byte several times that. The generated code writes a record's
    fields one after another into ``buf``, loops over arrays and maps in
    place, and takes varints from tables (``_ZIG``, ``_MID``). Only a record
    type that contains itself gets a function of its own (it is called where
    it recurs). The value checks are those of fastavro's types, kept narrow:
    anything else raises ``Unsupported`` (or a ``KeyError`` for a missing
    field) and the caller lets fastavro encode the whole record.
    """

    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.src = GeneratedSource()
        self.inlining: list[str] = []      # records whose code is being written (a reference back recurses)
        self.functions: dict[str, str] = {}  # record name -> its function (records that recur)
        self.pending: list[tuple[str, dict[str, Any]]] = []

    def function(self, name: str, node: Any) -> None:
        """``def name(v0, buf)``: writes the value ``v0`` of schema ``node`` into ``buf``."""
        self.src.add(0, f"def {name}(v0, buf):")
        self.src.add(1, "ap = buf.append")
        self.value(node, 0, 1)

    def finish(self) -> None:
        """The functions of records that recur (each may find more)."""
        while self.pending:
            fname, node = self.pending.pop()
            self.src.add(0, f"def {fname}(v0, buf):")
            self.src.add(1, "ap = buf.append")
            self.inlining.append(node["name"])
            self._record(node, 0, 1)
            self.inlining.pop()

    # Each method below writes statements that encode the value in local ``v{d}`` at indentation ``i``.
    def value(self, node: Any, d: int, i: int) -> None:
        if isinstance(node, str):
            if node in _PRIMITIVES:
                return self._primitive(node, d, i)
            return self._reference(node, d, i)
        if isinstance(node, list):
            return self._union(node, d, i)
        kind = node["type"]
        logical = node.get("logicalType")
        prepare = LOGICAL_WRITERS.get(f"{kind}-{logical}") if logical and isinstance(kind, str) else None
        if prepare is not None:
            self.src.add(i, f"v{d} = {self.src.constant(prepare)}(v{d}, {self.src.constant(node)})")
            return self.value(kind, d, i)
        if kind in ("record", "error"):
            return self._named_record(node, d, i)
        if kind == "array":
            return self._array(node["items"], d, i)
        if kind == "map":
            return self._map(node["values"], d, i)
        if kind == "enum":
            return self._enum(node, d, i)
        if kind == "fixed":
            return self._fixed(node, d, i)
        return self.value(kind, d, i)

    def _reference(self, name: str, d: int, i: int) -> None:
        if name in self.inlining or name in self.functions:
            return self._call(name, d, i)
        if name not in self.named:
            raise Unsupported(f"unknown named type {name}")
        return self.value(self.named[name], d, i)

    def _call(self, name: str, d: int, i: int) -> None:
        if name not in self.functions:
            self.functions[name] = f"R{len(self.functions)}"
            self.pending.append((self.functions[name], self.named[name]))
        self.src.add(i, f"{self.functions[name]}(v{d}, buf)")

    def _named_record(self, node: dict[str, Any], d: int, i: int) -> None:
        self.inlining.append(node["name"])
        self._record(node, d, i)
        self.inlining.pop()

    def _record(self, node: dict[str, Any], d: int, i: int) -> None:
        add = self.src.add
        add(i, f"if type(v{d}) is not dict: raise Unsupported")
        for field in node["fields"]:
            add(i, f"v{d + 1} = v{d}[{checked_identifier(field['name'])!r}]")
            self.value(field["type"], d + 1, i)

    def _primitive(self, kind: str, d: int, i: int) -> None:
        add, v = self.src.add, f"v{d}"
        if kind == "string":
            add(i, f"if type({v}) is not str: raise Unsupported")
            add(i, f"b = {v}.encode()")
            self._length("b", i)
            add(i, "ap(b)")
        elif kind == "bytes":
            add(i, f"if type({v}) is not bytes: raise Unsupported")
            self._length(v, i)
            add(i, f"ap({v})")
        elif kind in ("long", "int"):
            add(i, f"if type({v}) is not int: raise Unsupported")
            add(i, f"z = ({v} << 1) ^ ({v} >> 63)")
            add(i, "if z < 16384: ap(ZIG[z])")
            add(i, "elif z < 268435456: ap(MID[z & 16383]); ap(ZIG[z >> 14])")
            if kind == "long":
                add(i, "elif z < 4398046511104: ap(MID[z & 16383]); ap(MID[z >> 14 & 16383]); ap(ZIG[z >> 28])")
                add(i, "else: ap(zig_long(z))")
            else:
                add(i, "else: ap(zig_int(z))")
        elif kind == "double":
            add(i, f"if type({v}) is not float and type({v}) is not int: raise Unsupported")
            add(i, f"ap(pack_double({v}))")
        elif kind == "float":
            add(i, f"if type({v}) is not float: raise Unsupported")
            add(i, f"ap(pack_float({v}))")
        elif kind == "boolean":
            add(i, f"if {v} is True: ap(b'\\x01')")
            add(i, f"elif {v} is False: ap(b'\\x00')")
            add(i, "else: raise Unsupported")
        else:  # null
            add(i, f"if {v} is not None: raise Unsupported")

    def _length(self, of: str, i: int) -> None:
        self.src.add(i, f"n = len({of})")
        self.src.add(i, "ap(LENGTH[n] if n < 8192 else zig_varint(n << 1))")

    def _array(self, items: Any, d: int, i: int) -> None:
        add, v = self.src.add, f"v{d}"
        add(i, f"if type({v}) is not list: raise Unsupported")
        add(i, f"if {v}:")
        self._length(v, i + 1)
        if self._kind(items) == "double" and not (isinstance(items, dict) and items.get("logicalType")):
            # All at once: struct packs a list of floats (and ints) as fastavro packs each.
            add(i + 1, f"if not FLOAT_OR_INT.issuperset(map(type, {v})): raise Unsupported")
            add(i + 1, f"ap(pack('<%dd' % len({v}), *{v}))")
        elif self._kind(items) in ("int", "long") and not (isinstance(items, dict) and items.get("logicalType")):
            # All at once, each item's varint from a memo of the type (VarintMemo); exactly ints, as one by one.
            add(i + 1, f"if not INT_ONLY.issuperset(map(type, {v})): raise Unsupported")
            add(i + 1, f"buf.extend(map({'LONG_AT' if self._kind(items) == 'long' else 'INT_AT'}, {v}))")
        else:
            add(i + 1, f"for v{d + 1} in {v}:")
            self.value(items, d + 1, i + 2)
        add(i, "ap(b'\\x00')")

    def _map(self, values: Any, d: int, i: int) -> None:
        add, v = self.src.add, f"v{d}"
        add(i, f"if type({v}) is not dict: raise Unsupported")
        add(i, f"if {v}:")
        self._length(v, i + 1)
        add(i + 1, f"for k, v{d + 1} in {v}.items():")
        add(i + 2, "if type(k) is not str: raise Unsupported")
        add(i + 2, "b = k.encode()")
        self._length("b", i + 2)
        add(i + 2, "ap(b)")
        self.value(values, d + 1, i + 2)
        add(i, "ap(b'\\x00')")

    def _enum(self, node: dict[str, Any], d: int, i: int) -> None:
        index = self.src.constant({s: varint(n) for n, s in enumerate(node["symbols"])})
        self.src.add(i, f"if type(v{d}) is not str or v{d} not in {index}: raise Unsupported")
        self.src.add(i, f"ap({index}[v{d}])")

    def _fixed(self, node: dict[str, Any], d: int, i: int) -> None:
        size = node["size"]
        if type(size) is not int:
            raise Unsupported(f"fixed size {size!r}")
        self.src.add(i, f"if type(v{d}) is not bytes or len(v{d}) != {size}: raise Unsupported")
        self.src.add(i, f"ap(v{d})")

    def _union(self, branches: list[Any], d: int, i: int) -> None:
        """A union whose branch each value's exact type names (else the schema is not compiled at all).

        An optional logical value (``["null", {"type": "long", "logicalType":
        "timestamp-millis"}]``, a case's deadlines, a registrant's expiry) is
        told apart by ``None`` alone: fastavro, too, takes any other value to
        the one other branch when that branch's conversion and type accept it,
        and fails otherwise (here: ``Unsupported``, so fastavro writes, or
        fails, itself).
        """
        logical = [n for n, b in enumerate(branches) if isinstance(b, dict) and b.get("logicalType")]
        if len(branches) == 2 and len(logical) == 1 and "null" in branches:
            other = logical[0]
            self.src.add(i, f"if v{d} is None: ap({varint(1 - other)!r})")
            self.src.add(i, "else:")
            self.src.add(i + 1, f"ap({varint(other)!r})")
            self.value(branches[other], d, i + 1)
            return
        seen: set[type] = set()
        first = True
        for n, branch in enumerate(branches):
            py = _BRANCH_TYPES.get(self._kind(branch))
            if py is None or py in seen or (isinstance(branch, dict) and branch.get("logicalType")):
                raise Unsupported(f"union {branches} is not told apart by value type")
            seen.add(py)
            test = f"v{d} is None" if py is type(None) else f"type(v{d}) is {py.__name__}"
            self.src.add(i, f"{'if' if first else 'elif'} {test}:")
            self.src.add(i + 1, f"ap({varint(n)!r})")
            self.value(branch, d, i + 1)
            first = False
        self.src.add(i, "else: raise Unsupported")

    def _kind(self, node: Any) -> str:
        if isinstance(node, str):
            return node if node in _PRIMITIVES else self._kind(self.named.get(node, {"type": "?"}))
        if isinstance(node, list):
            return "union"
        kind = node["type"]
        return kind if isinstance(kind, str) else self._kind(kind)


_WRITER_GLOBALS: dict[str, Any] = {
    "Unsupported": Unsupported, "ZIG": _ZIG, "MID": _MID, "zig_varint": _zig_varint, "zig_long": _zig_long,
    "zig_int": _zig_int, "pack_double": _pack_double, "pack_float": _pack_float, "pack": struct.pack,
    "FLOAT_OR_INT": frozenset((float, int)), "LENGTH": _ZIG[::2], "INT_ONLY": frozenset((int,)),
    "INT_AT": VarintMemo(1 << 32).__getitem__, "LONG_AT": VarintMemo(1 << 64).__getitem__,
    "join": b"".join,
}


def _generate_writer(parsed: Any) -> Writer:
    """The generated writer of a parsed schema; a record's also has ``fields``: (name, writer of that field)."""
    gen = _WriterGen(parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {})
    record = isinstance(parsed, dict) and parsed.get("type") in ("record", "error")
    gen.function("write", parsed)
    names: list[str] = []
    if record:
        for n, field in enumerate(parsed["fields"]):
            names.append(checked_identifier(field["name"]))
            gen.function(f"F{n}", field["type"])
    gen.finish()
    namespace = gen.src.define(_WRITER_GLOBALS, "<avro_fast writer>")
    write: Writer = namespace["write"]
    if record:
        write.fields = [(name, namespace[f"F{n}"]) for n, name in enumerate(names)]  # type: ignore[attr-defined]
    return write


class SplicingWriter:
    """Writes a record whose chosen fields are given already encoded (see ``field_spans``).

    A spliced field's bytes are written as they are, after the union branch
    index when the field is a union; they are taken only when the canonical
    form of the type they were written with is the field's type (or one of its
    union's branches), so they read back as the same value. Otherwise the field
    is written from the record, which always holds its value.
    """

    def __init__(self, parsed: dict[str, Any], record_writer: Writer) -> None:
        self.fields: list[tuple[str, Writer, dict[str, bytes]]] = []
        for field, (name, writer) in zip(parsed["fields"], record_writer.fields):  # type: ignore[attr-defined]
            kind = field["type"]
            branches = kind if isinstance(kind, list) else [kind]
            prefixes = {type_key(b): (varint(i) if isinstance(kind, list) else b"") for i, b in enumerate(branches)}
            self.fields.append((name, writer, prefixes))

    def __call__(self, record: dict[str, Any], buf: list[bytes], spliced: dict[str, tuple[str, bytes]]) -> None:
        if type(record) is not dict:
            raise Unsupported
        for name, writer, prefixes in self.fields:
            given = spliced.get(name)
            prefix = prefixes.get(given[0]) if given is not None else None
            if prefix is None:
                writer(record[name], buf)
            else:
                buf.append(prefix)
                buf.append(given[1])  # type: ignore[index]


#: The attributes that decide how a value is written and read (not docs, defaults or aliases).
_TYPE_KEYS = ("type", "name", "fields", "items", "values", "symbols", "size", "logicalType", "precision", "scale")


def type_key(node: Any) -> str:
    """A schema node's identity for splicing: its Parsing Canonical Form plus its logical types (which the
    canonical form drops, and which decide what value a reader makes of the bytes). A named type referred to
    by name is only its name: such a field is written from the record, never spliced."""
    def strip(n: Any) -> Any:
        if isinstance(n, list):
            return [strip(x) for x in n]
        if isinstance(n, dict):
            return {k: strip(v) for k, v in n.items() if k in _TYPE_KEYS}
        return n
    return json.dumps(strip(node), sort_keys=True, separators=(",", ":"))


def compile_writer(parsed: dict[str, Any]) -> Writer | None:
    """The writer of a fastavro-parsed schema, or None when the schema has a part this module does not write
    (or one nested deeper than Python compiles)."""
    try:
        return _generate_writer(parsed)
    except (Unsupported, SyntaxError, RecursionError):
        return None


# --- Reading where each field of an encoded record lies, to write those bytes again unchanged ---------------------
#
# Why: a hold embeds the verified order the monitor has just read, and a verdict and a release repeat its lines.
# Their bytes are already at hand in the message read, so they are copied instead of encoded again. Only a body
# that is exactly what the writer above (and fastavro) would write for the values it holds may be copied: every
# varint minimal, every array and map one block then the end marker, booleans 0 or 1. The scanners below check
# that while they skip; anything else (or a type they do not know) raises ``Unsupported`` and nothing is copied.
# (Strings are valid UTF-8 because the caller decoded the same bytes; doubles come back bit for bit.)

#: A compiled scanner: (body, position of a value) -> position after it, or raises ``Unsupported``.
Scanner = Callable[[bytes, int], int]


def _skip_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(the zig-zag value as written, position after it), only for a minimal varint of at most 64 bits."""
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    z, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = data[pos]
        z |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise Unsupported("varint longer than 64 bits")
    if b == 0 or z >= 1 << 64:
        raise Unsupported("overlong varint")
    return z, pos + 1


def _scan_long(data: bytes, pos: int) -> int:
    return _skip_varint(data, pos)[1]


def _scan_string(data: bytes, pos: int) -> int:
    z, pos = _skip_varint(data, pos)
    if z & 1:
        raise Unsupported("negative length")
    end = pos + (z >> 1)
    if end > len(data):
        raise Unsupported("truncated")
    return end


def _scan_boolean(data: bytes, pos: int) -> int:
    if data[pos] > 1:
        raise Unsupported("boolean byte other than 0 or 1")
    return pos + 1


def _fixed_size(size: int) -> Scanner:
    def scan(data: bytes, pos: int) -> int:
        if pos + size > len(data):
            raise Unsupported("truncated")
        return pos + size
    return scan


_PRIMITIVE_SCANNERS: dict[str, Scanner] = {
    "string": _scan_string, "bytes": _scan_string, "long": _scan_long, "int": _scan_long,
    "double": _fixed_size(8), "float": _fixed_size(4), "boolean": _scan_boolean, "null": lambda data, pos: pos,
}
#: Logical types whose values come back from the reader as they were written (a timestamp's milliseconds).
_ROUND_TRIPS = {"timestamp-millis"}


class _ScanCompiler:
    """Compiles the scanner of one parsed schema (``Unsupported`` for a part it does not know)."""

    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.done: dict[str, Scanner] = {}

    def of(self, node: Any) -> Scanner:
        if isinstance(node, str):
            if node in _PRIMITIVE_SCANNERS:
                return _PRIMITIVE_SCANNERS[node]
            if node in self.done:
                return self.done[node]
            if node not in self.named:
                raise Unsupported(f"unknown named type {node}")
            return self.of(self.named[node])
        if isinstance(node, list):
            return self._union([self.of(b) for b in node])
        kind, logical = node["type"], node.get("logicalType")
        if logical is not None and logical not in _ROUND_TRIPS:
            raise Unsupported(f"logical type {logical}")
        if kind in ("record", "error"):
            return self.record(node)[0]
        if kind == "array":
            return self._blocks([self.of(node["items"])])
        if kind == "map":
            return self._blocks([_scan_string, self.of(node["values"])])
        if kind == "enum":
            return self._index(len(node["symbols"]))
        if kind == "fixed":
            return _fixed_size(node["size"])
        return self.of(kind)

    def record(self, node: dict[str, Any]) -> tuple[Scanner, list[Scanner]]:
        """The record's scanner and its fields' scanners, in order."""
        fields: list[Scanner] = []

        def scan(data: bytes, pos: int) -> int:
            for field in fields:
                pos = field(data, pos)
            return pos
        self.done[node["name"]] = scan
        fields.extend(self.of(f["type"]) for f in node["fields"])
        return scan, fields

    @staticmethod
    def _blocks(parts: list[Scanner]) -> Scanner:
        def scan(data: bytes, pos: int) -> int:
            z, pos = _skip_varint(data, pos)
            if z == 0:
                return pos
            if z & 1:
                raise Unsupported("a block of negative count (with its size)")
            for _ in range(z >> 1):
                for part in parts:
                    pos = part(data, pos)
            if data[pos] != 0:
                raise Unsupported("more than one block")
            return pos + 1
        return scan

    @staticmethod
    def _index(count: int) -> Scanner:
        def scan(data: bytes, pos: int) -> int:
            z, pos = _skip_varint(data, pos)
            if z & 1 or z >> 1 >= count:
                raise Unsupported("index out of range")
            return pos
        return scan

    @staticmethod
    def _union(branches: list[Scanner]) -> Scanner:
        def scan(data: bytes, pos: int) -> int:
            z, pos = _skip_varint(data, pos)
            if z & 1 or z >> 1 >= len(branches):
                raise Unsupported("union index out of range")
            return branches[z >> 1](data, pos)
        return scan


def compile_field_scanners(parsed: dict[str, Any]) -> list[Scanner] | None:
    """The scanners of a parsed record schema's fields, in order, or None when a part of it cannot be scanned."""
    if not isinstance(parsed, dict) or parsed.get("type") not in ("record", "error"):
        return None
    try:
        return _ScanCompiler(parsed.get("__named_schemas", {})).record(parsed)[1]
    except Unsupported:
        return None


def field_spans(scanners: list[Scanner], data: bytes, start: int, *, blocks_last: int | None = None
                ) -> list[int] | None:
    """Where each field of the record encoded at ``data[start:]`` begins, and where the record ends, if the
    body is what this module would write for its values and nothing follows it; else None.

    ``blocks_last``: the record's last field is an array or a map of that
    many items and the caller has decoded ``data`` (so the body is well
    formed and ends there). That field is then not scanned item by item
    (which costs about what encoding it does): it runs to the end, and only
    its blocks are checked: all items in the first one, then the end marker.
    An overlong varint inside the items would go unseen: no Avro writer we
    know writes one, and the copy still reads as the same values.
    """
    bounds = [start]
    pos = start
    try:
        for scan in scanners[:-1] if blocks_last is not None else scanners:
            pos = scan(data, pos)
            bounds.append(pos)
        if blocks_last is not None:
            count = _skip_varint(data, pos)[0]
            if count != 2 * blocks_last or data[-1] != 0:  # one block of every item (zig-zag), then the end
                return None
            pos = len(data)
            bounds.append(pos)
    except (Unsupported, IndexError):
        return None
    return bounds if pos == len(data) else None

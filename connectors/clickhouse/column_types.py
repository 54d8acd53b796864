"""What each sink table's columns can hold, and which partition a row goes to, read from the DDL.

Why: ClickHouse refuses a whole insert block for one value its column cannot
hold (2^40 or -1 in a ``UInt32``, 70,000 in a ``UInt16``) and a block that spans
more partitions than ``max_partitions_per_insert_block`` (100 by default). A
sink that retried such a batch would stop the audit trail behind it forever.
So the sink checks each message's rows against the column types before it
inserts anything (a message that does not fit is dead-lettered with the column
and the value) and groups rows so that no insert spans too many partitions.

The column types and ``PARTITION BY`` expressions are parsed from
``schemas/clickhouse/*.sql`` (CREATE TABLE and ALTER TABLE ... ADD/MODIFY
COLUMN), so the DDL stays the one place they are written down.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from streams.core.config import REPO_ROOT
from streams.core.errors import CsosError

DDL_DIR = REPO_ROOT / "schemas" / "clickhouse"

#: Problem with one value, or None when the column can hold it.
Check = Callable[[Any], "str | None"]


class RowRejected(CsosError, ValueError):
    """A row has a value its ClickHouse column cannot hold: the message is dead-lettered, not inserted."""
    code = "ROW_REJECTED"

    def __init__(self, table: str, column: str, value: Any, problem: str) -> None:
        shown = repr(value)
        super().__init__(f"{table}.{column} = {shown[:80]}{'...' if len(shown) > 80 else ''}: {problem}")
        self.table, self.column, self.value = table, column, value


@dataclass(frozen=True)
class TableSpec:
    """One table as its DDL declares it: column types as written, and the partition expression if any."""

    name: str
    columns: dict[str, str]
    partition_by: str | None = None


# ------------------------------------------------------------------------------------------ parsing the DDL
_CREATE = re.compile(r"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([\w.`]+)\s*\(", re.I | re.S)
_ALTER = re.compile(r"^\s*ALTER\s+TABLE\s+([\w.`]+)\s+(.*)$", re.I | re.S)
_ADD = re.compile(r"^(?:ADD|MODIFY)\s+COLUMN\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?(\S+)\s+(.*)$", re.I | re.S)
_PARTITION = re.compile(r"\bPARTITION\s+BY\s+(.+?)(?=\s+(?:ORDER\s+BY|PRIMARY\s+KEY|SAMPLE\s+BY|TTL|SETTINGS)\b|$)",
                        re.I | re.S)
_NOT_COLUMNS = {"INDEX", "PROJECTION", "CONSTRAINT"}


def _top_level(text: str, start: int = 0) -> Iterator[tuple[int, str, int]]:
    """``(index, character, depth)`` of each character of ``text`` from ``start`` that is outside quotes.

    The one scanner both helpers below use: quoted text (single, double or back quotes) is skipped
    (a backslash escapes the quote), and ``depth`` is the parenthesis depth after the character.
    """
    depth, quote = 0, ""
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            if c == quote and text[i - 1] != "\\":
                quote = ""
            continue
        if c in "'\"`":
            quote = c
            continue
        depth += (c == "(") - (c == ")")
        yield i, c, depth


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at ``start`` (quotes respected)."""
    for i, c, depth in _top_level(text, start):
        if c == ")" and depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {text[start:start + 60]!r}")


def split_top(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside parentheses and quotes, pieces stripped."""
    pieces, start = [], 0
    for i, c, depth in _top_level(text):
        if c == sep and depth == 0:
            pieces.append(text[start:i].strip())
            start = i + 1
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def _leading_type(text: str) -> str:
    """The type at the start of a column definition's tail (``DateTime64(3, 'UTC') DEFAULT now64(3)``)."""
    m = re.match(r"\s*(\w+)\s*", text)
    if not m:
        raise ValueError(f"no column type in {text[:60]!r}")
    end = m.end()
    if end < len(text) and text[end] == "(":
        return text[m.start(1):_closing(text, end) + 1]
    return m.group(1)


def _column(definition: str) -> tuple[str, str] | None:
    """(name, type) of one column definition; None for an index, projection or constraint."""
    name, _, rest = definition.strip().partition(" ")
    if name.upper() in _NOT_COLUMNS:
        return None
    return name.strip("`"), _leading_type(rest)


def _statements(path: Path) -> list[str]:
    """The file's statements, split as ``apply_ddl`` splits them (whole-line ``--`` comments dropped)."""
    sql = "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("--"))
    return [s.strip() for s in sql.split(";") if s.strip()]


def parse_ddl(statements: list[str], tables: dict[str, TableSpec] | None = None) -> dict[str, TableSpec]:
    """Tables after applying ``statements`` in order (CREATE TABLE, ALTER TABLE ADD/MODIFY COLUMN)."""
    tables = dict(tables or {})
    for statement in statements:
        if m := _CREATE.match(statement):
            name = m.group(1).strip("`").rsplit(".", 1)[-1]
            close = _closing(statement, m.end() - 1)
            columns = dict(c for c in map(_column, split_top(statement[m.end():close])) if c)
            p = _PARTITION.search(statement[close + 1:])
            tables.setdefault(name, TableSpec(name, columns, p.group(1).strip() if p else None))
        elif m := _ALTER.match(statement):
            name = m.group(1).strip("`").rsplit(".", 1)[-1]
            if name not in tables:
                continue
            columns = dict(tables[name].columns)
            for action in split_top(m.group(2)):
                if a := _ADD.match(action):
                    columns[a.group(1).strip("`")] = _leading_type(a.group(2))
            tables[name] = TableSpec(name, columns, tables[name].partition_by)
    return tables


@lru_cache(maxsize=None)
def table_specs(ddl_dir: Path = DDL_DIR) -> dict[str, TableSpec]:
    """Every table of the DDL directory, files in the order ``apply_ddl`` applies them. Parsed once."""
    tables: dict[str, TableSpec] = {}
    for path in sorted(ddl_dir.glob("*.sql")):
        tables = parse_ddl(_statements(path), tables)
    return tables


# ------------------------------------------------------------------------------------------ value checks
def _split_type(type_: str) -> tuple[str, list[str]]:
    """``Nullable(DateTime64(3, 'UTC'))`` -> ("Nullable", ["DateTime64(3, 'UTC')"])."""
    type_ = type_.strip()
    paren = type_.find("(")
    if paren < 0:
        return type_, []
    return type_[:paren].strip(), split_top(type_[paren + 1:_closing(type_, paren)])


_INT = re.compile(r"^(U?)Int(8|16|32|64|128|256)$")
#: DateTime64's documented range; outside it ClickHouse stores a value its functions clamp or misread.
DATETIME64_MIN = datetime(1900, 1, 1, tzinfo=timezone.utc)
DATETIME64_MAX = datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
DATETIME_MIN = datetime(1970, 1, 1, tzinfo=timezone.utc)
DATETIME_MAX = datetime(2106, 2, 7, 6, 28, 15, tzinfo=timezone.utc)


def _int_check(type_: str, unsigned: bool, bits: int) -> Check:
    lo, hi = (0, 2 ** bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    def check(v: Any) -> str | None:
        if type(v) is int and lo <= v <= hi:  # the common case, first
            return None
        if not isinstance(v, int):
            return f"not an integer ({type_})"
        if not lo <= v <= hi:
            return f"out of range for {type_} ({lo}..{hi})"
        return None
    return check


def _float_check(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) else "not a number"


def _bool_check(v: Any) -> str | None:
    return None if isinstance(v, bool) or v in (0, 1) else "not a boolean"


def _string_check(v: Any) -> str | None:
    return None if isinstance(v, (str, bytes, bytearray)) else "not a string"


def _time_check(type_: str, lo: datetime, hi: datetime, precision: int) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is datetime and v.tzinfo is not None and lo <= v <= hi:  # the common case, first
            return None
        if isinstance(v, int) and not isinstance(v, bool):  # already in the column's units (the audit chain's ms)
            lo_units, hi_units = (int(x.timestamp() * 10 ** precision) for x in (lo, hi))
            return None if lo_units <= v <= hi_units else f"out of range for {type_}"
        if not isinstance(v, datetime):
            return f"not a timestamp ({type_})"
        aware = v if v.tzinfo is not None else v.replace(tzinfo=timezone.utc)
        if not lo <= aware <= hi:
            return f"out of range for {type_} ({lo:%Y-%m-%d}..{hi:%Y-%m-%d})"
        return None
    return check


def _sequence_check(inner: list[Check], repeat: bool) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, (list, tuple)):
            return "not an array" if repeat else "not a tuple"
        if not repeat and len(v) != len(inner):
            return f"a tuple of {len(v)} values, not {len(inner)}"
        for i, item in enumerate(v):
            problem = (inner[0] if repeat else inner[i])(item)
            if problem:
                return f"element {i}: {problem}"
        return None
    return check


def _accept(_v: Any) -> str | None:
    return None


@lru_cache(maxsize=None)
def check_for(type_: str) -> Check:
    """A check for one ClickHouse type. Types it does not know accept anything (the insert still checks)."""
    name, args = _split_type(type_)
    if name == "Nullable":
        inner = check_for(args[0])
        return lambda v: None if v is None else inner(v)
    if name == "LowCardinality":
        inner = check_for(args[0])
    elif m := _INT.match(name):
        inner = _int_check(type_, m.group(1) == "U", int(m.group(2)))
    elif name in ("Float32", "Float64"):
        inner = _float_check
    elif name == "Bool":
        inner = _bool_check
    elif name in ("String", "FixedString"):
        inner = _string_check
    elif name == "DateTime64":
        inner = _time_check(type_, DATETIME64_MIN, DATETIME64_MAX, int(args[0]) if args else 3)
    elif name == "DateTime":
        inner = _time_check(type_, DATETIME_MIN, DATETIME_MAX, 0)
    elif name == "Array":
        inner = _sequence_check([check_for(args[0])], repeat=True)
    elif name == "Tuple":  # elements may be named: Tuple(check String, passed Bool)
        types = [a.split(None, 1)[1] if re.match(r"^\w+\s+\S", a) else a for a in args]
        inner = _sequence_check([check_for(t) for t in types], repeat=False)
    else:
        return _accept
    return lambda v: "NULL in a column that is not Nullable" if v is None else inner(v)


#: Types whose decoded Avro values always fit (a str in a String, a float in a Float64): only NULL is checked.
_FITTING = frozenset({"String", "FixedString", "Float32", "Float64", "Bool"})


@lru_cache(maxsize=None)
def _plan(table: str, columns: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[tuple[int, Check], ...]]:
    """(positions of the non-Nullable columns, (position, check) of the columns whose values need a check)."""
    spec = table_specs().get(table)
    not_null, checks = [], []
    for i, column in enumerate(columns):
        type_ = spec.columns.get(column) if spec is not None else None
        if type_ is None:
            continue
        name, args = _split_type(type_)
        if name == "LowCardinality":
            name, args = _split_type(args[0])
        if name != "Nullable":
            not_null.append(i)
        elif _split_type(args[0])[0] in _FITTING:
            continue
        if name not in _FITTING and check_for(type_) is not _accept:
            checks.append((i, check_for(type_)))
    return tuple(not_null), tuple(checks)


def check_rows(table: str, columns: tuple[str, ...], rows: list[list[Any]]) -> None:
    """Raise :class:`RowRejected` for the first value its column cannot hold (NULLs first, then ranges).

    Rows may be shorter than ``columns`` (audit rows get their chain columns when sealed): the rest is not checked.
    """
    if not rows:
        return
    not_null, checks = _plan(table, columns[:len(rows[0])])
    for row in rows:
        for i in not_null:
            if row[i] is None:
                raise RowRejected(table, columns[i], None, "NULL in a column that is not Nullable")
        for i, check in checks:
            problem = check(row[i])
            if problem:
                raise RowRejected(table, columns[i], row[i], problem)


# ------------------------------------------------------------------------------------------ partitions
_MONTH = re.compile(r"^toYYYYMM\(\s*`?(\w+)`?\s*\)$")
_IDENT = re.compile(r"`?([A-Za-z_]\w*)`?")


def _as_utc(value: Any, precision: int) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 10 ** precision, timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    return None


def partition_key(table: str, columns: tuple[str, ...],
                  specs: dict[str, TableSpec] | None = None) -> Callable[[list[Any]], Hashable]:
    """A function row -> the row's partition (or a finer key: never fewer distinct keys than partitions).

    ``toYYYYMM(column)`` is computed exactly (in UTC, the time zone of every
    DateTime64 column here); any other expression is keyed by the values of
    the columns it names, which splits at least as finely as the expression.
    A table without ``PARTITION BY`` has one partition.
    """
    spec = (specs or table_specs()).get(table)
    expr = spec.partition_by if spec is not None else None
    if not expr:
        return lambda _row: ()
    if (m := _MONTH.match(expr)) and m.group(1) in columns:
        i = columns.index(m.group(1))
        _, args = _split_type(re.sub(r"^(Nullable|LowCardinality)\((.*)\)$", r"\2", spec.columns.get(m.group(1), "")))
        precision = int(args[0]) if args and args[0].isdigit() else 3

        def month(row: list[Any]) -> Hashable:
            at = _as_utc(row[i], precision)
            return (at.year, at.month) if at is not None else ("?", repr(row[i]))
        return month
    used = [columns.index(c) for c in dict.fromkeys(_IDENT.findall(expr)) if c in columns]
    return lambda row: repr([row[i] for i in used])

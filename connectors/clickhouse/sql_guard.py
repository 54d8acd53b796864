"""The gate every analyst query passes: exactly one SELECT (or WITH ... SELECT), nothing else.

Why an allow-list in Python when the engine already runs the analysts' session with ``readonly=1``:
measured on chdb 26.9 (the embedded engine), ``readonly=1`` still lets through
``SELECT ... INTO OUTFILE '<path>'`` (the file is written, as the same OS user as the pipeline: that is
how a trust anchor was planted), ``SYSTEM STOP MERGES``, ``KILL QUERY``, the scalar ``file('<path>')``
(reads any file) and ``SELECT 1; SELECT 2`` (both run). So this module is the guard that stops them;
the engine's ``readonly=1`` and limits (``open_client(readonly=True)``) are the second line.

How: a small tokenizer that treats string literals, quoted identifiers and comments the way
ClickHouse's lexer does (backslash escapes and doubled quotes; ``--`` to end of line; ``/* */``).
Where the two could disagree the tokenizer errs towards seeing more code, never less: a block
comment ends at the first ``*/`` (ClickHouse nests them), a line comment also ends at ``\\r``, and
characters with no use in a plain SELECT (``#`` comments, ``$`` heredocs, ``\\`` and non-ASCII outside
strings) are refused. Then the token list must be one statement starting with SELECT or WITH,
with no write, admin or output keyword (INTO OUTFILE, SETTINGS, FORMAT, SYSTEM, KILL, ...) as a bare
word, no table function in a FROM/JOIN position, and no call of a function that reads files, URLs
or other servers anywhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from streams.core.errors import CsosError


class RefusedQuery(CsosError, ValueError):
    """The query is not one plain SELECT; the message names what was refused."""
    code = "SQL_REFUSED"


@dataclass(frozen=True)
class Token:
    kind: str  # "word", "qident" (quoted identifier), "string", "number", "punct"
    text: str
    pos: int

    @property
    def name(self) -> str:
        """The identifier a word or quoted identifier stands for, lower-cased (function names are compared so)."""
        if self.kind == "qident":  # no backslashes in one (tokenize refuses them), only doubled quotes
            return self.text[1:-1].replace(self.text[0] * 2, self.text[0]).lower()
        return self.text.lower()


#: Bare words refused anywhere in the statement (unless after a dot, i.e. a column or table name, or
#: ``system.`` as a database). Statement starters are listed too: a second statement cannot start.
#: Not DESC/DESCRIBE: ``ORDER BY x DESC``; a leading DESCRIBE is refused by the SELECT-first rule.
FORBIDDEN_WORDS = frozenset("""
    into outfile infile format settings set system kill insert alter create drop optimize attach detach
    truncate rename grant revoke exchange undrop delete update backup restore use explain
    show check watch move execute
""".split())
#: Forbidden words that are also ordinary functions when followed by ``(``: format('{}', x), truncate(x, 2).
ALSO_FUNCTIONS = frozenset({"format", "truncate"})
#: Functions (table or scalar) that read files, URLs, other servers or run programs, refused as a call anywhere.
IO_FUNCTIONS = frozenset("""
    file filecluster filesystem url urlcluster s3 s3cluster gcs oss cosn hdfs hdfscluster azureblobstorage
    azureblobstoragecluster remote remotesecure cluster clusterallreplicas executable python eval input mysql
    postgresql sqlite mongodb redis jdbc odbc bigquery ytsaurus arrowstream dictionary merge loop view
    viewifpermitted viewexplain prometheusquery prometheusqueryrange
""".split())
IO_FAMILIES = re.compile(r"^(iceberg|deltalake|hudi|paimon)(s3|azure|hdfs|local)?(cluster)?$")
#: Functions whose parentheses hold a FROM that is not a table: extract(YEAR FROM d), trim(BOTH ' ' FROM s).
FROM_INSIDE_FUNCTIONS = frozenset({"extract", "substring", "substr", "trim", "overlay"})
#: Words that end a FROM clause at their nesting depth (after them a comma is no longer a table list).
FROM_CLAUSE_ENDS = frozenset("""
    where prewhere group order limit having union except intersect window qualify on using array offset
    sample final settings format
""".split())

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"0[xX][0-9A-Fa-f_]+|0[bB][01_]+|[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?")
_PUNCT = frozenset("()[]{},;.:+-*/%=<>!|?")
_SPACE = frozenset(" \t\r\n\f\v")
MAX_QUERY_CHARS = 1_000_000


def tokenize(sql: str) -> list[Token]:
    """Split ``sql`` into tokens, dropping whitespace and comments; refuse what a plain SELECT never needs."""
    tokens: list[Token] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in _SPACE:
            i += 1
        elif sql.startswith("--", i):
            ends = [j for j in (sql.find("\n", i), sql.find("\r", i)) if j >= 0]
            i = min(ends) + 1 if ends else n
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                raise RefusedQuery(f"readonly query refused: unterminated comment at position {i}")
            i = j + 2
        elif c in "'\"`":
            end = _quoted_end(sql, i)
            if c != "'" and "\\" in sql[i:end]:  # ClickHouse would unescape it: "fi\le" could name file()
                raise RefusedQuery(f"readonly query refused: backslash in the quoted name at position {i}")
            tokens.append(Token("string" if c == "'" else "qident", sql[i:end], i))
            i = end
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _WORD.match(sql, i)
            tokens.append(Token("word", m.group(), i))
            i = m.end()
        elif c.isascii() and c.isdigit():
            m = _NUMBER.match(sql, i)
            if m.end() < n and (sql[m.end()].isalnum() or sql[m.end()] in "_$"):
                raise RefusedQuery(f"readonly query refused: malformed number at position {i} (ClickHouse would read "
                                   f"{sql[i:m.end() + 8]!r}... as a name)")
            tokens.append(Token("number", m.group(), i))
            i = m.end()
        elif c in _PUNCT:
            tokens.append(Token("punct", c, i))
            i += 1
        else:
            raise RefusedQuery(f"readonly query refused: character {c!r} at position {i} is not allowed outside quotes "
                               "(no '#' comments, '$' heredocs or backslashes in a read-only query)")
    return tokens


def _quoted_end(sql: str, start: int) -> int:
    """Index after the literal or quoted identifier opening at ``start``: ``\\x`` escapes, a doubled quote continues."""
    quote, i, n = sql[start], start + 1, len(sql)
    while i < n:
        c = sql[i]
        if c == "\\":
            i += 2
        elif c == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise RefusedQuery(f"readonly query refused: unterminated quote {quote} opened at position {start}")


def check_select(sql: str) -> str:
    """Return ``sql`` (without a trailing ``;``) if it is one read-only SELECT; else raise :class:`RefusedQuery`."""
    if len(sql) > MAX_QUERY_CHARS:
        raise RefusedQuery(f"readonly query refused: query longer than {MAX_QUERY_CHARS} characters")
    tokens = tokenize(sql)
    semicolons = [k for k, t in enumerate(tokens) if t.text == ";" and t.kind == "punct"]
    if semicolons and semicolons != [len(tokens) - 1]:
        raise RefusedQuery("readonly query refused: more than one statement (';' inside the query); send one SELECT")
    if semicolons:
        sql, tokens = sql[:tokens[-1].pos], tokens[:-1]
    first = next((t for t in tokens if t.text != "("), None)
    if first is None or first.kind != "word" or first.name not in ("select", "with"):
        shown = "an empty query" if first is None else repr(first.text)
        raise RefusedQuery(f"readonly query refused: only SELECT (or WITH ... SELECT) is allowed, not {shown}")
    _check_tokens(tokens)
    return sql


def _check_tokens(tokens: list[Token]) -> None:
    """Walk the tokens once: forbidden words, I/O functions, table functions after FROM/JOIN."""
    openers: list[str] = []  # per open parenthesis: the function name before it ('' for a plain parenthesis)
    from_clause: set[int] = set()  # depths whose FROM clause (table list) is open
    expect_table = False
    for k, tok in enumerate(tokens):
        prev = tokens[k - 1] if k else None
        nxt = tokens[k + 1] if k + 1 < len(tokens) else None
        calls = nxt is not None and nxt.text == "(" and nxt.kind == "punct"
        depth = len(openers)
        if expect_table:
            expect_table = False
            if tok.kind in ("word", "qident") and _names_a_call(tokens, k):
                raise RefusedQuery(f"readonly query refused: table function {_call_name(tokens, k)}() after FROM/JOIN "
                                   "(read the pipeline's tables, not files, URLs or generated tables)")
        if tok.kind == "punct":
            if tok.text == "(":
                openers.append(prev.name if prev is not None and prev.kind in ("word", "qident") else "")
            elif tok.text == ")" and openers:
                from_clause.discard(depth)
                openers.pop()
            elif tok.text == "," and depth in from_clause:
                expect_table = True
            continue
        if tok.kind not in ("word", "qident"):
            continue
        if calls and (tok.name in IO_FUNCTIONS or IO_FAMILIES.match(tok.name)):
            raise RefusedQuery(f"readonly query refused: function {tok.text}() reads files, URLs or other servers")
        if tok.kind != "word" or _is_name_part(tok, prev, nxt):
            continue
        word = tok.name
        if word in FORBIDDEN_WORDS and not (calls and word in ALSO_FUNCTIONS):
            raise RefusedQuery(f"readonly query refused: {tok.text.upper()} is not allowed in a read-only query "
                               f"(a column of that name needs backquotes: `{tok.text.lower()}`)")
        if word in FROM_CLAUSE_ENDS:
            from_clause.discard(depth)
        elif word == "from" and not _from_is_not_a_table(tokens, k, openers):
            from_clause.add(depth)
            expect_table = True
        elif word == "join" and not (prev is not None and prev.name == "array"):
            from_clause.add(depth)
            expect_table = True


def _is_name_part(tok: Token, prev: Token | None, nxt: Token | None) -> bool:
    """``t.format``, ``system.settings``: a word after a dot, or the ``system`` database before one, is a name."""
    if prev is not None and prev.text == "." and prev.kind == "punct":
        return True
    return tok.name == "system" and nxt is not None and nxt.text == "." and nxt.kind == "punct"


def _names_a_call(tokens: list[Token], k: int) -> bool:
    """Whether ``name(``, ``db.name(`` or ``"name"(`` starts at ``k``."""
    j = k
    while j + 2 < len(tokens) and tokens[j + 1].text == "." and tokens[j + 2].kind in ("word", "qident"):
        j += 2
    return j + 1 < len(tokens) and tokens[j + 1].text == "(" and tokens[j + 1].kind == "punct"


def _call_name(tokens: list[Token], k: int) -> str:
    j = k
    while j + 2 < len(tokens) and tokens[j + 1].text == ".":
        j += 2
    return "".join(t.text for t in tokens[k:j + 1])


def _from_is_not_a_table(tokens: list[Token], k: int, openers: list[str]) -> bool:
    """``extract(YEAR FROM d)``, ``trim(BOTH ' ' FROM s)``, ``a IS DISTINCT FROM b``: FROM without a table."""
    if openers and openers[-1] in FROM_INSIDE_FUNCTIONS:
        return True
    return k >= 2 and tokens[k - 1].name == "distinct" and tokens[k - 2].name in ("is", "not")

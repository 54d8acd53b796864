"""Read-only SQL against the pipeline's ClickHouse tables, from any process.

The embedded engine allows one process per data directory, so while the sink
(``csos sink``) runs, queries go through its ``/sql`` endpoint; with no sink
running (or with a ClickHouse server) the caller opens the store itself.
Either way the query must be one SELECT (``connectors/clickhouse/sql_guard.py``) and runs
with ``readonly=1`` and the analysts' limits. The sink's ``/sql`` takes POST only,
with ``Authorization: Bearer <token>``: ``CSOS_SQL_TOKEN``, else the token the
sink wrote to ``$CSOS_DATA_DIR/sink-token`` (mode 0600) when it started.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from connectors.clickhouse.client import open_client, run_readonly_query

from streams.core.config import Settings
from streams.core.errors import CsosError


class QueryError(CsosError, RuntimeError):
    code = "QUERY"
    pass


def sink_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.sink_port}"


def sink_token_path(settings: Settings) -> Path:
    """Where a sink without ``CSOS_SQL_TOKEN`` writes the token it generated (readable by its OS user only)."""
    return settings.data_dir / "sink-token"


def sink_token(settings: Settings) -> str:
    """The token for the sink's ``/sql``: ``CSOS_SQL_TOKEN``, else the running sink's ``sink-token`` file."""
    if settings.sql_token:
        return settings.sql_token
    try:
        return sink_token_path(settings).read_text().strip()
    except OSError as exc:
        raise QueryError(f"cannot read the sink's token ({exc.strerror}: {sink_token_path(settings)}); "
                         "run as the sink's user or set CSOS_SQL_TOKEN to the sink's token") from None


def sink_is_up(settings: Settings, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(sink_url(settings) + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


Reader = Callable[[str], "tuple[list[str], list[list[Any]]]"]


def _via_sink(settings: Settings, sql: str) -> tuple[list[str], list[list[Any]]]:
    """One query through the running sink's ``/sql`` (it owns the embedded store)."""
    req = urllib.request.Request(sink_url(settings) + "/sql", data=sql.encode("utf-8"), method="POST",
                                 headers={"Authorization": f"Bearer {sink_token(settings)}",
                                          "Content-Type": "text/plain; charset=utf-8"})
    try:
        with urllib.request.urlopen(req, timeout=settings.sql_max_seconds + 60) as r:
            payload = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            message = json.loads(body).get("error", str(exc))
        except ValueError:
            message = f"{exc}: {body[:200]!r}"
        raise QueryError(message) from None
    return payload["columns"], payload["rows"]


def _via_client(client: Any, sql: str) -> tuple[list[str], list[list[Any]]]:
    """One query on a read-only client of our own (no sink running, or a ClickHouse server)."""
    try:
        columns, rows = run_readonly_query(client, sql)
    except Exception as exc:  # noqa: BLE001
        raise QueryError(str(exc).splitlines()[0]) from None
    return columns, [list(r) for r in rows]


@contextmanager
def open_reader(settings: Settings) -> Iterator[Reader]:
    """The one read path: SQL -> (columns, rows) for the block, through the running sink or a read-only client.

    Which way is chosen once, when the block opens: with the embedded engine and
    a sink running, every query goes to its ``/sql``; otherwise one read-only
    client serves the whole block (a long read such as ``csos audit verify``
    pages through the store without reconnecting) and is closed after it.
    """
    if settings.embedded_clickhouse and sink_is_up(settings):
        yield lambda sql: _via_sink(settings, sql)
        return
    client = open_client(settings, readonly=True)
    try:
        yield lambda sql: _via_client(client, sql)
    finally:
        client.close()


def run_query(settings: Settings, sql: str) -> tuple[list[str], list[list[Any]]]:
    """One query on the read path of :func:`open_reader`."""
    with open_reader(settings) as read:
        return read(sql)


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

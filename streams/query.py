"""Read-only SQL against the pipeline's ClickHouse tables, from any process.

The embedded engine allows one process per data directory, so while the sink
(``csos sink``) runs, queries go through its ``/sql`` endpoint; with no sink
running (or with a ClickHouse server) the caller opens the store itself.
Either way the query runs with ``readonly=1``.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from connectors.clickhouse_sink import open_client, run_readonly_query

from .config import Settings


class QueryError(RuntimeError):
    pass


def sink_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.sink_port}"


def sink_is_up(settings: Settings, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(sink_url(settings) + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_query(settings: Settings, sql: str) -> tuple[list[str], list[list[Any]]]:
    if settings.embedded_clickhouse and sink_is_up(settings):
        req = urllib.request.Request(sink_url(settings) + "/sql", data=sql.encode("utf-8"), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                payload = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                message = json.loads(body).get("error", str(exc))
            except ValueError:
                message = f"{exc}: {body[:200]!r}"
            raise QueryError(message) from None
        return payload["columns"], payload["rows"]
    client = open_client(settings, readonly=True)
    try:
        columns, rows = run_readonly_query(client, sql)
    except Exception as exc:  # noqa: BLE001
        raise QueryError(str(exc).splitlines()[0]) from None
    finally:
        client.close()
    return columns, [list(r) for r in rows]


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

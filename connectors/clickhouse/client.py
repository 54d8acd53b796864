"""Connect to ClickHouse (embedded chdb or a server), apply the DDL, run analysts' read-only queries.

Its own module because everything that touches ClickHouse needs a client - the sink's writer, the audit
chain's verifier, ``csos sql``, the review page - and none of them should have to import the others.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from connectors.clickhouse.sql_guard import check_select
from streams.core.config import REPO_ROOT, Settings

DDL_DIR = REPO_ROOT / "schemas" / "clickhouse"


def open_client(settings: Settings, *, readonly: bool = False) -> Client:
    """Connect to the configured ClickHouse; create the database if we may.

    ``readonly=True`` gives an analyst's client that cannot change anything:
    on a server every request carries ``readonly=1``; on the embedded engine
    the client's own session is switched to ``readonly=1`` for good. (Per-query
    ``readonly`` on a shared embedded session is unsafe: clickhouse-connect
    restores session settings after a query, and after a refused write in
    readonly mode that restore is itself refused, leaving the session - the
    sink's writer included - read-only.) The analysts' limits (time, memory,
    result rows: :func:`analyst_limits`) are set first, since ``readonly=1``
    forbids changing any setting afterwards - which also makes a query's own
    ``SETTINGS`` clause fail. ``readonly=1`` does NOT stop ``INTO OUTFILE``,
    ``SYSTEM`` or ``KILL`` on chdb: :func:`run_readonly_query` refuses those.
    """
    url = settings.effective_clickhouse_url
    db = settings.clickhouse_database
    if url.startswith("chdb:"):
        Path(url[len("chdb://"):]).mkdir(parents=True, exist_ok=True)
        client = clickhouse_connect.get_client(dsn=url)  # each client has its own engine session
        if readonly:
            client.command("SET " + ", ".join(f"{k} = {v!r}" for k, v in analyst_limits(settings).items()))
            client.command("SET readonly = 1")
        else:
            client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        client.database = db
    else:
        parsed = urlparse(url)
        kwargs: dict[str, Any] = dict(
            host=parsed.hostname, port=parsed.port, secure=parsed.scheme == "https",
            username=parsed.username or settings.clickhouse_user,
            password=parsed.password or settings.clickhouse_password,
        )
        if not readonly:
            admin = clickhouse_connect.get_client(**kwargs)
            admin.command(f"CREATE DATABASE IF NOT EXISTS {db}")
            admin.close()
        client = clickhouse_connect.get_client(database=db, settings={"readonly": 1} if readonly else None,
                                               **kwargs)
        if readonly:
            _apply_limits_if_allowed(client, analyst_limits(settings))
    return client


def analyst_limits(settings: Settings) -> dict[str, Any]:
    """What one analyst query may cost: a runaway query or result must not take the sink (or server) down.

    A result over the row limit is an error, never silently truncated: a compliance count must be whole.
    """
    return {"max_execution_time": settings.sql_max_seconds,
            "max_memory_usage": settings.sql_max_memory_mb * 1024 * 1024,
            "max_result_rows": settings.sql_max_rows, "result_overflow_mode": "throw",
            "allow_introspection_functions": 0}


def _apply_limits_if_allowed(client: Client, limits: dict[str, Any]) -> None:
    """Send the limits with every request, except those the server's profile fixes (its read-only analyst
    profile, ``deploy/clickhouse/analyst.sql``, sets them itself; sending them would be refused)."""
    for key, value in limits.items():
        known = client.server_settings.get(key)
        if known is None or not known.readonly:
            client.set_client_setting(key, value)


def apply_ddl(client: Client, ddl_dir: Path = DDL_DIR) -> list[str]:
    """Apply every DDL file in order; each is idempotent (IF NOT EXISTS).

    A file may have a backfill of the same name in ``backfill/``: INSERT ... SELECT statements that fill the
    tables the file creates from rows stored before (e.g. the dashboards' aggregates, whose materialized views
    only see rows inserted after they exist). It runs once: when none of the tables it inserts into existed
    before the file was applied. ``{cut}`` in it is the engine's clock read just before the file was applied,
    so that rows ingested after it, which the new views count, are not counted twice (POPULATE would lose
    the rows inserted while it runs).
    """
    applied = []
    for path in sorted(ddl_dir.glob("*.sql")):
        backfill = ddl_dir / "backfill" / path.name
        cut = _backfill_cut(client, backfill) if backfill.is_file() else None
        for statement in _statements(path):
            client.command(statement)
        if cut is not None:
            for statement in _statements(backfill):
                client.command(statement.replace("{cut}", cut))
        applied.append(path.name)
    return applied


def _statements(path: Path) -> list[str]:
    sql = "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("--"))
    return [s for s in (s.strip() for s in sql.split(";")) if s]


def _backfill_cut(client: Client, backfill: Path) -> str | None:
    """The cut (a DateTime64 literal, now) if the backfill must run: none of its target tables exists yet."""
    targets = set(re.findall(r"\bINSERT\s+INTO\s+`?(\w+)`?", backfill.read_text(), re.I))
    if not targets or any(int(client.command(f"EXISTS TABLE {t}")) for t in sorted(targets)):
        return None
    now = client.command("SELECT toString(now64(3, 'UTC'))")
    return f"toDateTime64('{now}', 3, 'UTC')"


def run_readonly_query(client: Client, sql: str) -> tuple[list[str], list[tuple]]:
    """Run an analyst's query on a client from ``open_client(readonly=True)``: nothing can change data.

    The single gate of every analyst query (``csos sql``, the sink's ``/sql``, the review page, audit
    verification): :func:`connectors.clickhouse.sql_guard.check_select` admits exactly one SELECT first, because the
    engine's ``readonly=1`` alone lets ``INTO OUTFILE``, ``SYSTEM`` and ``KILL`` through.
    """
    result = client.query(check_select(sql))
    return list(result.column_names), [tuple(r) for r in result.result_rows]

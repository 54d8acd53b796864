"""``csos`` commands that read ClickHouse: read-only SQL, the order summary and the daily reports for DEA.
"""
from __future__ import annotations

import json
import sys
from datetime import date as _date
from pathlib import Path

import click

from streams.cli.root import settings


@click.command()
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "tsv"]), default="table", show_default=True)
def sql(query: str, fmt: str) -> None:
    """Run one read-only SELECT against the verdicts, rejections, order lines and audit events.

    While `csos sink` owns the embedded store the query goes through its /sql
    endpoint (with its token: CSOS_SQL_TOKEN or $CSOS_DATA_DIR/sink-token);
    otherwise the store (or CLICKHOUSE_URL) is opened read-only. Anything but
    one SELECT / WITH ... SELECT (INTO OUTFILE, SETTINGS, SYSTEM, file(), ...)
    is refused.
    Tables use ReplacingMergeTree: add FINAL for exact counts, e.g.
    csos sql "SELECT verdict, count() FROM verdicts FINAL GROUP BY verdict"
    """
    from connectors.clickhouse.query import QueryError, format_table, run_query

    try:
        columns, rows = run_query(settings(), query)
    except QueryError as exc:
        raise click.ClickException(str(exc)) from None
    if fmt == "json":
        click.echo(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1))
    elif fmt == "tsv":
        click.echo("\t".join(columns))
        for r in rows:
            click.echo("\t".join("" if v is None else str(v) for v in r))
    else:
        click.echo(format_table(columns, rows))


@click.command()
def summary() -> None:
    """Print what happened to every order: received, verified, rejected by reason, released, held by reason."""
    from streams.apps.summary import fetch_summary

    click.echo(fetch_summary(settings()).render())


@click.group()
def reports() -> None:
    """Daily reports for DEA: suspicious orders (1301.74(b)) and CSOS orders filled (1305.29)."""


def _report_day(value: str | None) -> _date:
    from datetime import datetime, timedelta, timezone

    if value is None:  # yesterday (UTC): the last complete day
        return datetime.now(timezone.utc).date() - timedelta(days=1)
    try:
        return _date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


_day_option = click.option("--date", "day", default=None, help="UTC day, YYYY-MM-DD (default: yesterday).")
_out_option = click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports", show_default=True)


@reports.command("suspicious")
@_day_option
@_out_option
def reports_suspicious(day: str | None, out_dir: str) -> None:
    """Write suspicious-orders-DAY.csv and .json: every order reported to DEA on DAY, line by line."""
    from connectors.clickhouse.query import run_query
    from streams.apps.reports import write_suspicious_order_report

    s = settings()
    w = write_suspicious_order_report(lambda sql: run_query(s, sql), _report_day(day), Path(out_dir))
    click.echo(f"{w.rows} reported line(s) -> {w.csv_path}, {w.json_path}")


@reports.command("fills")
@_day_option
@_out_option
def reports_fills(day: str | None, out_dir: str) -> None:
    """Write csos-fill-report-DAY.csv and .json: every order line shipped on DAY (exit 1 if any is an exception)."""
    from connectors.clickhouse.query import run_query
    from streams.apps.reports import business_days_after, write_fill_report

    s = settings()
    d = _report_day(day)
    w = write_fill_report(lambda sql: run_query(s, sql), d, Path(out_dir))
    click.echo(f"{w.rows} shipped line(s), due at DEA by {business_days_after(d, 2)} -> {w.csv_path}, {w.json_path}")
    if w.exceptions:
        click.echo(f"{w.exceptions} line(s) need investigating (see the exception column)", err=True)
        sys.exit(1)


#: The top-level commands of this module, added to ``csos`` by ``streams.cli``.
COMMANDS = [sql, summary, reports]

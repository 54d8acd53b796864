"""The dashboards' pages in the review application: overview, growth, one registrant.

Why inside the review app: the same login, sessions, roles, CSRF and security headers apply, and the same
read-only data path (``ReviewData.query``). Viewers and analysts both see the dashboards (they only read).
Filters are a plain GET form, so every view is a link an analyst can keep or send; charts are server-side
SVG (:mod:`.dash_chart`, :mod:`.chart`), so the pages need no script at all.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web
from markupsafe import Markup

from streams.apps.review import dashboard as d
from streams.apps.review.chart import render_history_svg
from streams.apps.review.dash_chart import stacked_bars
from streams.apps.review.web import DATA_KEY, error_page, render


def _runner(request: web.Request) -> d.Query:
    data = request.app[DATA_KEY]
    return lambda sql, params: data.query(sql, params)


async def _filters(request: web.Request) -> d.Filters | web.Response:
    try:
        return d.Filters.from_query(request.query, d.today_utc())
    except d.FilterError as exc:
        return await error_page(request, 400, "Filters not understood", str(exc))


async def _context(request: web.Request, filters: d.Filters, work: Callable[[d.Query], dict[str, Any]]
                   ) -> dict[str, Any]:
    """Run ``work`` and the filter choices off the event loop (the queries block)."""
    run = _runner(request)

    def both() -> dict[str, Any]:
        return dict(work(run), choices=d.choices(run, filters), f=filters)
    return await asyncio.to_thread(both)


async def overview_page(request: web.Request) -> web.Response:
    filters = await _filters(request)
    if isinstance(filters, web.Response):
        return filters
    now = datetime.now(timezone.utc)
    clock = float(request.app[DATA_KEY].settings.due_diligence_days)
    ctx = await _context(request, filters, lambda run: d.overview(run, filters, now, clock))
    ages = ctx["ages"]
    span = max([a for a, _, _ in ages] + [int(clock) + 1])
    by_age = {a: (w, p) for a, w, p in ages}
    age_series = {"within the clock": [float(by_age.get(i, (0, 0))[0]) for i in range(span + 1)],
                  "past the clock": [float(by_age.get(i, (0, 0))[1]) for i in range(span + 1)]}
    weeks = [w for w, _, _ in ctx["weeks"]]
    charts = {
        "verdicts": stacked_bars("chart-verdicts", "Orders held and released per day", ctx["verdicts"].categories,
                                 ctx["verdicts"].values),
        "holds": stacked_bars("chart-holds", "Holds per day by deciding detector", ctx["holds"].categories,
                              ctx["holds"].values),
        "volume": stacked_bars("chart-volume", "Dosage units ordered per day by drug family",
                               ctx["volume"].categories, ctx["volume"].values),
        "rejections": stacked_bars("chart-rejections", "Rejected orders per day by reason",
                                   ctx["rejections"].categories, ctx["rejections"].values),
        "dead": stacked_bars("chart-dead", "Dead letters per day by stage", ctx["dead"].categories,
                             ctx["dead"].values),
        "ages": stacked_bars("chart-ages", "Open cases by age in days", list(range(span + 1)), age_series,
                             marker=(clock, f"due-diligence clock ({clock:g} d)")),
        "weeks": stacked_bars("chart-weeks", "Orders reported as suspicious per week", weeks,
                              {"reported orders": [float(n) for _, n, _ in ctx["weeks"]]}),
    }
    ctx["charts"] = {k: Markup(v) for k, v in charts.items()}
    return await render(request, "dashboard.html", ctx)


async def growth_page(request: web.Request) -> web.Response:
    filters = await _filters(request)
    if isinstance(filters, web.Response):
        return filters
    metric = request.query.get("metric") or "units"
    sort = request.query.get("sort") or "own"
    if metric not in d.METRICS or sort not in d.SORTS:
        return await error_page(request, 400, "Filters not understood", "Unknown measure or ranking.")
    ctx = await _context(request, filters, lambda run: {"growers": d.growth(run, filters, metric=metric, sort=sort)})
    ctx.update(metric=metric, sort=sort, metrics=d.METRICS, sorts=d.SORTS, recent_weeks=d.RECENT_WEEKS)
    return await render(request, "dash_growth.html", ctx)


async def registrant_page(request: web.Request) -> web.Response:
    dea = request.match_info["dea"].upper()
    if not d.valid_dea(dea):
        return await error_page(request, 404, "No such registrant", "That is not a DEA number.")
    filters = await _filters(request)
    if isinstance(filters, web.Response):
        return filters
    ctx = await _context(request, filters, lambda run: d.registrant(run, dea, filters))
    ctx["charts"] = {family: Markup(render_history_svg(family, points, "", ctx["thresholds"].get(family)))
                     for family, points in ctx["points"].items()}
    return await render(request, "dash_registrant.html", ctx)


def add_dashboard_routes(app: web.Application) -> None:
    app.router.add_get("/dashboard", overview_page)
    app.router.add_get("/dashboard/growth", growth_page)
    app.router.add_get("/dashboard/registrants/{dea}", registrant_page)

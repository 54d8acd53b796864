"""Stacked bar charts for the dashboards, as SVG markup drawn on the server.

Why server-side SVG (as :mod:`.chart`): the dashboards must work on a closed network under a
Content-Security-Policy that allows no script at all, so a chart is plain markup: nothing to fetch, nothing to
run, and the tests can count its bars. Each series gets a fixed colour from a small palette (in order of first
appearance), each bar segment a ``<title>`` tooltip, and an optional vertical marker (the due-diligence clock).
"""
from __future__ import annotations

from datetime import date
from html import escape
from typing import Sequence

WIDTH, HEIGHT = 760, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 34, 34
PALETTE = ("#2e6da4", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#d4ac0d", "#34495e",
           "#e84393")


def _attr(value: object) -> str:
    return escape(str(value), quote=True)


def _nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (for round axis ticks)."""
    if value <= 0:
        return 1.0
    step = 1.0
    while step * 10 <= value:
        step *= 10
    while step > value:
        step /= 10
    for k in (1, 2, 5, 10):
        if step * k >= value:
            return step * k
    return step * 10


def _label(category: object) -> str:
    return category.isoformat() if isinstance(category, date) else str(category)


def stacked_bars(chart_id: str, title: str, categories: Sequence[object], series: dict[str, list[float]],
                 *, marker: tuple[float, str] | None = None) -> str:
    """An SVG stacked bar chart: one bar per category, one coloured segment per non-zero series value.

    ``chart_id`` becomes the element id; every segment is a ``rect.bar`` with ``data-series`` and
    ``data-value``; ``marker`` (category index, label) draws a dashed vertical line before that category.
    """
    names = [n for n, vals in series.items() if any(vals)]
    totals = [sum(series[n][i] for n in names) for i in range(len(categories))]
    top = max(4.0, _nice_max(max(totals, default=0)))  # at least 0..4, so count ticks are whole numbers
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    n = max(1, len(categories))
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.8)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{_attr(chart_id)}" class="dash-chart" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{_attr(title)}" data-total="{sum(totals):g}"><title>{escape(title)}</title>']
    out.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
               'stroke="#bbb"/>')
    for k in range(5):
        v = top * k / 4
        y = TOP + plot_h * (1 - k / 4)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{v:,.0f}</text>')
    if not names:
        out.append(f'<text class="empty" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">'
                   "Nothing in this range.</text>")
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    for i, category in enumerate(categories):
        x = LEFT + slot * i + (slot - bar_w) / 2
        base = TOP + plot_h
        for name in names:
            value = series[name][i]
            if not value:
                continue
            h = plot_h * value / top
            base -= h
            out.append(f'<rect class="bar" data-series="{_attr(name)}" data-value="{value:g}" x="{x:.1f}" '
                       f'y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{colours[name]}">'
                       f"<title>{escape(_label(category))}: {escape(name)} {value:,.0f}</title></rect>")
    step = max(1, len(categories) // 6)
    for i in range(0, len(categories), step):
        x = LEFT + slot * (i + 0.5)
        out.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 15}" text-anchor="middle" font-size="10">'
                   f"{escape(_label(categories[i]))}</text>")
    if marker is not None:
        mx = LEFT + slot * marker[0]
        out.append(f'<line class="marker" x1="{mx:.1f}" x2="{mx:.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
                   f'stroke="#c0392b" stroke-dasharray="5,4"/><text x="{mx + 4:.1f}" y="{TOP + 12}" '
                   f'font-size="11" fill="#c0392b">{escape(marker[1])}</text>')
    lx = LEFT
    for name in names:
        out.append(f'<rect x="{lx}" y="8" width="10" height="10" fill="{colours[name]}"/>'
                   f'<text x="{lx + 14}" y="17" font-size="11">{escape(name)}</text>')
        lx += 24 + 7 * len(name)
    out.append("</svg>")
    return "".join(out)

"""The registrant's order history for one drug family, as an inline SVG drawn on the server.

Why server-side SVG: the page must work on a closed network with no CDN and no JavaScript
framework, and a chart that is plain markup is also what the tests can count. One mark per order:
released orders are dots, orders the monitor held are squares, the order under review is a large
red ring with a label. The y-axis is logarithmic because a held order is often ten times the usual
size, which on a linear axis would flatten every other order onto the baseline. The size
detector's threshold, when it fired, is drawn as a dashed line.
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta
from html import escape

from streams.apps.review.data import HistoryPoint

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 28, 40


def _fmt_units(v: float) -> str:
    if v >= 1_000_000:
        return f"{v / 1_000_000:g}M"
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def _attr(value: object) -> str:
    return escape(str(value), quote=True)


def render_history_svg(family: str, points: list[HistoryPoint], held_order_id: str,
                       threshold: float | None = None) -> str:
    """SVG markup (a string safe to embed in HTML as is) for one family's history.

    Every point is one element with class ``pt`` plus ``released``, ``held`` or ``current``, and a
    ``data-order-id`` attribute; the order under review is ``current`` whatever its verdict.
    """
    label = f"Order history for {family}: {len(points)} orders, dosage units per order (log scale)"
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="history" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{_attr(label)}" '
            f'data-family="{_attr(family)}" data-points="{len(points)}">')
    out = [head, f"<title>{escape(label)}</title>"]
    if not points:
        out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="empty">'
                   f"No orders of {escape(family)} in the window.</text></svg>")
        return "".join(out)

    times = [p.received_at for p in points]
    t0, t1 = min(times), max(times)
    if t1 - t0 < timedelta(days=2):
        t0, t1 = t0 - timedelta(days=1), t1 + timedelta(days=1)
    pad = (t1 - t0) * 0.03  # keep the first and last marks off the frame
    t0, t1 = t0 - pad, t1 + pad
    values = [max(1, p.dosage_units) for p in points] + ([threshold] if threshold and threshold > 0 else [])
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values) * 1.05))
    if hi <= lo:
        hi = lo * 10
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: datetime) -> float:
        return LEFT + plot_w * (at - t0).total_seconds() / (t1 - t0).total_seconds()

    def y(units: float) -> float:
        v = max(units, lo)
        return TOP + plot_h * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

    # axes and grid
    out.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
               'stroke="#999"/>')
    decade = lo
    while decade <= hi:
        yy = y(decade)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" '
                   'stroke="#e3e3e3"/>')
        out.append(f'<text class="tick" x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end" '
                   f'font-size="11">{_fmt_units(decade)}</text>')
        decade *= 10
    ticks = 5
    for i in range(ticks + 1):
        at = t0 + (t1 - t0) * i / ticks
        xx = x(at)
        out.append(f'<line class="grid" x1="{xx:.1f}" x2="{xx:.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
                   'stroke="#f0f0f0"/>')
        anchor = "start" if i == 0 else "end" if i == ticks else "middle"
        out.append(f'<text class="tick" x="{xx:.1f}" y="{TOP + plot_h + 16}" text-anchor="{anchor}" '
                   f'font-size="11">{at:%Y-%m-%d}</text>')
    out.append(f'<text x="{LEFT}" y="{HEIGHT - 6}" font-size="11" fill="#555">dosage units of '
               f'{escape(family)} per order (log scale), UTC dates</text>')
    if threshold and threshold > 0:
        ty = y(threshold)
        out.append(f'<line class="threshold" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" '
                   'stroke="#c0392b" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{LEFT + plot_w - 4}" y="{ty - 4:.1f}" text-anchor="end" font-size="11" '
                   f'fill="#c0392b">size threshold {threshold:,.0f}</text>')

    # marks: others first, the order under review last so it is on top
    current: list[str] = []
    for p in sorted(points, key=lambda q: q.order_id == held_order_id):
        cx, cy = x(p.received_at), y(max(1, p.dosage_units))
        tip = (f"{p.received_at:%Y-%m-%d %H:%M} UTC: {p.dosage_units:,} units, "
               f"{'held' if p.verdict == 'HOLD' else 'released' if p.verdict == 'RELEASE' else 'no verdict'}"
               f" (order {p.order_id})")
        oid = _attr(p.order_id)
        if p.order_id == held_order_id:
            current.append(
                f'<g class="pt current" data-order-id="{oid}" data-units="{p.dosage_units}">'
                f"<title>{escape('This order - ' + tip)}</title>"
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" stroke="#c0392b" stroke-width="3"/>'
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="#c0392b"/></g>'
                f'<text class="current-label" x="{cx - 12:.1f}" y="{cy - 12:.1f}" text-anchor="end" '
                f'font-size="12" font-weight="bold" fill="#c0392b">this order: {p.dosage_units:,}</text>')
        elif p.verdict == "HOLD":
            out.append(f'<rect class="pt held" data-order-id="{oid}" data-units="{p.dosage_units}" '
                       f'x="{cx - 4.5:.1f}" y="{cy - 4.5:.1f}" width="9" height="9" fill="#e67e22" '
                       f'stroke="#8e4b0b"><title>{escape(tip)}</title></rect>')
        else:
            out.append(f'<circle class="pt released" data-order-id="{oid}" data-units="{p.dosage_units}" '
                       f'cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="#2e6da4" fill-opacity="0.8">'
                       f"<title>{escape(tip)}</title></circle>")
    out.extend(current)
    # legend
    lx = LEFT + 4
    out.append(f'<g class="legend" font-size="11"><circle cx="{lx + 4}" cy="14" r="3.5" fill="#2e6da4"/>'
               f'<text x="{lx + 12}" y="18">released</text>'
               f'<rect x="{lx + 80}" y="9.5" width="9" height="9" fill="#e67e22" stroke="#8e4b0b"/>'
               f'<text x="{lx + 94}" y="18">held by the monitor</text>'
               f'<circle cx="{lx + 230}" cy="14" r="6" fill="none" stroke="#c0392b" stroke-width="2.5"/>'
               f'<text x="{lx + 242}" y="18">this order</text></g>')
    out.append("</svg>")
    return "".join(out)

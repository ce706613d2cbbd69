"""The Usage page: requests or tokens per UTC day stacked by principal (an inline SVG drawn here, no script), and the
usage by key and by model, over a span chosen in its form (portal/usage_report.py, as GET /api/usage)."""
from __future__ import annotations

import math
from typing import Dict, List

from flask import g, render_template, request

from ..errors import ValidationError
from ..usage_report import daily_by_principal, usage_query, usage_summary
from .blueprint import bp

DEFAULT_SINCE = "30d"
METRICS = {"requests": "Requests", "tokens": "Tokens (prompt and completion)"}
PALETTE = ("#0d6efd", "#198754", "#fd7e14", "#6f42c1", "#d63384", "#20c997", "#b58100", "#0aa2c0")
OTHERS_COLOUR = "#adb5bd"
WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 12, 36
MAX_LABELS = 10  # day labels under the bars at most


def nice_ceiling(value: float) -> float:
    """The axis top: 1, 2, 2.5 or 5 times a power of ten, at least `value` (1 for nothing)."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def short_number(value: float) -> str:
    """An axis label: 950, 1.2k, 3.5M."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:g}"


def stacked_chart(days: List[str], series: Dict[str, List[int]], metric: str) -> dict:
    """The chart's shapes: a bar per day, a segment per principal (the most active first, beyond the palette's
    size the rest together as "others"), axis ticks and day labels, in SVG user units."""
    ranked = sorted(series, key=lambda who: (-sum(series[who]), who))
    shown = ranked[:len(PALETTE)] if len(ranked) <= len(PALETTE) else ranked[:len(PALETTE) - 1]
    rest = [who for who in ranked if who not in shown]
    layers = [(who, PALETTE[n], series[who]) for n, who in enumerate(shown)]
    if rest:
        layers.append((f"{len(rest)} others", OTHERS_COLOUR, [sum(series[who][i] for who in rest)
                                                             for i in range(len(days))]))
    totals = [sum(values[i] for _, _, values in layers) for i in range(len(days))]
    top = nice_ceiling(max(totals, default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(days))
    bars = []
    for i, day in enumerate(days):
        base = 0
        for who, colour, values in layers:
            if values[i]:
                y0, y1 = base / top * plot_h, (base + values[i]) / top * plot_h
                bars.append({"x": round(LEFT + i * step + step * 0.1, 2), "width": round(max(1.0, step * 0.8), 2),
                             "y": round(TOP + plot_h - y1, 2), "height": round(max(0.5, y1 - y0), 2),
                             "colour": colour, "title": f"{day}, {who}: {values[i]:,} {metric}"})
                base += values[i]
    every = max(1, math.ceil(len(days) / MAX_LABELS))
    labels = [{"x": round(LEFT + (i + 0.5) * step, 2), "text": day[5:]} for i, day in enumerate(days) if i % every == 0]
    ticks = [{"y": round(TOP + plot_h - fraction * plot_h, 2), "text": short_number(top * fraction)}
             for fraction in (0, 0.25, 0.5, 0.75, 1)]
    return {"width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT, "top": TOP,
            "bottom": TOP + plot_h, "bars": bars, "labels": labels, "ticks": ticks,
            "legend": [{"name": who, "colour": colour, "total": sum(values)} for who, colour, values in layers],
            "total": sum(totals)}


@bp.get("/ui/usage")
def usage():
    since = request.args.get("since", DEFAULT_SINCE)
    until = request.args.get("until", "")
    metric = request.args.get("metric", "requests")
    errors = {}
    if metric not in METRICS:
        errors["metric"], metric = f"expected requests or tokens, got {metric!r}", "requests"
    try:
        query = usage_query(g.principal, "principal", since, until)
    except ValidationError as exc:  # shown next to its field; the page shows the default span meanwhile
        errors[exc.field] = exc.problem
        query = usage_query(g.principal, "principal", DEFAULT_SINCE)
    days, series = daily_by_principal(query, metric)
    by_model = usage_query(g.principal, "model", query.since and query.since.isoformat(),
                           query.until and query.until.isoformat())
    # A form shown again with its problems is a page like any other (200), as browsers expect of forms.
    return render_template("ui/usage.html", title="Usage", since=since, until=until, metric=metric, metrics=METRICS,
                           errors=errors, days=days, chart=stacked_chart(days, series, metric),
                           shown_since=query.since, shown_until=query.until, by_key=usage_summary(query),
                           by_model=usage_summary(by_model), only_own=g.principal != "owner")

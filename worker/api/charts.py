"""SVG charts drawn on the server: the dashboard needs no charting library and no network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

# A colour-blind-safe palette (Okabe & Ito), cycled.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 70, 10, 34, 46
GRID_LINES = 4
MAX_BAR_W = 48.0


def _number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.3g}M"
    if value >= 1_000:
        return f"{value / 1_000:.3g}k"
    return f"{value:.3g}"


def stacked_bars(
    days: Sequence[str], series: Mapping[str, Mapping[str, float]], *, label: str
) -> str:
    """One bar per day, stacked by series (a key or a model); `series[name][day]` = value."""
    names = sorted(series)
    totals = [sum(series[n].get(day, 0.0) for n in names) for day in days]
    top = max(totals, default=0.0) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    band = plot_w / max(len(days), 1)
    bar_w = min(max(2.0, band * 0.7), MAX_BAR_W)
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(label)}" viewBox="0 0 {WIDTH} {HEIGHT}"'
        f' width="100%" data-days="{len(days)}" data-series="{len(names)}">',
        f"<title>{escape(label)}</title>",
    ]
    for i in range(GRID_LINES + 1):
        y = TOP + plot_h - plot_h * i / GRID_LINES
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">'
            f"{_number(top * i / GRID_LINES)}</text>"
        )
    for d, day in enumerate(days):
        x = LEFT + band * d + (band - bar_w) / 2
        base = float(TOP + plot_h)
        for n, name in enumerate(names):
            value = series[name].get(day, 0.0)
            if value <= 0:
                continue
            height = plot_h * value / top
            base -= height
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}"'
                f' height="{height:.1f}" fill="{PALETTE[n % len(PALETTE)]}">'
                f"<title>{escape(name)} {escape(day)}: {_number(value)}</title></rect>"
            )
        if len(days) <= 16 or d % max(1, len(days) // 8) == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle"'
                f' class="axis">{escape(day[5:])}</text>'
            )
    legend_x = LEFT
    for n, name in enumerate(names):
        parts.append(
            f'<rect x="{legend_x}" y="8" width="12" height="12" fill="{PALETTE[n % len(PALETTE)]}"/>'
            f'<text x="{legend_x + 16}" y="18" class="legend">{escape(name)}</text>'
        )
        legend_x += 24 + 8 * len(name)
    if not any(totals):
        parts.append(
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="axis">'
            "no usage in this period</text>"
        )
    parts.append("</svg>")
    return "".join(parts)

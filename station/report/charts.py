"""Vector charts of a batch report, as inline SVG (HTML and PDF draw the same markup).

Each chart is made for any batch size: the throughput chart is the cumulative
count of verified boards over line time (a curve of at most ``MAX_POINTS``
points, whether 8 boards or 100,000), the cycle-time histogram picks its bin
count from the number of boards, and failures are one bar per reason. Every
text that came from the ledger is escaped.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from html import escape

MAX_POINTS = 240
W, H = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 24, 40


def _nice_step(span: float, ticks: int = 5) -> float:
    if span <= 0:
        return 1.0
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 3 * 3600:
        return 3600.0, "hours"
    if seconds >= 180:
        return 60.0, "minutes"
    return 1.0, "seconds"


def seconds_text(v: float) -> str:
    """A duration for a label: ms under a second, else seconds, minutes or hours."""
    if v < 1:
        return f"{v * 1000:.0f} ms"
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.2f} h"


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:g}"


# Presentation attributes, not CSS classes: WeasyPrint's SVG renderer and every
# browser read these, whatever the page's stylesheet says.
_FONT = 'font-family="DejaVu Sans, Noto Sans CJK SC, sans-serif"'
_STYLE = {
    'class="t"': f'font-size="13" font-weight="bold" fill="#1a202c" {_FONT}',
    'class="l"': f'font-size="11" fill="#2d3748" {_FONT}',
    'class="k"': f'font-size="10" fill="#2d3748" {_FONT}',
    'class="a"': 'stroke="#2d3748" stroke-width="1"',
    'class="g"': 'stroke="#e2e8f0" stroke-width="1"',
    'class="c"': 'fill="none" stroke="#2b6cb0" stroke-width="2"',
    'class="b"': 'fill="#2f855a"',
    'class="f"': 'fill="#c53030"',
    'class="m"': 'stroke="#1a202c" stroke-dasharray="4 3"',
    'class="p"': 'stroke="#1a202c" stroke-dasharray="1 2"',
}


def _styled(svg: str) -> str:
    for cls, attrs in _STYLE.items():
        svg = svg.replace(cls, attrs)
    return svg


def _frame(title: str, xlabel: str, ylabel: str, body: list[str], label: str, h: int = H) -> str:
    return _styled(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {W} {h}" '
        f'role="img" aria-label="{escape(label)}">'
        f'<text x="{LEFT}" y="15" class="t">{escape(title)}</text>'
        + "".join(body)
        + f'<text x="{(LEFT + W - RIGHT) / 2}" y="{h - 6}" text-anchor="middle" class="l">'
        f"{escape(xlabel)}</text>"
        f'<text transform="translate(14 {(TOP + h - BOTTOM) / 2}) rotate(-90)" '
        f'text-anchor="middle" class="l">{escape(ylabel)}</text></svg>'
    )


def _axes(xmax: float, ymax: float) -> tuple[list[str], float, float]:
    """Axes lines and ticks; returns (svg parts, x scale, y scale)."""
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    xmax = xmax or 1.0
    ymax = ymax or 1.0
    sx, sy = pw / xmax, ph / ymax
    x0, y0 = LEFT, H - BOTTOM
    parts = [
        f'<line x1="{x0}" y1="{y0}" x2="{W - RIGHT}" y2="{y0}" class="a"/>',
        f'<line x1="{x0}" y1="{TOP}" x2="{x0}" y2="{y0}" class="a"/>',
    ]
    step = _nice_step(ymax)
    v = 0.0
    while v <= ymax + 1e-9:
        y = y0 - v * sy
        parts.append(f'<line x1="{x0 - 3}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" class="g"/>')
        parts.append(
            f'<text x="{x0 - 5}" y="{y + 3:.1f}" text-anchor="end" class="k">{_fmt(v)}</text>'
        )
        v += step
    step = _nice_step(xmax)
    v = 0.0
    while v <= xmax + 1e-9:
        x = x0 + v * sx
        parts.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 3}" class="a"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{y0 + 14}" text-anchor="middle" class="k">'
            f"{_fmt(round(v, 6))}</text>"
        )
        v += step
    return parts, sx, sy


def throughput_svg(verified_offsets: Sequence[float] | array[float]) -> str:
    """Cumulative boards verified against line time (from the first enrolment)."""
    title = "Boards verified over line time"
    if not len(verified_offsets):
        return _frame(title, "line time", "boards", [_empty("no board verified yet")], title)
    xs = sorted(verified_offsets)
    n = len(xs)
    unit, name = _time_unit(xs[-1])
    span = max(xs[-1] / unit, 1e-9)
    parts, sx, sy = _axes(span, float(n))
    step = max(1, n // MAX_POINTS)
    pts = [(0.0, 0)]
    for i in range(step - 1, n, step):
        pts.append((xs[i] / unit, i + 1))
    if pts[-1][1] != n:
        pts.append((xs[-1] / unit, n))
    path = " ".join(f"{LEFT + x * sx:.1f},{H - BOTTOM - y * sy:.1f}" for x, y in pts)
    parts.append(f'<polyline points="{path}" class="c"/>')
    return _frame(title, f"line time ({name}) since the first enrolment", "boards", parts, title)


def histogram_svg(
    values: Sequence[float] | array[float], median: float | None, p90: float | None
) -> str:
    """Boards per cycle-time bin, from zero to the longest; sqrt(n) bins, 5 to 40."""
    title = "Cycle time per board (enrolment to verification)"
    if not len(values):
        return _frame(title, "seconds", "boards", [_empty("no cycle time yet")], title)
    hi = max(values) or 1.0
    bins = max(5, min(40, int(math.sqrt(len(values)))))
    width = hi / bins
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int(v / width))] += 1
    unit, name = (0.001, "milliseconds") if hi < 1 else (1.0, "seconds")
    parts, sx, sy = _axes(hi / unit, float(max(counts)))
    sx /= unit  # from here on x is in seconds
    for i, c in enumerate(counts):
        if c:
            bar_w = max(width * sx - 1, 0.5)
            parts.append(
                f'<rect x="{LEFT + i * width * sx:.1f}" y="{H - BOTTOM - c * sy:.1f}" '
                f'width="{bar_w:.1f}" height="{c * sy:.1f}" class="b"/>'
            )
    for value, label, cls, dy in ((median, "median", "m", 10), (p90, "p90", "p", 22)):
        if value is not None:
            x = LEFT + value * sx
            parts.append(
                f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" class="{cls}"/>'
                f'<text x="{x + 3:.1f}" y="{TOP + dy}" class="k">'
                f"{label} {seconds_text(value)}</text>"
            )
    return _frame(title, name, "boards", parts, title)


def failures_svg(groups: Sequence[tuple[str, int]]) -> str:
    title = "Failed boards by reason"
    if not groups:
        return _frame(title, "boards", "", [_empty("no board failed")], title)
    top = list(groups[:8])
    most = max(c for _, c in top)
    bar_h = 16.0
    h = int(TOP + 8 + len(top) * (bar_h + 4) + BOTTOM)
    sx = (W - 220 - RIGHT) / most
    parts = []
    for i, (code, count) in enumerate(top):
        y = TOP + 4 + i * (bar_h + 4)
        base = y + bar_h * 0.75
        parts.append(
            f'<text x="212" y="{base:.1f}" text-anchor="end" class="k">{escape(code)}</text>'
            f'<rect x="218" y="{y:.1f}" width="{max(count * sx, 1):.1f}" '
            f'height="{bar_h:.1f}" class="f"/>'
            f'<text x="{222 + count * sx:.1f}" y="{base:.1f}" class="k">{count}</text>'
        )
    return _frame(title, "boards now failed", "", parts, title, h)


def _empty(text: str) -> str:
    return f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="l">{escape(text)}</text>'

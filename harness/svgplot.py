"""Small charts written straight as SVG text for report.html: lines on a log y axis (error per denoising step) and
bars with an optional reference line (weight SQNR per layer, the gate's floor). Pure functions of their data: no
state, no plotting library (matplotlib's text layout cost ~0.2 s a plot, 8 s of a smoke sweep's ~60 s).

What cannot be drawn is skipped, never raised on: NaN and inf anywhere, zero and negative values on the log axis.
Every text is escaped and stripped of characters XML forbids, so any title gives a document that parses.
The root carries width, height and a viewBox, so a browser sizes it as an <img>."""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from typing import Sequence

# matplotlib's default cycle and dash styles, so the report reads as it did before.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
DASHES = ("", "6 3", "1.5 2.5", "6 2.5 1.5 2.5")  # SVG stroke-dasharray: solid, dashed, dotted, dash-dot

FONT = 11  # px; tick labels and legend, the title one larger
_CHAR = 0.58  # a sans-serif character's mean advance, in em: text is measured by estimate, there is no renderer
_MARGIN = dict(left=64, right=14, bottom=40, top=10)  # top: above the title and legend rows, which add their own
_ROW = FONT + 5  # a legend row's height
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class Series:
    """One line: x and y of equal length; a point with a non-finite coordinate is a gap in the line."""
    x: Sequence[float]
    y: Sequence[float]
    colour: str = PALETTE[0]
    dash: str = ""  # stroke-dasharray, "" for solid
    label: str | None = None  # shown in the legend; several series may share a style and label one of them
    markers: bool = True
    opacity: float = 0.85


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode()


def log_lines(series: Sequence[Series], title: str, xlabel: str, ylabel: str, width: int = 640,
              height: int = 320, integer_x: bool = True) -> str:
    """Lines on a log y axis with decade ticks (10^k) and, where they fit, x ticks on integers only."""
    kept = [[(x, y) if _finite(x) and _finite(y) and y > 0 else None for x, y in zip(s.x, s.y)] for s in series]
    points = [p for line in kept for p in line if p is not None]
    legend = [(s.colour, s.dash, s.markers, s.label) for s in series if s.label is not None]
    plot = _Area(width, height, title, legend)
    if not points:
        return plot.finish(_empty(plot, xlabel, ylabel))
    xs, logs = [p[0] for p in points], [math.log10(p[1]) for p in points]
    x0, x1 = _padded(min(xs), max(xs))
    # Whole decades; a value on a decade gets the next one beyond it so that it does not sit on the frame.
    d0, d1 = math.floor(min(logs) - 0.01), math.ceil(max(logs) + 0.01)
    sx, sy = plot.x_scale(x0, x1), plot.y_scale(d0, d1)
    body = plot.frame(_ticks(x0, x1, integer_x), sx, _fmt_tick, _decades(d0, d1), sy, _fmt_decade,
                      minor=_minor_decades(d0, d1), xlabel=xlabel, ylabel=ylabel)
    for s, line in zip(series, kept):
        segments, run = [], []
        for p in line + [None]:
            if p is not None:
                run.append(f"{sx(p[0]):.1f},{sy(math.log10(p[1])):.1f}")
            elif run:
                segments.append(run)
                run = []
        if not segments:
            continue
        style = f'stroke="{_attr(s.colour)}" stroke-opacity="{s.opacity:g}" fill="none"'
        dash = f' stroke-dasharray="{_attr(s.dash)}"' if s.dash else ""
        d = " ".join("M" + " L".join(seg) for seg in segments)
        body.append(f'<path class="line" d="{d}" {style} stroke-width="1.2"{dash}/>')
        if s.markers:  # zero-length subpaths with round caps: one element draws every dot
            dots = " ".join(f"M{pt}h0" for seg in segments for pt in seg)
            body.append(f'<path class="markers" d="{dots}" {style} stroke-width="5" stroke-linecap="round"/>')
    return plot.finish(body)


def bars(values: Sequence[float], title: str, xlabel: str, ylabel: str, reference: float | None = None,
         reference_label: str | None = None, colour: str = PALETTE[0], reference_colour: str = PALETTE[3],
         width: int = 640, height: int = 300) -> str:
    """One bar per value in the order given, from zero; a non-finite value leaves its slot empty. reference, if
    finite, is drawn as a dashed horizontal line (with reference_label in the legend)."""
    values = [float(v) if _finite(v) else None for v in values]
    shown = [v for v in values if v is not None]
    has_ref = reference is not None and _finite(reference)
    legend = [(reference_colour, DASHES[1], False, reference_label)] if has_ref and reference_label else []
    plot = _Area(width, height, title, legend)
    if not shown and not has_ref:
        return plot.finish(_empty(plot, xlabel, ylabel))
    span = [0.0, *shown] + ([reference] if has_ref else [])
    lo, hi = min(span), max(span)
    if hi - lo <= 0:
        hi = lo + 1.0
    # Round outwards to whole ticks, one tick beyond a value that falls on one, so no bar ends on the frame.
    step = _step(hi - lo, 6)
    lo = 0.0 if lo == 0 else math.floor(lo / step - 1e-9) * step
    hi = 0.0 if hi == 0 else math.ceil(hi / step + 1e-9) * step
    n = max(len(values), 1)
    sx, sy = plot.x_scale(0, n), plot.y_scale(lo, hi)
    x_ticks = [t for t in _ticks(0, n - 1, True) if t < n] if len(values) > 1 else [0]
    body = plot.frame([t + 0.5 for t in x_ticks], sx, lambda t: _fmt_tick(t - 0.5), _ticks(lo, hi, False), sy,
                      _fmt_tick, xlabel=xlabel, ylabel=ylabel)
    w = sx(1) - sx(0)
    for i, v in enumerate(values):
        if v is not None:
            top, bottom = sorted((sy(v), sy(0.0)))
            body.append(f'<rect class="bar" x="{sx(i):.2f}" y="{top:.2f}" width="{w:.2f}" '
                        f'height="{bottom - top:.2f}" fill="{_attr(colour)}"/>')
    if has_ref:
        body.append(f'<line class="reference" x1="{plot.left}" x2="{plot.right}" y1="{sy(reference):.2f}" '
                    f'y2="{sy(reference):.2f}" stroke="{_attr(reference_colour)}" stroke-width="1.2" '
                    f'stroke-dasharray="{DASHES[1]}"/>')
    return plot.finish(body)


# ---------------------------------------------------------------- layout

class _Area:
    """The page: title and legend rows on top, the plot area below them, axes' labels in the margins."""

    def __init__(self, width: int, height: int, title: str, legend: list[tuple]):
        self.width, self.height = width, height
        self.title = _clip(title, width - 16, FONT + 1)
        self.legend_rows = _legend_rows(legend, width - 2 * _MARGIN["right"])
        self.title_y = _MARGIN["top"] + FONT + 1 if self.title else _MARGIN["top"] - 6
        self.legend_y = [self.title_y + 6 + _ROW * (i + 0.5) for i in range(len(self.legend_rows))]  # row centres
        self.top = round((self.legend_y[-1] + _ROW / 2 if self.legend_y else self.title_y) + 8)
        self.left, self.right = _MARGIN["left"], width - _MARGIN["right"]
        self.bottom = height - _MARGIN["bottom"]

    def x_scale(self, lo: float, hi: float):
        return lambda v: self.left + (v - lo) / (hi - lo) * (self.right - self.left)

    def y_scale(self, lo: float, hi: float):
        return lambda v: self.bottom - (v - lo) / (hi - lo) * (self.bottom - self.top)  # SVG's y grows downwards

    def frame(self, x_ticks, sx, x_fmt, y_ticks, sy, y_fmt, xlabel: str, ylabel: str, minor=()) -> list[str]:
        """Grid, box, tick labels and axis labels. x_fmt gives plain text; y_fmt gives SVG markup (a decade's
        raised exponent), so it must escape anything it did not build itself."""
        out = ['<g stroke="#e4e4e4" stroke-width="1">']
        out += [f'<line x1="{self.left}" x2="{self.right}" y1="{sy(m):.1f}" y2="{sy(m):.1f}" stroke="#f2f2f2"/>'
                for m in minor]
        out += [f'<line x1="{self.left}" x2="{self.right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>' for t in y_ticks]
        out += [f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{self.top}" y2="{self.bottom}"/>' for t in x_ticks]
        out.append("</g>")
        out.append(f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
                    f'height="{self.bottom - self.top}" fill="none" stroke="#555"/>')
        out += [_text(sx(t), self.bottom + FONT + 3, x_fmt(t), anchor="middle") for t in x_ticks]
        out += [_text(self.left - 5, sy(t) + FONT * 0.35, y_fmt(t), anchor="end", raw=True) for t in y_ticks]
        out.append(_text((self.left + self.right) / 2, self.height - 8, xlabel, anchor="middle"))
        mid = (self.top + self.bottom) / 2
        out.append(_text(14, mid, ylabel, anchor="middle", extra=f' transform="rotate(-90 14 {mid:.1f})"'))
        return out

    def finish(self, body: list[str]) -> str:
        head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" font-family="system-ui, sans-serif" font-size="{FONT}" '
                f'fill="#222">', f'<rect width="{self.width}" height="{self.height}" fill="#fff"/>']
        if self.title:  # a title near the width starts at the left: if wider than estimated, its end is cut
            long = _width(self.title, FONT + 1) > 0.8 * (self.width - 16)
            head.append(_text(8 if long else self.width / 2, self.title_y, self.title,
                              anchor="start" if long else "middle", extra=f' font-size="{FONT + 1}"'))
        for row, y in zip(self.legend_rows, self.legend_y):
            head += _legend_row(row, self.width - _MARGIN["right"], y)
        return "\n".join(head + body + ["</svg>"]) + "\n"


def _legend_rows(entries: list[tuple], room: float) -> list[list[tuple]]:
    """Legend entries laid out in right-aligned rows above the plot, where they can never hide a line."""
    rows: list[list[tuple]] = []
    used = room + 1
    for colour, dash, marker, label in entries:
        label = _clip(label, room - 40, FONT)
        w = 34 + _width(label, FONT) + 14
        if used + w > room:
            rows.append([])
            used = 0
        rows[-1].append((colour, dash, marker, label, w))
        used += w
    return rows


def _legend_row(row: list[tuple], right: float, y: float) -> list[str]:
    x = right - sum(e[-1] for e in row) + 14
    out = []
    for colour, dash, marker, label, w in row:
        dash_attr = f' stroke-dasharray="{_attr(dash)}"' if dash else ""
        out.append(f'<line x1="{x:.1f}" x2="{x + 28:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{_attr(colour)}" '
                   f'stroke-width="1.5"{dash_attr}/>')
        if marker:
            out.append(f'<circle cx="{x + 14:.1f}" cy="{y:.1f}" r="2.5" fill="{_attr(colour)}"/>')
        out.append(_text(x + 34, y + FONT * 0.35, label, anchor="start"))
        x += w
    return out


def _empty(plot: _Area, xlabel: str, ylabel: str) -> list[str]:
    body = plot.frame([], None, str, [], None, str, xlabel=xlabel, ylabel=ylabel)
    body.append(_text((plot.left + plot.right) / 2, (plot.top + plot.bottom) / 2, "no finite values to draw",
                      anchor="middle", extra=' fill="#888"'))
    return body


# ---------------------------------------------------------------- ticks and text

def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):  # None, pd.NA: a missing value is a gap like NaN
        return False


def _padded(lo: float, hi: float) -> tuple[float, float]:
    if hi <= lo:
        return lo - 1.0, hi + 1.0
    pad = 0.04 * (hi - lo)
    return lo - pad, hi + pad


def _step(span: float, count: int, integer: bool = False) -> float:
    """1, 2 or 5 x 10^k: the smallest such step that puts at most `count` intervals on span."""
    raw = span / count
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    return max(step, 1.0) if integer else step


def _ticks(lo: float, hi: float, integer: bool, count: int = 8) -> list[float]:
    step = _step(max(hi - lo, 1e-12), count, integer)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _decades(d0: int, d1: int) -> list[int]:
    stride = max(1, math.ceil((d1 - d0) / 8))  # at most ~9 labels: 15 decades of error get every second one
    return [d for d in range(d0, d1 + 1) if d % stride == 0]


def _minor_decades(d0: int, d1: int) -> list[float]:
    if d1 - d0 > 6:
        return []
    return [d + math.log10(m) for d in range(d0, d1) for m in range(2, 10)]


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-9 else "0"


def _fmt_decade(d: int) -> str:
    """10 with the exponent raised (a tspan; text already escaped: only digits and a minus sign)."""
    exponent = f"{d}".replace("-", "\u2212")
    return f'10<tspan dy="-{FONT * 0.45:.1f}" font-size="{FONT - 2}">{exponent}</tspan>'


def _width(text: str, size: float) -> float:
    return len(text) * size * _CHAR


def _clip(text: str | None, room: float, size: float) -> str:
    text = _NOT_XML.sub("", str(text or ""))
    most = max(int(room / (size * _CHAR)), 4)
    return text if len(text) <= most else text[: most - 1] + "\u2026"


def _attr(value: str) -> str:
    return html.escape(_NOT_XML.sub("", str(value)), quote=True)


def _text(x: float, y: float, text: str, anchor: str, extra: str = "", raw: bool = False) -> str:
    body = text if raw else html.escape(_NOT_XML.sub("", text), quote=False)
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{body}</text>'

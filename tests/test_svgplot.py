"""harness/svgplot.py and the report's two plots: the SVG parses, draws one line per sample and one bar per layer
where their values say (log axis upwards, bars worst first, the floor at its height), skips what cannot be drawn,
and escapes any text."""
from __future__ import annotations

import base64
import math
import re
import xml.etree.ElementTree as ET

import pandas as pd
import pytest

import report_fixtures as F
from harness import html_report, svgplot
from harness.schema import ENGINE_VS_REFERENCE, ENGINE_VS_UNQUANTIZED

NS = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    if svg.startswith("data:"):
        prefix = "data:image/svg+xml;base64,"
        assert svg.startswith(prefix)
        svg = base64.b64decode(svg[len(prefix):]).decode()
    return ET.fromstring(svg)


def elements(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(NS + tag) if e.get("class") == cls]


def points(path: ET.Element) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"(-?[\d.]+),(-?[\d.]+)", path.get("d"))]


def frame_box(root: ET.Element) -> tuple[float, float, float, float]:
    """left, top, right, bottom of the plot area (the unfilled rect with a stroke)."""
    box = next(r for r in root.iter(NS + "rect") if r.get("fill") == "none")
    x, y, w, h = (float(box.get(k)) for k in ("x", "y", "width", "height"))
    return x, y, x + w, y + h


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(NS + "text")]


def test_log_lines_one_line_per_series_and_sized_for_a_browser():
    series = [svgplot.Series([0, 1, 2], [1e-4, 2e-4, 3e-4], label="a"), svgplot.Series([0, 1, 2], [1e-5, 1e-5, 2e-5])]
    root = parse(svgplot.log_lines(series, "t", "step", "err"))
    assert len(elements(root, "path", "line")) == 2 and len(elements(root, "path", "markers")) == 2
    assert float(root.get("width")) >= 300 and float(root.get("height")) > 0
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    assert "a" in texts(root) and "t" in texts(root)


def test_log_axis_puts_larger_errors_higher_and_decades_evenly():
    root = parse(svgplot.log_lines([svgplot.Series([0, 1, 2], [1e-5, 1e-4, 1e-3])], "t", "step", "err"))
    (x0, y0), (x1, y1), (x2, y2) = points(elements(root, "path", "line")[0])
    assert y2 < y1 < y0  # SVG's y grows downwards: 1e-3 is drawn above 1e-5
    assert x0 < x1 < x2
    assert y0 - y1 == pytest.approx(y1 - y2, abs=0.15)  # a decade is a decade: the axis is logarithmic
    # The decade tick labels sit at the points' heights (10^-4 is the middle point).
    labels = {"".join(t.itertext()): float(t.get("y")) for t in root.iter(NS + "text")}
    assert labels["10\u22124"] == pytest.approx(y1 + svgplot.FONT * 0.35, abs=0.15)


def test_integer_step_ticks():
    root = parse(svgplot.log_lines([svgplot.Series([0, 1, 2, 3], [1e-3] * 4)], "t", "step", "err"))
    assert {"0", "1", "2", "3"} <= set(texts(root)) and "0.5" not in texts(root)


def test_non_finite_and_non_positive_values_are_skipped():
    nan, inf = math.nan, math.inf
    s = svgplot.Series([0, 1, 2, 3, 4, 5, nan], [1e-4, nan, inf, 0.0, -1.0, 1e-3, 1e-2])
    root = parse(svgplot.log_lines([s, svgplot.Series([0], [nan])], "t", "step", "err"))
    (line,) = elements(root, "path", "line")  # the all-NaN series draws nothing
    assert len(points(line)) == 2 and line.get("d").count("M") == 2  # two points, with a gap between them
    nothing = parse(svgplot.log_lines([svgplot.Series([0, 1], [nan, 0.0])], "t", "step", "err"))
    assert elements(nothing, "path", "line") == [] and "no finite values to draw" in texts(nothing)
    bars = parse(svgplot.bars([1.0, nan, inf, 2.0, pd.NA], "t", "layer", "dB"))
    rects = elements(bars, "rect", "bar")
    assert len(rects) == 2
    width = float(rects[0].get("width"))
    assert float(rects[1].get("x")) - float(rects[0].get("x")) == pytest.approx(3 * width, abs=0.05)  # slot kept


@pytest.mark.parametrize("ys", [[3e-4], [2e-4, 2e-4, 2e-4], [1e-3, 1e-3], [1e-16, 1e-1],
                                [10.0 ** -k for k in range(17)]],
                         ids=["single point", "all equal", "equal on a decade", "15 decades", "17 decades"])
def test_every_point_lands_inside_the_plot_area(ys):
    root = parse(svgplot.log_lines([svgplot.Series(list(range(len(ys))), ys)], "t", "step", "err"))
    left, top, right, bottom = frame_box(root)
    pts = points(elements(root, "path", "markers")[0])
    assert len(pts) == len(ys)
    assert all(left < x < right and top < y < bottom for x, y in pts)
    decades = [t for t in root.iter(NS + "text") if t.find(NS + "tspan") is not None]  # 10 and a raised exponent
    assert 2 <= len(decades) <= 10


def test_text_is_escaped():
    title = 'a <b> & "c" \x01 </svg>' + "w" * 300
    series = [svgplot.Series([0, 1], [1e-3, 1e-2], label="<&>", colour='red" onload="x')]
    root = parse(svgplot.log_lines(series, title, "<x>", "&y"))
    assert texts(root)[0].startswith('a <b> & "c"  </svg>ww')  # the title, less the control character
    assert elements(root, "path", "line")[0].get("stroke") == 'red" onload="x'  # an attribute cannot be broken out of
    assert {"<&>", "<x>", "&y"} <= set(texts(root))
    root = parse(svgplot.bars([1.0], title, "l", "d", reference=0.5, reference_label="<floor & more>"))
    assert "<floor & more>" in texts(root)


def test_bars_from_zero_with_the_reference_line_at_its_value():
    root = parse(svgplot.bars([10.0, 20.0, 30.0], "t", "layer", "dB", reference=15.0, reference_label="floor"))
    rects = elements(root, "rect", "bar")
    assert len(rects) == 3
    tops = [float(r.get("y")) for r in rects]
    bottoms = {round(float(r.get("y")) + float(r.get("height")), 2) for r in rects}
    assert len(bottoms) == 1  # every bar starts at zero
    zero = bottoms.pop()
    assert [zero - t for t in tops] == pytest.approx([k * (zero - tops[0]) for k in (1, 2, 3)], abs=0.05)
    (line,) = elements(root, "line", "reference")
    assert float(line.get("y1")) == pytest.approx((tops[0] + tops[1]) / 2, abs=0.05)  # 15 dB: between 10 and 20
    assert "floor" in texts(root)
    assert elements(parse(svgplot.bars([1.0], "t", "l", "d", reference=math.nan)), "line", "reference") == []


def test_weight_plot_is_worst_first_with_the_floor():
    layers = pd.DataFrame({"layer": [f"l{i}" for i in range(5)], "sqnr_db": [33.0, 31.7, 35.2, 32.5, 34.0]})
    root = parse(html_report.weight_plot(layers, 32.0, "cell <1>"))
    rects = elements(root, "rect", "bar")
    assert len(rects) == 5
    xs = [float(r.get("x")) for r in rects]
    heights = [float(r.get("height")) for r in rects]
    assert xs == sorted(xs) and heights == sorted(heights)  # left to right, lowest SQNR first
    (line,) = elements(root, "line", "reference")
    assert float(rects[0].get("y")) > float(line.get("y1")) > float(rects[1].get("y"))  # 31.7 < 32 < 32.5
    assert "floor 32 dB" in texts(root) and "cell <1>" in texts(root)
    assert elements(parse(html_report.weight_plot(layers, None, "c")), "line", "reference") == []


def test_trajectory_plot_lines_styles_and_exact_runs():
    rows = F.results()
    curves = rows[(rows["metric"] == "trajectory_cosine") & (rows["quant"] == "fp8")]
    root = parse(html_report.trajectory_plot(curves, "fp8 <cell>"))
    lines = elements(root, "path", "line")
    assert len(lines) == 4  # 2 comparisons x 2 seeds, one prompt
    assert all(len(points(p)) == 4 for p in lines)
    assert len({p.get("stroke-dasharray") for p in lines}) == 2  # coinciding comparisons stay told apart
    assert len({p.get("stroke") for p in lines}) == 2
    legend = [t for t in texts(root) if t in (ENGINE_VS_REFERENCE, ENGINE_VS_UNQUANTIZED)]
    assert sorted(legend) == [ENGINE_VS_REFERENCE, ENGINE_VS_UNQUANTIZED]  # one entry per comparison
    exact = rows[(rows["metric"] == "trajectory_cosine") & (rows["quant"] == "none")]
    assert len(exact) and html_report.trajectory_plot(exact, "fp32") is None

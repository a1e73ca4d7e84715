"""report.html: one self-contained page per run (no network): the verdict first, then per cell its thresholds
with margins, engine and reference images side by side with an amplified difference map, the per-step trajectory
curves, and for quant cells the per-layer weight SQNR worst first. Images are inlined as base64 PNG and plots as
base64 SVG; an image file too large to inline is linked by its path inside the run folder instead.

Media are (B, H, W, 3) images or (B, F, H, W, 3) videos. On disk a run stores one PNG per sample side, or one
per frame (`..._f<j>_engine.png`); frames are laid out side by side. Plots are SVG text written by
harness/svgplot.py (a smoke report's 24 plots take ~0.1 s; matplotlib's took 4-8 s), the difference map's
colours a table: rendering imports no plotting library and changes no global state."""
from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from harness import svgplot, tables
from harness.gate import GateResult
from harness.runfiles import IMAGES_DIR, REPORT_HTML, WEIGHTS_CSV, atomic_write, cell_label, fmt, load_meta

DIFF_GAIN = 8  # |engine - reference| x 8: a 1/255 difference shows as 8/255, a 32/255 one saturates
INLINE_MAX_BYTES = 256 * 1024  # larger image files are linked, not inlined (a full-size sweep has hundreds)
_PAIR = re.compile(r"^(?P<sample>.+?)(?:_f(?:rame)?(?P<frame>\d+))?_(?P<side>engine|reference)\.png$")
_SIDES = ("engine", "reference")


# ---------------------------------------------------------------- media

def as_frames(media: np.ndarray) -> list[list[np.ndarray]]:
    """(B, H, W, 3) or (B, F, H, W, 3) uint8 -> per sample, its list of (H, W, 3) frames."""
    media = np.asarray(media)
    if media.ndim == 4:
        media = media[:, None]
    if media.ndim != 5 or media.shape[-1] != 3:
        raise ValueError(f"media must be (B, H, W, 3) or (B, F, H, W, 3), got shape {media.shape}")
    return [list(sample) for sample in media]


def diff_map(engine: np.ndarray, reference: np.ndarray, gain: int = DIFF_GAIN) -> np.ndarray:
    """|engine - reference|, max over channels, times gain, through the magma colour map: (H, W, 3) uint8."""
    if engine.shape != reference.shape:
        raise ValueError(f"engine {engine.shape} and reference {reference.shape} images differ in shape")
    d = np.abs(engine.astype(np.int16) - reference.astype(np.int16)).max(axis=-1)
    return _MAGMA[np.clip(d * gain, 0, 255)]


def _magma_table() -> np.ndarray:
    stops = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in _MAGMA_STOPS.split()], dtype=float)
    at = np.linspace(0, 255, len(stops))
    return np.stack([np.interp(np.arange(256), at, stops[:, c]) for c in range(3)], -1).round().astype(np.uint8)


# matplotlib's magma at 17 even stops, interpolated to 256 levels (within 3/255 of the full map): importing
# matplotlib for it took 0.4 s, as long as the rest of a smoke report's render once the plots were SVG.
_MAGMA_STOPS = ("000004 0a0822 1d1147 36106b 51127c 6a1c81 832681 9c2e7f b73779 d0416f e75263 f56b5c fc8961 fea772 "
                "fec488 fde2a3 fcfdbf")
_MAGMA = _magma_table()


def find_media(cell_dir: Path) -> dict[str, list[dict[str, Path]]]:
    """Sample name -> its frames in order, each {'engine': path, 'reference': path}. Unpaired files are skipped
    by the caller's count (a sample with one side only is reported, not drawn)."""
    found: dict[str, dict[int, dict[str, Path]]] = {}
    for path in sorted(cell_dir.glob("*.png")) if cell_dir.is_dir() else []:
        m = _PAIR.match(path.name)
        if m:
            frame = int(m["frame"]) if m["frame"] is not None else 0
            found.setdefault(m["sample"], {}).setdefault(frame, {})[m["side"]] = path
    return {s: [frames[f] for f in sorted(frames)] for s, frames in sorted(found.items(), key=lambda kv: _natural(kv[0]))}


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(src: str, alt: str, cls: str = "media") -> str:
    return f'<img class="{cls}" src="{html.escape(src, quote=True)}" alt="{html.escape(alt, quote=True)}">'


def _file_src(path: Path, run_dir: Path) -> str:
    if path.stat().st_size <= INLINE_MAX_BYTES:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return path.relative_to(run_dir).as_posix()


# ---------------------------------------------------------------- plots

def trajectory_plot(curves: pd.DataFrame, title: str) -> str | None:
    """1 - trajectory_cosine per step (log scale), one line per sample, one colour per comparison, as an SVG data
    URI. None when every value is exact (nothing to draw on a log axis; the caller says 'bitwise equal')."""
    # Only the columns drawn: a results frame is ~40 columns wide, and grouping it whole cost 50 ms a plot.
    ok = curves.loc[curves["status"].eq("ok") & curves["value"].notna(),
                    ["comparison", "seed", "prompt_idx", "step", "value"]]
    if ok.empty or (1.0 - ok["value"]).max() <= 0:
        return None
    # Colour and dash per comparison: equal curves (an unquantized engine bitwise equal to diffusers makes
    # engine_vs_reference and engine_vs_unquantized coincide) stay visible on top of each other.
    comparisons = sorted(ok["comparison"].unique())
    styles = {c: (svgplot.PALETTE[i % len(svgplot.PALETTE)], svgplot.DASHES[i % len(svgplot.DASHES)])
              for i, c in enumerate(comparisons)}
    steps, err = ok["step"].to_numpy(dtype=float), np.clip(1.0 - ok["value"].to_numpy(dtype=float), 1e-16, None)
    series, labelled = [], set()
    # Groups in sorted order: each comparison's first is its first (seed, prompt), the curve that carries the label.
    samples = ok.groupby(["comparison", "seed", "prompt_idx"], sort=True, dropna=False).indices
    for (comparison, _, _), at in samples.items():
        at = at[np.argsort(steps[at], kind="stable")]
        colour, dash = styles[comparison]
        label = None if comparison in labelled else comparison
        labelled.add(comparison)
        series.append(svgplot.Series(steps[at], err[at], colour, dash, label=label))  # exact steps sit at 1e-16
    return svgplot.data_uri(svgplot.log_lines(series, title, "denoising step", "1 - trajectory cosine"))


def weight_plot(layers: pd.DataFrame, floor: float | None, title: str) -> str:
    """Per-layer weight SQNR, worst first (lowest dB on the left), with the gate's floor, as an SVG data URI."""
    values = layers.sort_values("sqnr_db")["sqnr_db"].to_numpy(dtype=float)
    label = f"floor {floor:g} dB" if floor is not None and math.isfinite(floor) else None
    return svgplot.data_uri(svgplot.bars(values, title, f"layer, worst first ({len(layers)} quantized linears)",
                                         "weight SQNR (dB)", reference=floor, reference_label=label, height=300))


# ---------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
.verdict{font-size:1.6em;padding:.5em .8em;border-radius:6px;color:#fff;display:inline-block}
.PASS{background:#2e7d32}.FAIL{background:#c62828}.ERROR{background:#6a1b9a}.NOTGATED{background:#757575}
td.PASS,td.FAIL{color:#fff;font-weight:bold;text-align:center}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3}img.media{width:192px;image-rendering:pixelated;border:1px solid #999}
img.plot{max-width:640px;border:1px solid #ddd}.cell{border-top:3px solid #ccc;margin-top:1.5em}
.note{color:#555;font-size:.85em}figure{display:inline-block;margin:.2em;text-align:center}
figcaption{font-size:.75em}
"""


def render(run_dir: str | Path, results: pd.DataFrame, result: GateResult | None, meta: dict | None = None) -> str:
    run_dir = Path(run_dir)
    meta = meta if meta is not None else load_meta(run_dir)
    results = results.assign(cell=cell_label(results))
    metrics = tables.per_metric(result.rows) if result is not None else pd.DataFrame(columns=tables.METRIC_COLUMNS)
    regressed = result.regressed if result is not None else None
    weights = pd.read_csv(run_dir / WEIGHTS_CSV) if (run_dir / WEIGHTS_CSV).is_file() else None
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>parity {html.escape(str(meta.get('run_id', '')))}"
             f"</title><style>{_CSS}</style></head><body>", _verdict(result, meta)]
    cells = sorted(results["cell"].unique(), key=_natural)
    parts.append(_index(cells, metrics, regressed))
    for i, cell in enumerate(cells):
        parts.append(_cell_section(i, cell, run_dir, results[results["cell"] == cell],
                                   metrics[metrics["cell"] == cell], regressed, weights))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(run_dir: str | Path, results: pd.DataFrame, result: GateResult | None, meta: dict | None = None) -> Path:
    path = Path(run_dir) / REPORT_HTML
    text = render(run_dir, results, result, meta)
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path


def _verdict(result: GateResult | None, meta: dict) -> str:
    word = result.verdict if result is not None else "NOT GATED"
    counts = html.escape(result.counts()) if result is not None else "run `parity gate RUN_DIR` to judge this run"
    out = [f"<h1>parity run {html.escape(str(meta.get('run_id', '')))}</h1>",
           f"<div id='verdict' class='verdict {word.replace(' ', '')}'>{word}</div> <span>{counts}</span>"]
    if result is not None:
        out.append(f"<p class='note'>thresholds: {html.escape(str(result.thresholds_path))}; "
                   f"{html.escape(result.baseline_note)}</p>")
        out += [f"<p class='FAIL verdict' style='font-size:1em'>error: {html.escape(e)}</p>" for e in result.errors]
    facts = ", ".join(f"{k} {meta[k]}" for k in ("suite", "time", "torch_version", "diffusers_version",
                                                 "parity_git", "clip_model") if k in meta)
    out.append(f"<p class='note'>{html.escape(facts)}</p>")
    if meta.get("clip_semantic") is False:
        out.append("<p class='note'><b>Non-semantic CLIP</b>: CLIP scores check plumbing, not image content.</p>")
    return "\n".join(out)


def _index(cells, metrics: pd.DataFrame, regressed) -> str:
    lines = tables.per_cell(metrics, regressed).set_index("cell") if len(metrics) else None
    rows = []
    for i, cell in enumerate(cells):
        if lines is not None and cell in lines.index:
            r = lines.loc[cell]
            verdict, closest = r["verdict"], tables.describe_closest(r["closest"])
            if r["bitwise"]:
                closest = f"{r['bitwise']}; other metrics: {closest}"
            trouble = ", ".join(filter(None, [f"{r['failed']} failing row(s)" if r["failed"] else "",
                                              f"{r['regressed']} regression(s)" if r["regressed"] else ""]))
            if trouble:  # a failing cell leads with why it failed, then how close the rest came
                closest = f"{trouble}; first: {r['first_failure'] or 'see the cell'} | closest: {closest}"
        else:
            verdict, closest = "", "not gated"
        rows.append(f"<tr><td class='{verdict}'>{verdict}</td><td><a href='#cell{i}'>{html.escape(cell)}</a></td>"
                    f"<td>{html.escape(closest)}</td></tr>")
    return ("<h2>Cells</h2><table><tr><th>verdict</th><th>cell</th><th>closest to its threshold</th></tr>"
            + "".join(rows) + "</table>")


def _cell_section(i: int, cell: str, run_dir: Path, rows: pd.DataFrame, metrics: pd.DataFrame, regressed,
                  weights: pd.DataFrame | None) -> str:
    out = [f"<div class='cell' id='cell{i}'><h2>{html.escape(cell)}</h2>"]
    bad = rows[rows["status"].isin(["error", "invalid"])]
    if len(bad):
        reasons = sorted(set(bad["reason"].fillna("no reason given")))
        out.append("<p class='FAIL verdict' style='font-size:1em'>" + "<br>".join(html.escape(r) for r in reasons[:5])
                   + "</p>")
    out.append(_threshold_table(metrics))
    if regressed is not None and len(regressed[regressed["cell"] == cell]):
        r = regressed[regressed["cell"] == cell]
        out.append("<h3>Regressions against the baseline</h3>" + _html_table(
            r[["comparison", "metric", "prompt_idx", "seed", "value", "baseline", "why"]]))
    curves = rows[rows["metric"] == "trajectory_cosine"]
    if len(curves):
        src = trajectory_plot(curves, f"{cell}: trajectory per step")
        out.append("<h3>Trajectory</h3>" + (_img(src, f"trajectory plot {cell}", "plot") if src else
                   "<p class='note'>trajectory cosine is exactly 1 at every step (bitwise equal)</p>"))
    if weights is not None and (weights["cell"] == cell).any():
        layers = weights[weights["cell"] == cell]
        floor = metrics.loc[metrics["metric"] == "weight_sqnr_db_min", "threshold"]
        out.append("<h3>Weight SQNR per layer, worst first</h3>"
                   + _img(weight_plot(layers, float(floor.iloc[0]) if len(floor) else None, cell),
                          f"weight SQNR plot {cell}", "plot")
                   + _html_table(layers.sort_values("sqnr_db")[["layer", "sqnr_db"]].head(10)))
    out.append(_media(run_dir, cell))
    out.append("</div>")
    return "\n".join(out)


def _threshold_table(metrics: pd.DataFrame) -> str:
    if metrics.empty:
        return "<p class='note'>not gated</p>"
    rows = []
    for r in metrics.itertuples(index=False):
        verdict = "FAIL" if r.failed else ("PASS" if pd.notna(r.budget_used) else "")
        budget = "" if pd.isna(r.budget_used) else ("inf" if math.isinf(r.budget_used) else f"{r.budget_used:.1%}")
        where = " ".join(f"{k} {fmt(v)}" for k, v in (("seed", r.seed), ("prompt", r.prompt_idx)) if pd.notna(v))
        rows.append(f"<tr><td class='{verdict}'>{verdict}</td><td>{html.escape(r.comparison)}</td>"
                    f"<td>{html.escape(r.metric)}</td><td>{fmt(r.value)}</td><td>{html.escape(str(r.op or ''))} "
                    f"{fmt(r.threshold)}</td><td>{'' if pd.isna(r.margin) else format(r.margin, '+.4g')}</td>"
                    f"<td>{budget}</td><td>{r.failed}/{r.samples}</td><td>{html.escape(where)}</td>"
                    f"<td>{html.escape(str(r.why))}</td></tr>")
    head = ("<tr><th></th><th>comparison</th><th>metric</th><th>worst value</th><th>threshold</th><th>margin</th>"
            "<th>error budget used</th><th>failed</th><th>worst sample</th><th>why</th></tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def _media(run_dir: Path, cell: str) -> str:
    samples = find_media(run_dir / IMAGES_DIR / cell.replace("/", "_"))
    if not samples:
        return "<p class='note'>no images saved for this cell</p>"
    out = [f"<h3>Images (difference map: |engine - reference| x {DIFF_GAIN}, max over channels)</h3>"]
    for sample, frames in samples.items():
        complete = [f for f in frames if all(s in f for s in _SIDES)]
        if len(complete) < len(frames):
            out.append(f"<p class='note'>{html.escape(sample)}: {len(frames) - len(complete)} frame(s) lack a side</p>")
        if not complete:
            continue
        figures = []
        for j, f in enumerate(complete):
            eng, ref = (np.asarray(Image.open(f[s]).convert("RGB")) for s in _SIDES)
            tag = f" frame {j}" if len(complete) > 1 else ""
            diff = _diff_src(run_dir, f["engine"], eng, ref)
            mad = np.abs(eng.astype(np.int16) - ref.astype(np.int16)).max()
            figures.append([(_file_src(f["engine"], run_dir), f"engine{tag}"),
                            (_file_src(f["reference"], run_dir), f"reference{tag}"),
                            (diff, f"diff{tag} (max {mad}/255)")])
        out.append(f"<h4>{html.escape(sample)}</h4>" + _media_grid(sample, figures))
    return "\n".join(out)


def _diff_src(run_dir: Path, engine_path: Path, eng: np.ndarray, ref: np.ndarray) -> str:
    diff = diff_map(eng, ref)
    if engine_path.stat().st_size <= INLINE_MAX_BYTES:
        return _png_b64(diff)
    path = engine_path.with_name(engine_path.name.replace("_engine.png", "_diff.png"))
    Image.fromarray(diff).save(path)
    return path.relative_to(run_dir).as_posix()


def _media_grid(sample: str, figures: list[list[tuple[str, str]]]) -> str:
    """One frame: engine, reference and diff side by side. Several: a row per side, frames side by side."""
    def fig(src, caption):
        return f"<figure>{_img(src, f'{sample} {caption}')}<figcaption>{html.escape(caption)}</figcaption></figure>"
    if len(figures) == 1:
        return "<div>" + "".join(fig(*f) for f in figures[0]) + "</div>"
    return "".join("<div>" + "".join(fig(*frame[k]) for frame in figures) + "</div>" for k in range(3))

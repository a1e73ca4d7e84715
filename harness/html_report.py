"""report.html: one self-contained page per run (no network): the verdict first, then per cell its thresholds
with margins, engine and reference images side by side with an amplified difference map, the per-step trajectory
curves, and for quant cells the per-layer weight SQNR worst first. Images and plots are inlined as base64 PNG;
an image file too large to inline is linked by its path inside the run folder instead.

Media are (B, H, W, 3) images or (B, F, H, W, 3) videos. On disk a run stores one PNG per sample side, or one
per frame (`..._f<j>_engine.png`); frames are laid out side by side. Plots use matplotlib's Agg canvas directly
(no pyplot, so importing or rendering changes no global state)."""
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

from harness import tables
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
    from matplotlib import colormaps

    if engine.shape != reference.shape:
        raise ValueError(f"engine {engine.shape} and reference {reference.shape} images differ in shape")
    d = np.abs(engine.astype(np.int16) - reference.astype(np.int16)).max(axis=-1)
    level = np.clip(d * gain, 0, 255) / 255.0
    return (colormaps["magma"](level)[..., :3] * 255).round().astype(np.uint8)


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

def _figure(width: float = 6.4, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _fig_b64(fig) -> str:
    buf = io.BytesIO()
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.16, top=0.9)  # fixed: tight_layout cost seconds a plot
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _drawn_once(*columns: str):
    """Memoize a plot on the data it draws: a sweep writes report.html before the gate and again after it, and the
    plots (most of a render's time) do not depend on the verdict. The key is the text of the columns the plot reads
    (the frame before the gate and the one read back from results.parquet differ in dtypes, not in values)."""
    def wrap(plot):
        cache: dict[tuple, str | None] = {}

        def cached(frame: pd.DataFrame, *args):
            key = ("\x1f".join(map(str, frame[list(columns)].itertuples(index=False))), args)
            if key not in cache:
                if len(cache) >= 256:  # a long-lived process (a test session) renders many runs
                    cache.clear()
                cache[key] = plot(frame, *args)
            return cache[key]
        return cached
    return wrap


@_drawn_once("status", "value", "comparison", "seed", "prompt_idx", "step")
def trajectory_plot(curves: pd.DataFrame, title: str) -> str | None:
    """1 - trajectory_cosine per step (log scale), one line per sample, one colour per comparison. None when
    every value is exact (nothing to draw on a log axis; the caller says 'bitwise equal')."""
    ok = curves[curves["status"].eq("ok") & curves["value"].notna()]
    if ok.empty or (1.0 - ok["value"]).max() <= 0:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    from matplotlib.ticker import MaxNLocator

    # Colour and dash per comparison: equal curves (an unquantized engine bitwise equal to diffusers makes
    # engine_vs_reference and engine_vs_unquantized coincide) stay visible on top of each other.
    styles = {c: (f"C{i}", ("-", "--", ":", "-.")[i % 4]) for i, c in enumerate(sorted(ok["comparison"].unique()))}
    first = _first_samples(ok)
    for (comparison, seed, prompt), grp in ok.groupby(["comparison", "seed", "prompt_idx"], sort=True, dropna=False):
        grp = grp.sort_values("step")
        err = np.clip(1.0 - grp["value"].to_numpy(dtype=float), 1e-16, None)
        colour, dash = styles[comparison]
        ax.plot(grp["step"].to_numpy(dtype=float), err, marker="o", ms=3, lw=1.2, color=colour, ls=dash,
                alpha=0.8, label=comparison if (seed, prompt) == first[comparison] else None)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("denoising step")
    ax.set_ylabel("1 - trajectory cosine")
    # y given: matplotlib then skips placing the title above the y axis' offset text, which costs a layout of every
    # tick label (a third of a plot's time) and never moves it here: a log axis has no offset text.
    ax.set_title(title, fontsize=9, y=1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _fig_b64(fig)


def _first_samples(frame: pd.DataFrame) -> dict[str, tuple]:
    """comparison -> its first (seed, prompt_idx), the curve that carries the legend label."""
    first = frame.sort_values(["seed", "prompt_idx"], kind="stable").drop_duplicates("comparison")
    return {c: (s, p) for c, s, p in zip(first["comparison"], first["seed"], first["prompt_idx"])}


@_drawn_once("layer", "sqnr_db")
def weight_plot(layers: pd.DataFrame, floor: float | None, title: str) -> str:
    """Per-layer weight SQNR, worst first (lowest dB on the left), with the gate's floor."""
    layers = layers.sort_values("sqnr_db")
    fig = _figure(6.4, 3.0)
    ax = fig.add_subplot()
    ax.bar(range(len(layers)), layers["sqnr_db"].to_numpy(), color="C0", width=1.0)
    if floor is not None and math.isfinite(floor):
        ax.axhline(floor, color="C3", lw=1, ls="--", label=f"floor {floor:g} dB")
        ax.legend(fontsize=7)
    ax.set_xlabel(f"layer, worst first ({len(layers)} quantized linears)")
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title(title, fontsize=9)
    return _fig_b64(fig)


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

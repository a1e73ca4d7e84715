"""`parity selftest`: run the sweep with each planted bug of the catalogue installed, gate it, and record which
comparison and metric caught it and by how much. A clean run of the same cells first proves the catches are the
plants' doing (a failing clean run makes the selftest an error: its detections would mean nothing).

Margins: how far past its threshold a failing row is, in the metric's units (>= rules: threshold - value; <= rules:
value - threshold), and relative to the threshold's distance from a perfect value (a cosine floor of 0.999 is 0.001
from perfect: a value of 0.998 is past it by 0.001, relative 1.0). A crashed or refused row is past by "error".
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness import selfcheck
from harness.selftest import CATALOGUE, Plant, install, sitecustomize_source

REPO = Path(__file__).resolve().parents[2]

# The value a perfect comparison gives; the relative margin divides by the threshold's distance from it.
# dB metrics (None) have none: the caps (200, 100 dB) only keep rows finite, so their margin is relative to the
# threshold itself. Missing-row counts are relative to the expected count.
PERFECT = {"cosine": 1.0, "ssim": 1.0, "similarity": 1.0, "sqnr_db": None, "psnr_db": None, "rel_error": 0.0,
           "mean_abs_diff": 0.0, "delta": 0.0, "crosscheck_error": 0.0, "cosine_min": 1.0, "sqnr_db_min": None,
           "mismatch": 0.0}

# When a catch is fragile, as data. A bug seen by a single (comparison, metric) and by under a tenth of that
# threshold's distance from perfect would slip through if the threshold were loosened by 10%, or the noise of
# another device or seed moved the value that much: one metric is the only thing standing between it and a pass.
FRAGILE = {
    "max_catching_metrics": 1,
    "max_relative_margin": 0.1,
    "reasoning": "caught by one comparison/metric only, and by less than 10% of that threshold's distance from a "
                 "perfect value: a threshold loosened by 10%, or another device's spread, lets the bug through; "
                 "or caught only by an exactness tier (op ==, bitwise on this device): a device without one "
                 "(a GPU) judges by the floors and lets the bug through",
}

MATRIX_COLUMNS = ("plant", "area", "breaks", "caught", "fragile", "exit_code", "comparison", "metric", "rows_failed",
                  "worst_value", "threshold", "op", "margin", "relative_margin", "why", "seconds", "floor_caught")


class SelftestError(ValueError):
    """Bad input or an unusable baseline: exit 2."""


def select(patterns: list[str] | None) -> list[Plant]:
    if not patterns:
        return list(CATALOGUE.values())
    chosen = [p for p in CATALOGUE.values() if any(pat in p.name or pat == p.area for pat in patterns)]
    unknown = [pat for pat in patterns if not any(pat in p.name or pat == p.area for p in CATALOGUE.values())]
    if unknown:
        raise SelftestError(f"--only {unknown} matches no plant; valid plants: {sorted(CATALOGUE)} "
                            f"(or an area: {sorted({p.area for p in CATALOGUE.values()})})")
    return chosen


def _perfect(metric: str) -> float:
    for suffix, value in sorted(PERFECT.items(), key=lambda kv: -len(kv[0])):
        if metric.endswith(suffix):
            return value
    raise KeyError(f"no perfect value known for metric {metric!r}; add it to PERFECT")


def margins(failed: pd.DataFrame) -> pd.DataFrame:
    """One row per (comparison, metric) that failed, with its worst margin past the threshold."""
    out = []
    for (comparison, metric), g in failed.groupby(["comparison", "metric"], dropna=False):
        best = None
        for _, r in g.iterrows():
            value, thr, op = float(r["value"]) if pd.notna(r["value"]) else math.nan, r["threshold"], r["op"]
            if r["status"] != "ok" or not math.isfinite(value) or pd.isna(thr):
                m, rel = math.inf, math.inf
            elif comparison == "negative_control":  # a control that passed: the threshold is dead, no distance
                m, rel = math.nan, math.nan
            elif op == "==":  # an exactness tier allows no distance: any is infinitely past it, relatively
                m, rel = abs(value - thr), math.inf
            else:
                from harness.metrics import metric_spec
                value = abs(value) if metric_spec(metric).absolute else value  # the gate judges |delta|
                m = (thr - value) if op == ">=" else (value - thr)
                perfect = None if r.get("reason") == selfcheck.MISSING_ROWS else _perfect(metric)
                # dB metrics have no finite perfect value: their margin is read against the threshold itself.
                span = abs(thr - perfect) if perfect is not None else abs(thr)
                rel = m / span if span else math.inf
            if best is None or not rel <= best[1]:
                best = (m, rel, value, thr, op, r["why"])
        floor = g["floor_passed"] if "floor_passed" in g else pd.Series(dtype="boolean")
        out.append({"comparison": comparison, "metric": metric, "rows_failed": len(g), "margin": best[0],
                    "floor_caught": bool(floor.eq(False).fillna(False).any()),
                    "relative_margin": best[1], "worst_value": best[2], "threshold": best[3], "op": best[4],
                    "why": best[5]})
    return pd.DataFrame(out)


@dataclass
class Options:
    suite: str = "smoke"
    only: list[str] | None = None
    out: Path = REPO / "reports" / "selftest"
    zoo_root: Path | None = None
    baseline: bool = True


def _suite_for(suite, plant: Plant):
    cells = tuple(c for c in suite.cells if plant.runs_on(c))
    if plant.overrides:
        cells = tuple(dataclasses.replace(c, golden=False, **{k: v(c) if callable(v) else v
                                                              for k, v in plant.overrides.items()}) for c in cells)
    return dataclasses.replace(suite, cells=cells)


@contextlib.contextmanager
def _planted(plant: Plant | None, workdir: Path):
    undo, old_path = (lambda: None), os.environ.get("PYTHONPATH")
    if plant is not None and plant.where in ("process", "both"):
        undo = install(plant.name)
    if plant is not None and plant.where in ("ranks", "both"):
        hook = workdir / "sitecustomize"
        hook.mkdir(parents=True, exist_ok=True)
        (hook / "sitecustomize.py").write_text(sitecustomize_source(plant.name, str(REPO)))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(hook)] + ([old_path] if old_path else []))
    try:
        yield
    finally:
        undo()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def run_once(suite, run_id: str, out: Path, zoo_root: Path | None, references: dict | None, log):
    """Sweep + gate, as `parity sweep` does; returns (exit code, gate result or None, the crash if any)."""
    from harness.gate import gate
    from harness.report import load_meta, load_results
    from harness.sweep import SweepContext, run_sweep
    from harness.thresholds import load_thresholds

    ctx = SweepContext(suite=suite, run_id=run_id, golden=False, log=log)
    if zoo_root is not None:
        ctx.zoo_root = zoo_root
    if references is not None:
        ctx._references = references  # diffusers runs shared between plants that cannot change them
    try:
        run_dir, _ = run_sweep(ctx, out)
        results = load_results(run_dir)
        result = gate(results, load_thresholds())
        result = selfcheck.extend(result, *selfcheck.run_failures(results, load_meta(run_dir), run_dir))
    except Exception as e:  # a plant that crashes the whole run is caught, loudly
        return 2, None, f"{type(e).__name__}: {e}"
    return result.exit_code, result, None


def run_selftest(opts: Options, log=print) -> tuple[int, pd.DataFrame, Path]:
    from harness.suites import load_suite

    suite = load_suite(opts.suite)
    plants = select(opts.only)
    lacking = [p for p in plants if not any(p.runs_on(c) for c in suite.cells)]
    if lacking and opts.only:  # asked for by name: an error; the whole catalogue: each suite runs its families'
        plant = lacking[0]
        raise SelftestError(f"plant {plant.name} needs {plant.family or 'any'} cells {list(plant.cells)}, which "
                            f"suite {suite.name!r} lacks; its cells: {[c.name for c in suite.cells]}")
    plants = [p for p in plants if p not in lacking]
    if lacking:
        log(f"{len(lacking)} plant(s) need cells suite {suite.name!r} lacks (other families): not run here")
    if not plants:
        raise SelftestError(f"no plant of the catalogue runs on suite {suite.name!r}'s cells")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    out = Path(opts.out) / f"{stamp}-{suite.name}"
    out.mkdir(parents=True, exist_ok=False)
    quiet = lambda msg: None  # noqa: E731 (the sweep's per-cell log would drown the matrix)
    started = time.perf_counter()
    shared: dict = {}
    if opts.baseline:  # one clean run per distinct set of cells the plants need
        groups = {}
        for plant in plants:
            groups.setdefault((plant.cells, tuple(sorted(plant.overrides.items()))), plant)
        plain = [p for p in plants if not p.overrides]
        cells = tuple(c for c in suite.cells if any(p.runs_on(c) for p in plain))
        runs = [("baseline", dataclasses.replace(suite, cells=cells))] if cells else []
        runs += [(f"baseline-{p.name}", _suite_for(suite, p)) for (c, ov), p in groups.items() if ov]
        for run_id, sub in runs:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code, result, crash = run_once(sub, run_id, out, opts.zoo_root, None, quiet)
            log(f"{run_id}: {len(sub.cells)} cell(s), exit {code} in {time.perf_counter() - t0:.0f}s")
            if code != 0:
                detail = crash or "; ".join(result.errors[:2]) or result.failed[["cell", "comparison", "metric", "why"]].head(5).to_string()
                raise SelftestError(f"the clean run {run_id} does not pass (exit {code}), so no catch could be "
                                    f"trusted: {detail}")
    records = []
    for plant in sorted(plants, key=lambda p: (p.cells, p.name)):  # plants on the same cells share references
        sub = _suite_for(suite, plant)
        references = None if plant.name == "reference_is_the_engine" or plant.overrides else shared
        t0 = time.perf_counter()
        with _planted(plant, out / f".hook-{plant.name}"), contextlib.redirect_stdout(io.StringIO()):
            code, result, crash = run_once(sub, plant.name, out, opts.zoo_root, references, quiet)
        seconds = round(time.perf_counter() - t0, 1)
        base = {"plant": plant.name, "area": plant.area, "breaks": plant.breaks, "exit_code": code,
                "seconds": seconds}
        if crash:
            records.append({**base, "comparison": "(run crashed)", "metric": "", "why": crash})
        elif result.errors:
            records += [{**base, "comparison": "(run error, exit 2)", "metric": "", "why": e} for e in result.errors]
        if result is not None and len(result.failed):
            for _, m in margins(result.failed).iterrows():
                records.append({**base, **m.to_dict()})
        if code == 0:
            gap = f" (known gap: {plant.known_gap})" if plant.known_gap else ""
            records.append({**base, "comparison": "", "metric": "", "why": f"ESCAPED: the gate passed{gap}"})
        log(f"{plant.name:36s} exit {code}  {seconds:6.1f}s")
        write(finish(pd.DataFrame(records)), out)  # after every plant: an interrupted selftest keeps what it found
    matrix = finish(pd.DataFrame(records))
    matrix.attrs["seconds"] = round(time.perf_counter() - started, 1)
    write(matrix, out)
    return (1 if (~matrix.groupby("plant").caught.first()).any() else 0), matrix, out


def finish(matrix: pd.DataFrame) -> pd.DataFrame:
    for col in MATRIX_COLUMNS:
        if col not in matrix:
            matrix[col] = math.nan
    matrix["caught"] = matrix["exit_code"].ne(0)
    fragile = {}
    for plant, g in matrix.groupby("plant"):
        caught_by = g[g.comparison.astype(str).str.len() > 0]
        # floor_caught: an exactness-tier row whose ordinary floor fails too (a GPU run would catch it as well).
        only_bitwise = bool(len(caught_by)) and caught_by.op.eq("==").all() and \
            not caught_by.floor_caught.fillna(False).astype(bool).any()
        fragile[plant] = only_bitwise or bool(
            len(caught_by) <= FRAGILE["max_catching_metrics"] and len(caught_by) and
            (caught_by.relative_margin.fillna(math.inf) < FRAGILE["max_relative_margin"]).all())
    matrix["fragile"] = matrix["plant"].map(fragile)
    return matrix[list(MATRIX_COLUMNS)].reset_index(drop=True)


def bitwise(r) -> str:
    return "bitwise (floor fails too)" if r.floor_caught is True else "bitwise only"


def markdown(matrix: pd.DataFrame) -> str:
    plants = matrix.groupby("plant", sort=False)
    n, caught = plants.ngroups, int(plants.caught.first().sum())
    lines = [f"# parity selftest: {caught} of {n} planted bugs caught"
             + (f" in {matrix.attrs['seconds']:.0f}s" if "seconds" in matrix.attrs else ""), "",
             f"Fragile rule: {FRAGILE['reasoning']}.", "",
             "| plant | area | caught | fragile | exit | caught by (comparison / metric) | rows | worst | threshold | "
             "margin | relative |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in matrix.iterrows():
        fmt = lambda x: "" if pd.isna(x) else ("error" if x == math.inf else f"{x:.4g}")  # noqa: E731
        by = f"{r.comparison} / {r.metric}".strip(" /") or r.why
        if r.comparison.startswith("(run"):
            by = f"{r.comparison}: {str(r.why)[:140]}"
        lines.append(f"| {r.plant} | {r.area} | {'yes' if r.caught else '**ESCAPED**'} | "
                     f"{'**fragile**' if r.fragile else ''} | {r.exit_code} | {by} | {fmt(r.rows_failed)} | "
                     f"{fmt(r.worst_value)} | {'' if pd.isna(r.threshold) else f'{r.op} {r.threshold:.6g}'} | "
                     f"{fmt(r.margin)} | {bitwise(r) if r.op == '==' else fmt(r.relative_margin)} |")
    return "\n".join(lines) + "\n"


def write(matrix: pd.DataFrame, out: Path) -> None:
    table = matrix.copy()
    table["rows_failed"] = table["rows_failed"].astype("float64")
    table.to_parquet(out / "detection.parquet", index=False)
    (out / "detection.md").write_text(markdown(matrix))

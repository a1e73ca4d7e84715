"""Regressions against an accepted baseline: golden/baseline/<suite>.parquet holds a clean run's gated values per
sample; the gate fails a sample that got worse than its baseline by more than its measured run-to-run noise or
the floor in golden/baseline/tolerances.toml (that file says how the noise is measured), even above its floor.

`parity baseline accept RUN [--repeat RUN...]` writes the file; `compare` gives per-metric deltas of two runs.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from harness.margins import error_of
from harness.metrics import METRICS, metric_spec
from harness.runfiles import ResultsError, atomic_write, load_meta, load_results
from harness.schema import OK, QUANT_ORACLE

BASELINE_DIR = Path(__file__).resolve().parents[1] / "golden" / "baseline"
TOLERANCES = BASELINE_DIR / "tolerances.toml"
KEY = ("cell", "comparison", "metric", "prompt_idx", "seed")
CELL_KEY = ("model", "dtype", "quant", "parallel")
WILDCARD = "*"


class BaselineError(ValueError):
    """A baseline or tolerance file is missing, malformed, or does not fit the run. The gate exits 2."""


@dataclass(frozen=True)
class Tolerance:
    metric: str
    rel: float
    noise_factor: float
    source: str


@dataclass(frozen=True)
class Tolerances:
    rules: dict  # metric (or "*") -> Tolerance
    path: Path | None = None

    def for_metric(self, metric: str) -> Tolerance:
        rule = self.rules.get(metric) or self.rules.get(WILDCARD)
        if rule is None:
            raise BaselineError(f"{self.path}: no tolerance for metric {metric!r} and no metric = \"*\" row")
        return rule


def load_tolerances(path: str | Path | None = None) -> Tolerances:
    path = Path(path) if path is not None else TOLERANCES
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"{path}: tolerance file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BaselineError(f"{path}: cannot read tolerances: {e}") from None
    extra = sorted(set(data) - {"tolerance"})
    problems = [f"unknown top-level key(s) {extra}; only [[tolerance]] tables"] if extra else []
    rules: dict[str, Tolerance] = {}
    for i, row in enumerate(data.get("tolerance", []), start=1):
        fields = ("metric", "rel", "noise_factor", "source")
        unknown, missing = sorted(set(row) - set(fields)), [f for f in fields if f not in row]
        if unknown or missing:
            problems.append(f"tolerance #{i}: unknown field(s) {unknown}, missing field(s) {missing}")
            continue
        metric = row["metric"]
        if metric != WILDCARD and (metric not in METRICS or not metric_spec(metric).gated):
            problems.append(f"tolerance #{i}: {metric!r} is not a gated metric; valid: "
                            f"{sorted(m for m, s in METRICS.items() if s.gated)} or \"*\"")
        for name in ("rel", "noise_factor"):
            v = row[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                problems.append(f"tolerance #{i}: {name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(row["source"], str) and row["source"].strip()):
            problems.append(f"tolerance #{i}: source must say where the number comes from")
        if metric in rules:
            problems.append(f"tolerance #{i}: second row for metric {metric!r}")
        rules[metric] = Tolerance(metric, float(row["rel"]), float(row["noise_factor"]), str(row["source"]))
    if not rules and not problems:
        problems.append("no [[tolerance]] tables")
    if problems:
        raise BaselineError(f"{path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return Tolerances(rules, path)


def baseline_path(suite: str) -> Path:
    return BASELINE_DIR / f"{suite}.parquet"


def gated_values(results: pd.DataFrame) -> pd.DataFrame:
    """The rows a baseline keeps: gated metrics, status ok, finite value, one per sample. The quant oracle's
    per-layer rows are not samples: they are judged against their absolute (mostly exact) thresholds only."""
    gated = results["metric"].map(lambda m: m in METRICS and metric_spec(m).gated).astype(bool)
    gated &= results["comparison"].ne(QUANT_ORACLE).fillna(True).astype(bool)
    ok = results["status"].eq(OK).fillna(False).astype(bool)
    values = pd.to_numeric(results["value"], errors="coerce").astype("float64")
    keep = results[gated & ok & np.isfinite(values)]
    cols = list(dict.fromkeys(KEY + CELL_KEY))
    out = keep[cols + ["value"]].copy()
    out["value"] = out["value"].astype("float64")
    if out.duplicated(list(KEY)).any():
        raise BaselineError(f"results hold more than one row per {KEY}; a baseline needs one value per sample")
    return out.reset_index(drop=True)


def _errors(frame: pd.DataFrame, column: str = "value") -> np.ndarray:
    return np.array([error_of(m, v) for m, v in zip(frame["metric"], frame[column])], dtype=np.float64)


def build_baseline(accepted: pd.DataFrame, repeats: list[pd.DataFrame], meta: dict) -> pd.DataFrame:
    """Per-sample values of the accepted run, with the noise of the repeats: max |e(repeat) - e(accepted)|.
    Every repeat must hold every sample of the accepted run (same suite and seeds), or the noise is unknown."""
    base = gated_values(accepted)
    base["error"] = _errors(base)
    noise = np.zeros(len(base))
    for i, rep in enumerate(repeats, start=1):
        r = gated_values(rep)[list(KEY) + ["value"]]
        merged = base[list(KEY)].merge(r, on=list(KEY), how="left")
        if merged["value"].isna().any():
            lost = merged[merged["value"].isna()].head(3)[list(KEY)].to_dict("records")
            raise BaselineError(f"repeat run #{i} lacks {int(merged['value'].isna().sum())} sample(s) of the "
                                f"accepted run, e.g. {lost}: repeats must be clean runs of the same suite and seeds")
        noise = np.maximum(noise, np.abs(_errors(merged) - base["error"].to_numpy()))
    base["noise"] = noise
    base["repeats"] = len(repeats)
    for k in ("run_id", "suite", "parity_git", "torch_version", "diffusers_version"):
        base[k] = str(meta.get(k, ""))
    base["accepted"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return base


def accept(run_dir: str | Path, repeats: list[str | Path] = (), out: str | Path | None = None) -> Path:
    """Write the baseline of run_dir's suite. The caller has checked that the run passes its thresholds."""
    meta = load_meta(run_dir)
    suite = meta.get("suite")
    if not suite:
        raise BaselineError(f"{run_dir}: meta.json names no suite; cannot tell which baseline this is")
    for rep in repeats:
        other = load_meta(rep).get("suite")
        if other != suite:
            raise BaselineError(f"repeat {rep} is a run of suite {other!r}, not {suite!r}")
    frame = build_baseline(load_results(run_dir), [load_results(r) for r in repeats], meta)
    path = Path(out) if out is not None else baseline_path(suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: frame.to_parquet(p, index=False))
    return path


def load_baseline(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise BaselineError(f"{path}: baseline file not found")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise BaselineError(f"{path}: cannot read baseline: {e}") from None
    missing = [c for c in KEY + ("value", "error", "noise") if c not in frame.columns]
    if missing:
        raise BaselineError(f"{path}: baseline lacks column(s) {missing}; accept it again")
    return frame


def regressions(results: pd.DataFrame, baseline: pd.DataFrame, tolerances: Tolerances) -> pd.DataFrame:
    """One row per sample present in both: baseline value, tolerance, how much worse (error scale), passed.
    Pure. Samples the baseline lacks (a new cell) are not judged here; the caller counts them."""
    run = gated_values(results)
    cols = list(KEY) + ["value", "error", "noise"]
    merged = run.merge(baseline[cols].rename(columns={"value": "baseline", "error": "baseline_error"}),
                       on=list(KEY), how="inner")
    if merged.empty:
        return merged.assign(tolerance=[], worse_by=[], passed=[], why=[])
    rules = [tolerances.for_metric(m) for m in merged["metric"]]
    error = _errors(merged)
    base_error = merged["baseline_error"].to_numpy()
    allowed = np.array([max(t.noise_factor * n, t.rel * b) for t, n, b in zip(rules, merged["noise"], base_error)])
    worse_by = error - base_error
    passed = worse_by <= allowed
    merged["tolerance"], merged["worse_by"], merged["passed"] = allowed, worse_by, passed
    merged["why"] = [
        "" if ok else (f"error {e:.4g} vs baseline {b:.4g} (value {v:.7g}, baseline {bv:.7g}): "
                       f"{'+' + format(w / b * 100, '.3g') + '%' if b > 0 else 'was exact'}, "
                       f"allowed +{a:.3g} (noise {n:.3g})")
        for ok, e, b, v, bv, w, a, n in zip(passed, error, base_error, merged["value"], merged["baseline"],
                                            worse_by, allowed, merged["noise"])]
    return merged


def unmatched(results: pd.DataFrame, baseline: pd.DataFrame) -> tuple[int, int]:
    """(samples of the run the baseline lacks, samples of the baseline the run lacks)."""
    run = gated_values(results)[list(KEY)]
    both = run.merge(baseline[list(KEY)], on=list(KEY), how="outer", indicator=True)
    return int((both["_merge"] == "left_only").sum()), int((both["_merge"] == "right_only").sum())


def compare_runs(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per (cell, comparison, metric): the worst sample of each run and the change, with the direction read from
    the metric registry (worse_pct: how much larger the error got, in the margins error scale)."""
    ga, gb = gated_values(a), gated_values(b)
    merged = ga.merge(gb[list(KEY) + ["value"]], on=list(KEY), how="outer", suffixes=("_a", "_b"))
    rows = []
    for (cell, comparison, metric), grp in merged.groupby(["cell", "comparison", "metric"], sort=True):
        ea = [error_of(metric, v) for v in grp["value_a"].dropna()]
        eb = [error_of(metric, v) for v in grp["value_b"].dropna()]
        worst_a = grp["value_a"].dropna().iloc[int(np.argmax(ea))] if ea else math.nan
        worst_b = grp["value_b"].dropna().iloc[int(np.argmax(eb))] if eb else math.nan
        both = grp.dropna(subset=["value_a", "value_b"])
        d = both["value_b"] - both["value_a"]
        ca = max(ea) if ea else math.nan
        cb = max(eb) if eb else math.nan
        rows.append({"cell": cell, "comparison": comparison, "metric": metric, "worst_a": worst_a,
                     "worst_b": worst_b, "delta": worst_b - worst_a,
                     "max_abs_sample_delta": float(d.abs().max()) if len(d) else math.nan,
                     "worse_pct": _worse_pct(ca, cb),
                     "samples_a": int(grp["value_a"].notna().sum()), "samples_b": int(grp["value_b"].notna().sum())})
    return pd.DataFrame(rows, columns=["cell", "comparison", "metric", "worst_a", "worst_b", "delta",
                                       "max_abs_sample_delta", "worse_pct", "samples_a", "samples_b"])


def _worse_pct(error_a: float, error_b: float) -> float:
    """How much larger B's error is than A's, in percent; inf when A was exact and B is not."""
    if math.isnan(error_a) or math.isnan(error_b):
        return math.nan
    if error_a > 0:
        return (error_b / error_a - 1) * 100
    return 0.0 if error_b == 0 else math.inf


def load_pair(run_a: str | Path, run_b: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    try:
        return load_results(run_a), load_results(run_b)
    except ResultsError as e:
        raise BaselineError(str(e)) from None

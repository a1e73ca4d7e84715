"""Writing and reading a run directory: results.parquet + results.csv (same rows), meta.json and summary.md.

Every file is written to a temporary name and moved into place, so a crash never leaves half a file that a later
gate would read as a complete run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd

from harness.metrics import METRICS, metric_spec
from harness.schema import CELL_COLUMNS, COLUMNS, ERROR, INVALID, STATUSES

if TYPE_CHECKING:
    from harness.gate import GateResult

RESULTS_PARQUET, RESULTS_CSV, META_JSON, SUMMARY_MD = "results.parquet", "results.csv", "meta.json", "summary.md"
GATE_BEGIN, GATE_END = "<!-- gate:begin -->", "<!-- gate:end -->"  # gate_run_dir rewrites only what is between

# Column dtypes, so that parquet and csv read back identical. Nullable ints: `step` is <NA> for whole-run metrics.
_INT = ("prompt_idx", "seed", "steps", "height", "width", "step", "weight_bytes")
_FLOAT = ("value", "quantized_fraction")
_BOOL = ("clip_semantic",)
DTYPES = {c: "Int64" if c in _INT else "float64" if c in _FLOAT else "boolean" if c in _BOOL else "str"
          for c in COLUMNS}
_HEADER_META = ("run_id", "time", "torch_version", "diffusers_version", "transformers_version", "parity_git",
                "clip_model", "clip_semantic")


class ResultsError(ValueError):
    """A results file is missing, unreadable or lacks schema columns. The gate turns this into exit 2."""


def normalize(results: pd.DataFrame) -> pd.DataFrame:
    """Schema columns first, in COLUMNS order, with schema dtypes. CSV cannot tell '' from missing, so '' in a
    text column becomes missing in both files."""
    missing = [c for c in COLUMNS if c not in results.columns]
    if missing:
        raise ResultsError(f"results lack schema column(s) {missing}")
    df = results[list(COLUMNS) + [c for c in results.columns if c not in COLUMNS]].copy()
    for col, dtype in DTYPES.items():
        df[col] = df[col].astype(dtype)
        if dtype == "str":
            df[col] = df[col].mask(df[col] == "")
    bad = sorted(set(df["status"].dropna()) - set(STATUSES)) + (["<missing>"] if df["status"].isna().any() else [])
    if bad:
        raise ResultsError(f"unknown status value(s) {bad}; valid: {list(STATUSES)}")
    return df.reset_index(drop=True)


def write_run(run_dir: str | Path, results: pd.DataFrame, meta: dict) -> None:
    """Write results.parquet and results.csv (same rows and columns) and meta.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    df = normalize(results)
    _atomic_write(run_dir / RESULTS_PARQUET, lambda p: df.to_parquet(p, index=False))
    _atomic_write(run_dir / RESULTS_CSV, lambda p: df.to_csv(p, index=False))
    _atomic_write(run_dir / META_JSON, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=str)))


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """Read run_dir/results.parquet and check it has every schema column."""
    path = Path(run_dir) / RESULTS_PARQUET
    if not path.is_file():
        raise ResultsError(f"{path}: results file not found")
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ResultsError(f"{path}: cannot read results: {e}") from None
    try:
        return normalize(df)
    except ResultsError as e:
        raise ResultsError(f"{path}: {e}") from None


def read_results_csv(path: str | Path) -> pd.DataFrame:
    """Read results.csv back with schema dtypes; only an empty field is missing (a prompt may say 'None')."""
    df = pd.read_csv(path, dtype=DTYPES, keep_default_na=False, na_values=[""])
    return normalize(df)


def load_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / META_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def meta_from_results(results: pd.DataFrame) -> dict:
    """Header fields from the provenance columns, for a summary written without the runner's meta."""
    meta = {}
    for col in ("run_id", "torch_version", "diffusers_version", "transformers_version", "parity_git", "clip_model"):
        if col in results.columns:
            vals = sorted(str(v) for v in results[col].dropna().unique())
            if vals:
                meta[col] = ", ".join(vals)
    if "clip_semantic" in results.columns and results["clip_semantic"].notna().any():
        meta["clip_semantic"] = bool(results["clip_semantic"].dropna().all())
    return meta


def write_summary(run_dir: str | Path, results: pd.DataFrame, gate_result: GateResult | None = None,
                  meta: dict | None = None) -> None:
    """summary.md: header (meta keys run_id, time, *_version, parity_git, clip_model, clip_semantic; any other
    keys are listed after them), the worst value per cell, the gate verdict and the errors."""
    meta = {**meta_from_results(results), **(meta or {})}
    parts = [_header(meta), _cell_table(results), _gate_section(gate_result), _errors_section(results)]
    text = "\n".join(parts)
    _atomic_write(Path(run_dir) / SUMMARY_MD, lambda p: Path(p).write_text(text))


def update_gate_section(run_dir: str | Path, gate_result: GateResult) -> None:
    """Replace the gate section of an existing summary.md (appending one if it has none, creating the file if
    there is none), leaving the rest as the run wrote it."""
    path = Path(run_dir) / SUMMARY_MD
    text = path.read_text() if path.is_file() else "# parity run\n"
    section = _gate_section(gate_result)
    if GATE_BEGIN in text and GATE_END in text:
        head, rest = text.split(GATE_BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(GATE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    _atomic_write(path, lambda p: Path(p).write_text(text))


def cell_label(df: pd.DataFrame) -> pd.Series:
    """The `cell` id where the run recorded one, else the cell columns joined with '/'."""
    joined = df[[c for c in CELL_COLUMNS if c in df.columns]].astype(str).agg("/".join, axis=1)
    return df["cell"].fillna(joined) if "cell" in df.columns else joined


def fmt(x) -> str:
    """Seven significant digits: enough to tell 0.99999 from 0.999991 next to a threshold."""
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.7g}" if isinstance(x, float) else str(x)


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_\n"
    if importlib.util.find_spec("tabulate") is not None:  # pandas' renderer needs it; it is not a dependency
        return df.to_markdown(index=False) + "\n"
    cells = [[fmt(v).replace("|", "\\|").replace("\n", " ") for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _header(meta: dict) -> str:
    g = lambda k: meta.get(k, "not recorded")  # noqa: E731
    lines = [f"# parity run {g('run_id')}", "",
             f"- time: {g('time')}",
             f"- torch {g('torch_version')}, diffusers {g('diffusers_version')}, "
             f"transformers {g('transformers_version')}",
             f"- parity git: {g('parity_git')}",
             f"- CLIP model: {g('clip_model')}"]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in _HEADER_META]
    if meta.get("clip_semantic") is False:
        lines += ["", "**Warning: non-semantic CLIP. CLIP scores and CLIP image similarity come from a model that "
                      "does not encode meaning; they check plumbing, not image content.**"]
    return "\n".join(lines) + "\n"


def _cell_table(results: pd.DataFrame) -> str:
    """Worst value over prompts and seeds per cell x comparison, for every gated metric the run produced."""
    title = "## Worst value per cell (over prompts and seeds)\n\n"
    gated = results[results["metric"].map(lambda m: m in METRICS and metric_spec(m).gated)].copy()
    if gated.empty:
        return title + "_(no gated metrics)_\n"
    gated["cell"] = cell_label(gated)
    ok = gated["status"].eq("ok") & gated["value"].map(lambda v: pd.notna(v) and math.isfinite(v))
    rows = []
    for (cell, comparison), grp in gated.groupby(["cell", "comparison"], sort=True):
        row = {"cell": cell, "comparison": comparison}
        for metric, m in grp.groupby("metric", sort=False):
            vals = m.loc[ok[m.index], "value"]
            bad = len(m) - len(vals)
            row[metric] = " ".join(filter(None, [fmt(_worst(metric, vals)) if len(vals) else "",
                                                 f"({bad} bad)" if bad else ""]))
        rows.append(row)
    order = [c for c in METRICS if c in gated["metric"].unique()]  # registry order, not alphabetical
    table = pd.DataFrame(rows).reindex(columns=["cell", "comparison"] + order).fillna("")
    return title + markdown_table(table)


def _worst(metric: str, values: pd.Series) -> float:
    spec = metric_spec(metric)
    if spec.absolute:
        return float(values.abs().max())
    return float(values.min() if spec.higher_is_better else values.max())


def _gate_section(gate_result: GateResult | None) -> str:
    if gate_result is None:
        body = "Not gated yet: run `python -m harness.gate RUN_DIR`.\n"
    else:
        body = f"**{gate_result.verdict}**: {gate_result.counts()}\n"
        if gate_result.thresholds_path:
            body += f"\nThresholds: `{gate_result.thresholds_path}`\n"
        if gate_result.placeholders:
            body += (f"\n{gate_result.placeholders} of the thresholds used are still PLACEHOLDERs, "
                     f"not measured values.\n")
        if gate_result.errors:
            body += "\nThe gate could not decide:\n\n" + "".join(f"- {e}\n" for e in gate_result.errors)
        failed = gate_result.failed
        if len(failed):
            table = pd.DataFrame({
                "cell": cell_label(failed), "prompt_idx": failed["prompt_idx"] if "prompt_idx" in failed else "",
                "seed": failed["seed"] if "seed" in failed else "",
                "step": failed["step"] if "step" in failed else "",
                "comparison": failed["comparison"], "metric": failed["metric"],
                "value": failed["value"].map(lambda v: "NaN" if pd.isna(v) else fmt(v)),
                "op": failed["op"], "threshold": failed["threshold"], "reason": failed["why"]})
            body += f"\nFailing rows ({len(failed)}):\n\n" + markdown_table(table)
    return f"{GATE_BEGIN}\n## Gate\n\n{body}{GATE_END}\n"


def _errors_section(results: pd.DataFrame) -> str:
    """Rows the run itself marked error (a cell crashed) or invalid (a metric refused its input)."""
    bad = results[results["status"].isin([ERROR, INVALID])].copy()
    title = "## Errors\n\n"
    if bad.empty:
        return title + "_(none)_\n"
    bad["cell"] = cell_label(bad)
    bad["reason"] = bad["reason"].fillna("no reason given")
    grouped = (bad.groupby(["cell", "comparison", "status", "reason"], dropna=False, sort=True)["metric"]
               .agg(rows="size", metrics=lambda m: ", ".join(sorted(set(map(str, m.dropna())))))
               .reset_index())
    return title + markdown_table(grouped)


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    # Same directory, so os.replace is a rename; not mkstemp, whose 0600 mode would outlive the rename.
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""The files of a run folder and how to read them: results.parquet + results.csv (same rows), meta.json, and the
formatting helpers every writer shares. At the bottom of the report/gate import graph: it imports neither.

Every file is written to a temporary name and moved into place, so a crash never leaves half a file that a later
gate would read as a complete run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Callable

import pandas as pd

from harness.schema import CELL_COLUMNS, COLUMNS, STATUSES

RESULTS_PARQUET, RESULTS_CSV, META_JSON, SUMMARY_MD = "results.parquet", "results.csv", "meta.json", "summary.md"
REPORT_HTML, JUNIT_XML, WEIGHTS_CSV, IMAGES_DIR = "report.html", "junit.xml", "weights.csv", "images"

# Column dtypes, so that parquet and csv read back identical. Nullable ints: `step` is <NA> for whole-run metrics.
_INT = ("prompt_idx", "seed", "steps", "height", "width", "step", "weight_bytes")
_FLOAT = ("value", "quantized_fraction")
_BOOL = ("clip_semantic",)
DTYPES = {c: "Int64" if c in _INT else "float64" if c in _FLOAT else "boolean" if c in _BOOL else "str"
          for c in COLUMNS}


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
    atomic_write(run_dir / RESULTS_PARQUET, lambda p: df.to_parquet(p, index=False))
    atomic_write(run_dir / RESULTS_CSV, lambda p: df.to_csv(p, index=False))
    atomic_write(run_dir / META_JSON, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=str)))


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


def cell_label(df: pd.DataFrame) -> pd.Series:
    """The `cell` id where the run recorded one, else the cell columns joined with '/'."""
    parts = df[[c for c in CELL_COLUMNS if c in df.columns]].astype("object").fillna("").astype(str)
    # str.cat, not agg("/".join, axis=1): a Python call per row cost about half a second per 2,000-row report
    joined = (parts.iloc[:, 0].str.cat([parts[c] for c in parts.columns[1:]], sep="/") if len(parts.columns)
              else pd.Series("", index=df.index, dtype=object))
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


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    # Same directory, so os.replace is a rename; not mkstemp, whose 0600 mode would outlive the rename.
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

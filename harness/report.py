"""summary.md: what a person reads first. A header (versions, git, CLIP), the gate verdict, one line per cell
with the metric closest to its threshold and its margin, every failing row and regression, and the errors. The
full table stays in results.parquet and report.html.

Writes only; the judging is harness/gate.py's. The file-format helpers live in harness/runfiles.py (re-exported
here for callers that write a run)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness import tables
from harness.gate import GateResult
from harness.runfiles import (SUMMARY_MD, ResultsError, atomic_write, cell_label, fmt, load_meta,  # noqa: F401
                              load_results, markdown_table, meta_from_results, read_results_csv, write_run)
from harness.schema import ERROR, INVALID

GATE_BEGIN, GATE_END = "<!-- gate:begin -->", "<!-- gate:end -->"  # a re-gate rewrites only what is between
_HEADER_META = ("run_id", "time", "torch_version", "diffusers_version", "transformers_version", "parity_git",
                "clip_model", "clip_semantic")
_atomic_write = atomic_write  # the name tests and older callers use


def write_summary(run_dir: str | Path, results: pd.DataFrame, gate_result: GateResult | None = None,
                  meta: dict | None = None) -> None:
    """summary.md: header (meta keys run_id, time, *_version, parity_git, clip_model, clip_semantic; any other
    keys are listed after them), the gate section (verdict, per-cell lines, failures) and the errors."""
    meta = {**meta_from_results(results), **(meta or {})}
    text = "\n".join([_header(meta), gate_section(gate_result, results), _errors_section(results)])
    atomic_write(Path(run_dir) / SUMMARY_MD, lambda p: Path(p).write_text(text))


def update_gate_section(run_dir: str | Path, gate_result: GateResult) -> None:
    """Replace the gate section of an existing summary.md (appending one if it has none, creating the file if
    there is none), leaving the rest as the run wrote it."""
    path = Path(run_dir) / SUMMARY_MD
    text = path.read_text() if path.is_file() else "# parity run\n"
    section = gate_section(gate_result)
    if GATE_BEGIN in text and GATE_END in text:
        head, rest = text.split(GATE_BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(GATE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write(path, lambda p: Path(p).write_text(text))


def gate_section(gate_result: GateResult | None, results: pd.DataFrame | None = None) -> str:
    """The verdict, one line per cell, then every failing row and regression (also GITHUB_STEP_SUMMARY's text)."""
    if gate_result is None:
        cells = sorted(set(cell_label(results))) if results is not None and len(results) else []
        body = "Not gated yet: run `parity gate RUN_DIR`.\n\n" + "".join(f"- {c}\n" for c in cells)
        return f"{GATE_BEGIN}\n## Gate\n\n{body}{GATE_END}\n"
    body = f"**{gate_result.verdict}**: {gate_result.counts()}\n"
    if gate_result.thresholds_path:
        body += f"\nThresholds: `{gate_result.thresholds_path}`; {gate_result.baseline_note}\n"
    if gate_result.placeholders:
        body += f"\n{gate_result.placeholders} of the thresholds used are still PLACEHOLDERs, not measured values.\n"
    if gate_result.errors:
        body += "\nThe gate could not decide:\n\n" + "".join(f"- {e}\n" for e in gate_result.errors)
    lines = tables.per_cell(tables.per_metric(gate_result.rows), gate_result.regressed)
    if len(lines):
        body += "\n### Cells (the metric closest to its threshold)\n\n"
        for r in lines.itertuples(index=False):
            trouble = ", ".join(filter(None, [f"{r.failed} failing row(s)" if r.failed else "",
                                              f"{r.regressed} regression(s)" if r.regressed else ""]))
            body += (f"- **{r.verdict}** `{r.cell}`" + (f" ({trouble}; first: {r.first_failure})" if trouble and
                                                          r.first_failure else f" ({trouble})" if trouble else "")
                     + (f": {r.bitwise}; other metrics" if r.bitwise else "")
                     + f": {tables.describe_closest(r.closest)}\n")
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
    regressed = gate_result.regressed
    if len(regressed):
        table = regressed[["cell", "prompt_idx", "seed", "comparison", "metric", "value", "baseline", "why"]]
        body += f"\nRegressions against the baseline ({len(regressed)}):\n\n" + markdown_table(table)
    return f"{GATE_BEGIN}\n## Gate\n\n{body}{GATE_END}\n"


def _header(meta: dict) -> str:
    g = lambda k: meta.get(k, "not recorded")  # noqa: E731
    lines = [f"# parity run {g('run_id')}", "",
             f"- time: {g('time')}",
             f"- torch {g('torch_version')}, diffusers {g('diffusers_version')}, "
             f"transformers {g('transformers_version')}",
             f"- parity git: {g('parity_git')}",
             f"- CLIP model: {g('clip_model')}"]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in _HEADER_META]
    lines += ["", "The full table: results.parquet (long format) and report.html (images, plots, every metric)."]
    if meta.get("clip_semantic") is False:
        lines += ["", "**Warning: non-semantic CLIP. CLIP scores and CLIP image similarity come from a model that "
                      "does not encode meaning; they check plumbing, not image content.**"]
    return "\n".join(lines) + "\n"


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

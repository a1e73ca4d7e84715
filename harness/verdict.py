"""Gate a run folder and write what its readers need: the printed verdict, summary.md, report.html and
junit.xml in the folder (and a JUnit file where CI asks, and the markdown on $GITHUB_STEP_SUMMARY).

The import graph runs one way: runfiles <- gate (reads, judges) <- report / html_report / junit (write) <- here.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import pandas as pd

from harness.gate import AUTO, ERROR, GateResult, format_verdict, judge_run
from harness.html_report import write_html
from harness.junit import append_step_summary, write_junit
from harness.report import gate_section, update_gate_section, write_summary
from harness.runfiles import JUNIT_XML, SUMMARY_MD, load_meta


def write_reports(run_dir: str | Path, results: pd.DataFrame, result: GateResult | None, meta: dict) -> None:
    """summary.md and report.html for a run (result None: written before the gate, marked 'not gated')."""
    write_summary(run_dir, results, result, meta)
    write_html(run_dir, results, result, meta)


def gate_run_dir(run_dir: str | Path, thresholds_path: str | Path | None = None, baseline: str | Path | None = AUTO,
                 junit: str | Path | None = None) -> int:
    """Gate run_dir, print the verdict, rewrite its reports; return 0 pass, 1 fail, 2 error."""
    run_dir = Path(run_dir)
    try:
        result, results = judge_run(run_dir, thresholds_path, baseline)
    except Exception:  # an uncaught crash exits 1, which would read as "accuracy failed"; it is an error
        result, results = GateResult.error("gate crashed:\n" + traceback.format_exc()), None
    code = result.exit_code
    try:  # reports first, the printed verdict last: a closed stdout (`| head`) must not cost the files
        suite = str(load_meta(run_dir).get("suite", "parity")) if run_dir.is_dir() else "parity"
        if junit is not None:
            write_junit(junit, result, suite)
        if run_dir.is_dir():
            if results is None or (run_dir / SUMMARY_MD).is_file():
                update_gate_section(run_dir, result)  # keeps the header the run wrote (its meta)
            else:
                write_summary(run_dir, results, result, load_meta(run_dir))
            if results is not None:
                write_html(run_dir, results, result, load_meta(run_dir))
            write_junit(run_dir / JUNIT_XML, result, suite)
        append_step_summary(f"# parity gate: {run_dir.name}\n\n" + gate_section(result))
    except Exception:  # the verdict stands, but reports that could not be written are still an error
        print(format_verdict(result))
        print("GATE ERROR: could not write the reports:\n" + traceback.format_exc(), file=sys.stderr)
        return ERROR
    print(format_verdict(result))
    return code

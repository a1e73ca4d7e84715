"""The merge gate: compare a run's results with golden/thresholds.toml. Exit 0 pass, 1 fail, 2 error.

Rules, in order, for each row:
  - status other than "ok" fails with its reason, whatever the metric (a crashed cell or a refused metric means
    the run cannot vouch for that output);
  - an "ok" row whose value is NaN or Inf fails (schema: only "ok" rows carry finite values, so this is a bug);
  - a gated metric is compared with its threshold, |value| for absolute metrics;
  - other metrics are not judged here; they stay in the results and the report.
Anything that stops a verdict (no threshold for a gated key, ambiguous thresholds, unreadable files) is an error,
exit 2, never a default.

    python -m harness.gate RUN_DIR [--thresholds PATH]
"""
from __future__ import annotations

import argparse
import math
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness import selfcheck
from harness.metrics import METRICS, metric_spec
from harness.report import (SUMMARY_MD, ResultsError, cell_label, fmt, load_meta, load_results,
                            update_gate_section, write_summary)
from harness.schema import GATE_KEY, OK
from harness.thresholds import Threshold, ThresholdError, Thresholds, format_key, load_thresholds

PASS, FAIL, ERROR = 0, 1, 2
VERDICTS = {PASS: "PASS", FAIL: "FAIL", ERROR: "ERROR"}
NEEDED = GATE_KEY + ("value", "status", "reason")
ADDED = ("threshold", "op", "passed", "why")


@dataclass
class GateResult:
    rows: pd.DataFrame  # every evaluated row: its results columns, then threshold, op, passed (NA: undecided), why
    errors: list[str] = field(default_factory=list)
    placeholders: int = 0  # distinct thresholds used whose source is still a placeholder
    thresholds_path: Path | None = None

    @classmethod
    def error(cls, message: str) -> GateResult:
        return cls(pd.DataFrame(columns=list(NEEDED + ADDED)), [message])

    @property
    def failed(self) -> pd.DataFrame:
        return self.rows[self.rows["passed"].eq(False).fillna(False).astype(bool)]

    @property
    def exit_code(self) -> int:
        return ERROR if self.errors else FAIL if len(self.failed) else PASS

    @property
    def verdict(self) -> str:
        return VERDICTS[self.exit_code]

    def counts(self) -> str:
        n, bad = len(self.rows), len(self.failed)
        text = f"{bad} of {n} evaluated rows failed" if bad else f"{n} evaluated rows, none failed"
        undecided = int(self.rows["passed"].isna().sum())
        text += f", {undecided} undecided (no threshold)" if undecided else ""
        return text + (f", {len(self.errors)} error(s)" if self.errors else "")


def gate(results: pd.DataFrame, thresholds: Thresholds) -> GateResult:
    """Judge every row that the rules above apply to. Pure: reads nothing, writes nothing, prints nothing."""
    missing_cols = [c for c in NEEDED if c not in results.columns]
    if missing_cols:
        return GateResult.error(f"results lack column(s) {missing_cols}")
    if results.empty:
        return GateResult.error("results table is empty: nothing to gate")

    results = results.reset_index(drop=True)  # rows are matched back by label below; labels must be unique
    results, controls = selfcheck.split(results)  # issue 16: negative controls are judged against engine thresholds
    if results.empty:
        return GateResult.error("results hold only negative controls: nothing to gate")
    errors: list[str] = []
    ok = results["status"].eq(OK).fillna(False).astype(bool)
    unknown = sorted(set(results.loc[ok, "metric"].astype(str)) - set(METRICS))
    if unknown:
        errors.append(f"unknown metric(s) {unknown} in results; the registry knows {sorted(METRICS)}")
    gated = results["metric"].map(lambda m: m in METRICS and metric_spec(m).gated).astype(bool)
    values = pd.to_numeric(results["value"], errors="coerce").astype("float64")
    finite = pd.Series(np.isfinite(values.to_numpy()), index=results.index)
    rows = results[gated | ~ok | ~finite].copy()
    if rows.empty:
        return GateResult.error("results hold no gated metric rows: nothing to gate")

    keys = list(rows[list(GATE_KEY)].itertuples(index=False, name=None))
    rules, missing = _lookup_all({k for k, g in zip(keys, gated[rows.index]) if g}, thresholds, errors)
    if missing:
        where = thresholds.path or "the thresholds"
        # Say which cells lack thresholds first (the usual cause: a new mode was added to a suite), then examples.
        cells = sorted({" ".join(m.split()[:2]) for m in missing})
        shown = "; ".join(missing[:8]) + (f"; ... {len(missing) - 8} more" if len(missing) > 8 else "")
        errors.append(f"no threshold for {len(missing)} gated key(s) in {len(cells)} cell/comparison(s) "
                      f"[{', '.join(cells[:12])}{', ...' if len(cells) > 12 else ''}]; add them to {where}: {shown}")

    used = [rules.get(k) if g else None for k, g in zip(keys, gated[rows.index])]
    verdicts = [_judge(*args) for args in zip(rows["status"], rows["reason"], values[rows.index], used)]
    rows["threshold"] = [t.value if t else math.nan for t in used]
    rows["op"] = pd.Series([t.op if t else None for t in used], index=rows.index, dtype="str")
    rows["passed"] = pd.array([p for p, _ in verdicts], dtype="boolean")
    rows["why"] = [w for _, w in verdicts]
    placeholders = len({t.index for t in used if t is not None and t.placeholder})
    return selfcheck.extend(GateResult(rows, errors, placeholders, thresholds.path),
                            *selfcheck.judge_controls(controls, thresholds))


def _lookup_all(keys: set, thresholds: Thresholds, errors: list[str]) -> tuple[dict, list[str]]:
    """One lookup per distinct key. Ambiguities go to errors; unmatched keys come back as 'missing'."""
    rules, missing = {}, []
    for key in sorted(keys, key=format_key):
        try:
            rule = thresholds.lookup(key)
        except ThresholdError as e:
            errors.append(str(e))
            continue
        if rule is None:
            missing.append(format_key(key))
        else:
            rules[key] = rule
    return rules, missing


def _judge(status, reason, value: float, rule: Threshold | None) -> tuple[object, str]:
    """(passed, why) for one row; passed is NA when a gated row has no usable threshold."""
    if status != OK:
        return False, f"status {status}: {reason if isinstance(reason, str) and reason else 'no reason given'}"
    if not math.isfinite(value):
        return False, f"value is {'NaN' if math.isnan(value) else value}"
    if rule is None:
        return pd.NA, "no threshold"
    if rule.passes(value):
        return True, ""
    absolute = metric_spec(rule.metric).absolute
    shown = f"|value| {fmt(abs(value))}" if absolute else f"value {fmt(value)}"
    note = f" ({reason})" if isinstance(reason, str) and reason else ""  # e.g. which library versions moved
    return False, f"{shown} is not {rule.op} {fmt(rule.value)}{note}"


def format_verdict(result: GateResult, limit: int = 10) -> str:
    """What the gate prints: the verdict, counts, the errors and the first `limit` failing rows."""
    lines = [f"GATE {result.verdict}: {result.counts()}"]
    lines += [f"  error: {e}" for e in result.errors]
    failed = result.failed
    if len(failed):
        labels = cell_label(failed)
        for (idx, r), label in zip(failed.head(limit).iterrows(), labels):
            where = " ".join(f"{c} {fmt(r[c])}" for c in ("prompt_idx", "seed", "step") if c in r and pd.notna(r[c]))
            lines.append(f"  {label} {r['comparison']} {r['metric']} {where}: {r['why']}")
        if len(failed) > limit:
            lines.append(f"  ... and {len(failed) - limit} more failing rows (all are listed in {SUMMARY_MD})")
    if result.placeholders:
        lines.append(f"  note: {result.placeholders} threshold(s) used are PLACEHOLDERs, not measured values")
    return "\n".join(lines)


def gate_run_dir(run_dir: str | Path, thresholds_path: str | Path | None = None) -> int:
    """Gate run_dir/results.parquet, print the verdict, rewrite the gate section of summary.md; return 0/1/2."""
    run_dir = Path(run_dir)
    results = None
    try:
        results = load_results(run_dir)
        result = gate(results, load_thresholds(thresholds_path))
        result = selfcheck.extend(result, *selfcheck.run_failures(results, load_meta(run_dir), run_dir))  # issue 16
    except (ResultsError, ThresholdError) as e:
        result = GateResult.error(str(e))
    except Exception:  # an uncaught crash exits 1, which would read as "accuracy failed"; it is an error
        result = GateResult.error("gate crashed:\n" + traceback.format_exc())
    print(format_verdict(result))
    if run_dir.is_dir():
        try:
            if (run_dir / SUMMARY_MD).is_file() or results is None:
                update_gate_section(run_dir, result)
            else:
                write_summary(run_dir, results, result, load_meta(run_dir))
        except Exception:  # the verdict stands, but a summary that could not be written is still an error
            print("GATE ERROR: could not write summary:\n" + traceback.format_exc(), file=sys.stderr)
            return ERROR
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--thresholds", type=Path, default=None, help="default: golden/thresholds.toml")
    args = parser.parse_args(argv)
    return gate_run_dir(args.run_dir, args.thresholds)


if __name__ == "__main__":
    sys.exit(main())

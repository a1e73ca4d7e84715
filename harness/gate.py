"""The merge gate: judge a run's results against golden/thresholds.toml and, where one was accepted, against the
baseline of its suite. Reads and judges; writes nothing (harness/report.py writes, harness/verdict.py does both).
Exit codes: 0 pass, 1 fail, 2 error.

Rules, in order, for each row:
  - status other than "ok" fails with its reason, whatever the metric (a crashed cell or a refused metric means
    the run cannot vouch for that output);
  - an "ok" row whose value is NaN or Inf fails (schema: only "ok" rows carry finite values, so this is a bug);
  - a gated metric is compared with its threshold, |value| for absolute metrics;
  - a gated metric with a baseline sample must not be worse than it by more than its tolerance (harness/baseline.py);
  - other metrics are not judged here; they stay in the results and the report.
Anything that stops a verdict (no threshold for a gated key, ambiguous thresholds, unreadable files) is an error,
exit 2, never a default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness import baseline as B
from harness import selfcheck
from harness.metrics import METRICS, metric_spec
from harness.runfiles import SUMMARY_MD, ResultsError, cell_label, fmt, load_meta, load_results
from harness.schema import GATE_KEY, OK
from harness.thresholds import Threshold, ThresholdError, Thresholds, format_key, load_thresholds

PASS, FAIL, ERROR = 0, 1, 2
VERDICTS = {PASS: "PASS", FAIL: "FAIL", ERROR: "ERROR"}
NEEDED = GATE_KEY + ("value", "status", "reason")
ADDED = ("threshold", "op", "passed", "why", "tier")  # tier: "threshold", "bitwise" (an exactness tier) or NA
AUTO = "auto"
EXACT_OP = "=="  # the op of a row judged by an exactness tier
BITWISE = "bitwise"  # its tier  # baseline argument: the suite's accepted baseline if there is one


@dataclass
class GateResult:
    rows: pd.DataFrame  # every evaluated row: its results columns, then threshold, op, passed (NA: undecided), why
    errors: list[str] = field(default_factory=list)
    placeholders: int = 0  # distinct thresholds used whose source is still a placeholder
    thresholds_path: Path | None = None
    regressions: pd.DataFrame | None = None  # baseline.regressions(): one row per sample judged against it
    baseline_note: str = "no baseline"  # which baseline was used, or why none

    @classmethod
    def error(cls, message: str) -> GateResult:
        return cls(pd.DataFrame(columns=list(NEEDED + ADDED)), [message])

    @property
    def failed(self) -> pd.DataFrame:
        return self.rows[self.rows["passed"].eq(False).fillna(False).astype(bool)]

    @property
    def regressed(self) -> pd.DataFrame:
        if self.regressions is None or self.regressions.empty:
            return pd.DataFrame(columns=list(B.KEY) + ["value", "baseline", "why"])
        return self.regressions[~self.regressions["passed"].astype(bool)]

    @property
    def exit_code(self) -> int:
        return ERROR if self.errors else FAIL if len(self.failed) or len(self.regressed) else PASS

    @property
    def verdict(self) -> str:
        return VERDICTS[self.exit_code]

    def counts(self) -> str:
        n, bad = len(self.rows), len(self.failed)
        text = f"{bad} of {n} evaluated rows failed" if bad else f"{n} evaluated rows, none failed"
        undecided = int(self.rows["passed"].isna().sum())
        text += f", {undecided} undecided (no threshold)" if undecided else ""
        if "tier" in self.rows.columns and (bitwise := self.rows["tier"].eq(BITWISE).fillna(False)).any():
            exact = bitwise & self.rows["passed"].eq(True).fillna(False)
            text += f"; {int(bitwise.sum())} judged bitwise (exactness tier), {int(exact.sum())} exact"
        if self.regressions is not None:
            text += f"; {len(self.regressed)} of {len(self.regressions)} samples regressed against the baseline"
        return text + (f", {len(self.errors)} error(s)" if self.errors else "")


def gate(results: pd.DataFrame, thresholds: Thresholds, baseline: pd.DataFrame | None = None,
         tolerances: B.Tolerances | None = None) -> GateResult:
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

    # A threshold may be specific to the engine's speed-up switches (a compiled cell's floors) and to the device kind
    # it was measured on (GPU kernels sum in other orders): key by the row's label and device too.
    optimize = _labels(rows, "optimize", thresholds.keyed_by_optimize, errors,
                       "thresholds keyed by the engine's switches cannot be told apart")
    device = _labels(rows, "device", thresholds.keyed_by_device, errors,
                     "thresholds keyed by device kind cannot be told apart")
    size = _labels(rows, "size", thresholds.keyed_by_size, errors, "thresholds keyed by zoo size cannot be told apart")
    keys = list(zip(rows[list(GATE_KEY)].itertuples(index=False, name=None), optimize, device, size))
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
    rows["tier"] = pd.Series(["threshold" if t else None for t in used], index=rows.index, dtype="str")
    _judge_exact(rows, values[rows.index], thresholds, errors)
    placeholders = len({t.index for t in used if t is not None and t.placeholder})
    result = GateResult(rows, errors, placeholders, thresholds.path)
    if baseline is not None:
        if tolerances is None:
            raise ValueError("a baseline needs its tolerances (baseline.load_tolerances())")
        try:
            result.regressions = B.regressions(results, baseline, tolerances)
            new, gone = B.unmatched(results, baseline)
            result.baseline_note = (f"{len(result.regressions)} samples compared with the baseline"
                                    + (f"; {new} sample(s) have no baseline yet (new cells)" if new else "")
                                    + (f"; {gone} baseline sample(s) absent from this run" if gone else ""))
        except B.BaselineError as e:
            result.errors.append(str(e))
    return selfcheck.extend(result, *selfcheck.judge_controls(controls, thresholds))


def _judge_exact(rows: pd.DataFrame, values: pd.Series, thresholds: Thresholds, errors: list[str]) -> None:
    """Where an exactness tier covers a row's cell on its device (engine measured bitwise equal there), the row is
    judged against the metric's identical-input value instead of its floor: any difference fails. In place."""
    if not thresholds.exact:
        return
    if missing := [c for c in ("device", "optimize") if c not in rows.columns]:
        errors.append(f"results lack column(s) {missing}: the exactness tiers of the thresholds cannot be judged")
        return
    cache: dict[tuple, object] = {}
    floor_passed = pd.array([pd.NA] * len(rows), dtype="boolean")
    hits, whys = [], []  # positions judged by a tier, and their verdicts: written back in one assignment per column
    columns = ["metric", "status", "model", "dtype", "quant", "parallel", "device", "optimize", "comparison"]
    columns += ["size"] if "size" in rows.columns else []  # results from before the column: rules for any size
    for pos, (metric, status, *key) in enumerate(rows[columns].itertuples(index=False, name=None)):
        spec = METRICS.get(metric)
        if spec is None or spec.identical is None or not spec.gated or status != OK:
            continue
        key = tuple(key)
        if key not in cache:
            try:
                cache[key] = thresholds.exact_rule(key[:4], *key[4:])
            except ThresholdError as e:
                errors.append(str(e))
                cache[key] = None
        rule = cache[key]
        if rule is None:
            continue
        value = values.iloc[pos]
        exact = bool(value == spec.identical)
        hits.append((pos, spec.identical, exact))
        whys.append("" if exact else
                    f"not bitwise: value {float(value)!r} != {fmt(spec.identical)} ({rule.label()}: measured exact)")
    if not hits:
        rows["floor_passed"] = floor_passed
        return
    at = [pos for pos, _, _ in hits]
    floor_passed[at] = rows["passed"].array[at]  # what the floor alone said (selftest: fragility)
    rows["floor_passed"] = floor_passed
    labels = rows.index[at]
    rows.loc[labels, "threshold"] = [identical for _, identical, _ in hits]
    rows.loc[labels, "op"] = EXACT_OP
    rows.loc[labels, "tier"] = BITWISE
    rows.loc[labels, "passed"] = [exact for _, _, exact in hits]
    rows.loc[labels, "why"] = whys


def _labels(rows: pd.DataFrame, column: str, keyed: bool, errors: list[str], why: str) -> list:
    """The column's values (None where missing) for the lookup key; a results table without the column matches only
    rules for any value, which is an error where the thresholds do key on it."""
    if column in rows.columns:
        return rows[column].astype(object).where(rows[column].notna(), None).tolist()
    if keyed:
        errors.append(f"results lack the {column} column: {why} (only rules for any {column} were used)")
    return [None] * len(rows)


def _lookup_all(keys: set, thresholds: Thresholds, errors: list[str]) -> tuple[dict, list[str]]:
    """One lookup per distinct (key, optimize, device, size). Ambiguities go to errors; unmatched keys come back as
    'missing', with the device and size named where the thresholds key on them (a cuda run may lack rules a cpu run
    has)."""
    rules, missing = {}, []
    for key, optimize, device, size in sorted(keys, key=lambda k: (format_key(k[0]), *map(str, k[1:]))):
        try:
            rule = thresholds.lookup(key, optimize, device, size)
        except ThresholdError as e:
            errors.append(str(e))
            continue
        if rule is None:
            missing.append(format_key(key) + ("" if optimize in (None, "eager") else f" optimize={optimize}")
                           + (f" device={device}" if thresholds.keyed_by_device and device is not None else "")
                           + (f" size={size}" if thresholds.keyed_by_size and size is not None else ""))
        else:
            rules[key, optimize, device, size] = rule
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


def judge_run(run_dir: str | Path, thresholds_path: str | Path | None = None,
              baseline: str | Path | None = AUTO) -> tuple[GateResult, pd.DataFrame | None]:
    """Read run_dir and judge it: (result, results or None when unreadable). baseline: a path, AUTO (the
    accepted baseline of the run's suite when one exists) or None (thresholds only). Never raises on bad input."""
    results = None
    try:
        results = load_results(run_dir)
        base, tolerances, note = _baseline_for(run_dir, baseline)
        result = gate(results, load_thresholds(thresholds_path), base, tolerances)
        result = selfcheck.extend(result, *selfcheck.run_failures(results, load_meta(run_dir), run_dir))  # issue 16
        if base is None:
            result.baseline_note = note
    except (ResultsError, ThresholdError, B.BaselineError) as e:
        result = GateResult.error(str(e))
    return result, results


def _baseline_for(run_dir, baseline) -> tuple[pd.DataFrame | None, B.Tolerances | None, str]:
    if baseline is None:
        return None, None, "baseline not checked (--no-baseline)"
    if baseline == AUTO:
        suite = load_meta(run_dir).get("suite")
        path = B.baseline_path(suite) if suite else None
        if path is None or not path.is_file():
            return None, None, (f"no accepted baseline for suite {suite!r} (`parity baseline accept RUN` "
                                f"writes {B.BASELINE_DIR.name}/{suite}.parquet)" if suite else
                                "no baseline: meta.json names no suite")
        baseline = path
    return B.load_baseline(baseline), B.load_tolerances(), f"baseline {baseline}"


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
    regressed = result.regressed
    for _, r in regressed.head(limit).iterrows():
        where = " ".join(f"{c} {fmt(r[c])}" for c in ("prompt_idx", "seed") if pd.notna(r[c]))
        lines.append(f"  REGRESSION {r['cell']} {r['comparison']} {r['metric']} {where}: {r['why']}")
    if len(regressed) > limit:
        lines.append(f"  ... and {len(regressed) - limit} more regressions (all are listed in {SUMMARY_MD})")
    lines.append(f"  {result.baseline_note}")
    if result.placeholders:
        lines.append(f"  note: {result.placeholders} threshold(s) used are PLACEHOLDERs, not measured values")
    return "\n".join(lines)

"""The judged rows of a gate, aggregated for readers: one row per cell x comparison x metric (its worst sample
against its threshold, with the margin) and one line per cell (the metric closest to its threshold). Pure
pandas on GateResult frames; the summary, the HTML report and the JUnit file all read these."""
from __future__ import annotations

import math

import pandas as pd

from harness.margins import budget_used, margin
from harness.runfiles import cell_label, fmt
from harness.schema import NEGATIVE_CONTROL, OK

METRIC_COLUMNS = ["cell", "comparison", "metric", "samples", "failed", "value", "op", "threshold", "margin",
                  "budget_used", "prompt_idx", "seed", "why"]


def per_metric(rows: pd.DataFrame) -> pd.DataFrame:
    """rows: GateResult.rows. The worst sample is the one using most of its threshold's error budget; a row that
    is not ok (crash, refused metric) or has no threshold is shown by its reason instead of a value.

    One pass over plain columns: slicing a frame per group cost seconds per call on a 2,000-row smoke run, and
    every report (summary, HTML, JUnit, step summary) calls this."""
    if rows.empty:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    rows = rows.reset_index(drop=True)
    keys = pd.DataFrame({"cell": cell_label(rows), "comparison": rows["comparison"], "metric": rows["metric"]})
    group = keys.groupby(list(keys.columns), sort=True, dropna=False).ngroup().to_numpy()
    col = {c: rows[c].tolist() if c in rows.columns else [pd.NA] * len(rows)
           for c in ("value", "threshold", "op", "why", "prompt_idx", "seed")}
    judged = (rows["status"].eq(OK).fillna(False).astype(bool) & rows["threshold"].notna()).tolist()
    judged = [j and pd.notna(v) and math.isfinite(v) for j, v in zip(judged, col["value"])]
    failed = rows["passed"].eq(False).fillna(False).astype(bool).tolist()
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group):  # each group's rows in their original order
        members.setdefault(int(g), []).append(i)
    out = []
    for g in sorted(members):
        idx = members[g]
        cell, comparison, metric = keys.iloc[idx[0]]
        bad = [i for i in idx if failed[i]]
        row = {"cell": cell, "comparison": comparison, "metric": metric, "samples": len(idx),
               "failed": len(bad), "value": math.nan, "op": "", "threshold": math.nan, "margin": math.nan,
               "budget_used": math.nan, "prompt_idx": pd.NA, "seed": pd.NA,
               "why": col["why"][bad[0]] if bad else ""}
        ok = [i for i in idx if judged[i]]
        if ok:
            # An exactness tier allows no error: exact uses none of it, any difference all of it (and more).
            budgets = [(0.0 if col["value"][i] == col["threshold"][i] else math.inf) if col["op"][i] == "=="
                       else budget_used(metric, col["value"][i], col["threshold"][i]) for i in ok]
            k = max(range(len(budgets)), key=budgets.__getitem__)
            w = ok[k]
            value, threshold = float(col["value"][w]), float(col["threshold"][w])
            row.update(value=value, op=col["op"][w], threshold=threshold,
                       margin=margin(metric, value, col["op"][w], threshold), budget_used=budgets[k],
                       prompt_idx=col["prompt_idx"][w], seed=col["seed"][w])
        elif not bad:
            row["why"] = col["why"][idx[0]]  # e.g. "no threshold"
        out.append(row)
    return pd.DataFrame(out, columns=METRIC_COLUMNS)


def per_cell(metrics: pd.DataFrame, regressed: pd.DataFrame | None = None) -> pd.DataFrame:
    """One line per cell: PASS/FAIL, failing rows, regressions, and the metric closest to its threshold."""
    lines = []
    regressed = regressed if regressed is not None else pd.DataFrame(columns=["cell"])
    for cell, grp in metrics.groupby("cell", sort=True):
        n_failed, n_regressed = int(grp["failed"].sum()), int((regressed["cell"] == cell).sum())
        # A negative control must fail its threshold by design: it is never the metric "closest to its threshold".
        judged = grp[grp["budget_used"].notna() & grp["comparison"].ne(NEGATIVE_CONTROL)]
        closest = judged.loc[judged["budget_used"].idxmax()] if len(judged) else None
        lines.append({"cell": cell, "verdict": "FAIL" if n_failed or n_regressed else "PASS",
                      "failed": n_failed, "regressed": n_regressed,
                      "closest": closest, "first_failure": next((w for w in grp["why"] if w), ""),
                      "bitwise": describe_bitwise(grp)})
    return pd.DataFrame(lines, columns=["cell", "verdict", "failed", "regressed", "closest", "first_failure",
                                        "bitwise"])


def describe_bitwise(metrics: pd.DataFrame) -> str:
    """'bitwise: 11 of 11 metrics exact (exactness tier)' for a cell's per-metric rows judged by an exactness tier
    (op "=="), '' when none is."""
    exact_tier = metrics[metrics["op"].eq("==")]
    if exact_tier.empty:
        return ""
    comparisons = ", ".join(sorted(set(exact_tier["comparison"].astype(str))))
    return (f"bitwise ({comparisons}): {int(exact_tier['failed'].eq(0).sum())} of {len(exact_tier)} metrics exact "
            f"(exactness tier)")


def describe_closest(c) -> str:
    """'engine_vs_reference single_step_cosine 0.998 (>= 0.99695): margin +0.00105, 50% of its error budget'."""
    if c is None or (isinstance(c, float) and math.isnan(c)):
        return "no judged metric"
    where = ", ".join(f"{k} {fmt(c[k])}" for k in ("seed", "prompt_idx") if pd.notna(c[k]))
    budget = "100%+" if math.isinf(c["budget_used"]) else f"{c['budget_used'] * 100:.3g}%"
    return (f"{c['comparison']} {c['metric']} {fmt(c['value'])} ({c['op']} {fmt(c['threshold'])}): "
            f"margin {c['margin']:+.4g}, {budget} of its error budget" + (f" [{where}]" if where else ""))

"""`parity merge`: the run folders of `parity sweep --shard K/N` (K = 1..N) back into one report.

The shards must be one sweep cut N ways: the same suite (every cell field, prompts and seeds), backend, golden
setting and library versions, each of shards 1..N exactly once, and together every cell of the suite. Anything
else is an error (exit 2), never a partial report that a gate would pass. The rows come out in suite order, so the
merged report reads like one whole-suite run; each row keeps the run id of the shard that produced it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from harness.runfiles import load_meta, load_results, write_run
from harness.verdict import write_reports
from harness.runstore import CHECKED, IMAGES, PLAN, WEIGHTS, read_plan

SAME = tuple(k for k in CHECKED if k not in ("cells", "shard"))  # what every shard of one sweep shares


class MergeError(ValueError):
    pass


def _plans(run_dirs: list[Path]) -> list[dict]:
    plans = []
    for d in run_dirs:
        if not (d / "results.parquet").is_file():
            raise MergeError(f"{d}: no results.parquet (an unfinished shard? finish it with `parity sweep --resume`)")
        if not (d / PLAN).is_file():
            raise MergeError(f"{d}: no {PLAN}; only run folders written by `parity sweep` can be merged")
        plans.append(read_plan(d))
    return plans


def check_shards(run_dirs: list[Path], plans: list[dict]) -> list[str]:
    """The suite's cell order, after checking that the shards make up exactly one sweep."""
    first = plans[0]
    for d, plan in zip(run_dirs[1:], plans[1:]):
        diffs = [k for k in SAME if plan.get(k) != first.get(k)]
        if diffs:
            raise MergeError(f"{d} is not a shard of the same sweep as {run_dirs[0]}: they differ in {diffs}")
    shards = [p["shard"] for p in plans]
    if None in shards:
        unsharded = [str(d) for d, s in zip(run_dirs, shards) if s is None]
        if len(plans) > 1:
            raise MergeError(f"{unsharded} ran the whole suite, not a shard; merge only `--shard K/N` runs")
    else:
        counts = {int(s.split("/")[1]) for s in shards}
        if len(counts) != 1:
            raise MergeError(f"the shards were cut different ways: {shards}")
        n = counts.pop()
        seen = sorted(int(s.split("/")[0]) for s in shards)
        if seen != list(range(1, n + 1)):
            dupes = sorted({k for k in seen if seen.count(k) > 1})
            missing = sorted(set(range(1, n + 1)) - set(seen))
            raise MergeError(f"need shards 1..{n} of {n} exactly once: missing {[f'{k}/{n}' for k in missing]}, "
                             f"duplicated {[f'{k}/{n}' for k in dupes]}")
    cells = [c for p in plans for c in p["cells"]]
    if sorted(cells) != sorted(first["all_cells"]):
        extra = sorted({c for c in cells if cells.count(c) > 1} | (set(cells) - set(first["all_cells"])))
        raise MergeError(f"the shards do not hold each cell of the suite once: missing "
                         f"{sorted(set(first['all_cells']) - set(cells))}, extra or repeated {extra}")
    return first["all_cells"]


def merge_runs(run_dirs: list[Path], out: Path) -> Path:
    """Write the merged report to `out` (results, meta, summary without a gate verdict, images, weights.csv)."""
    run_dirs = [Path(d) for d in run_dirs]
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; merge into a new folder")
    plans = _plans(run_dirs)
    order = check_shards(run_dirs, plans)
    rank = {name: i for i, name in enumerate(order)}
    frames = [load_results(d) for d in run_dirs]
    frame = pd.concat(frames, ignore_index=True)
    # Suite order of cells; within a cell, the order its shard wrote (stable sort).
    frame = frame.iloc[frame["cell"].map(rank).argsort(kind="stable")].reset_index(drop=True)
    metas = [load_meta(d) for d in run_dirs]
    meta = {**metas[0], "run_id": out.name, "merged_from": [str(d) for d in run_dirs],
            "seconds": round(sum(m.get("seconds", 0) for m in metas), 1)}
    meta.pop("shard", None)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / IMAGES).mkdir(parents=True)
    try:
        for d in run_dirs:
            for folder in sorted((d / IMAGES).iterdir()) if (d / IMAGES).is_dir() else []:
                shutil.copytree(folder, tmp / IMAGES / folder.name)
        weights = [pd.read_csv(d / WEIGHTS) for d in run_dirs if (d / WEIGHTS).is_file()]
        if weights:
            table = pd.concat(weights, ignore_index=True)
            table.iloc[table["cell"].map(rank).argsort(kind="stable")].to_csv(tmp / WEIGHTS, index=False)
        # The row counts each shard planned (issue 16's dropped-rows check), joined: cells are disjoint across shards.
        expected = {}
        for d, m in zip(run_dirs, metas):
            if "expected_rows_file" in m:
                expected.update(json.loads((d / m["expected_rows_file"]).read_text()))
        if expected:
            (tmp / metas[0]["expected_rows_file"]).write_text(json.dumps(expected, indent=1, sort_keys=True))
            meta["expected_rows_total"] = sum(expected.values())
        plan = {**plans[0], "cells": order, "shard": None, "merged_from": [str(d) for d in run_dirs]}
        (tmp / PLAN).write_text(json.dumps(plan, indent=2, default=str))
        write_run(tmp, frame, meta)
        write_reports(tmp, frame, None, meta)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

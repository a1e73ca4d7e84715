"""The unfinished run folder (`<out>/.tmp-<run id>/`) as a store of finished cells, so that a sweep can resume.

Each cell runs into a staging folder of its own; when it finishes, its images move into images/, its per-layer
weight table and its rows are written under cells/, the rows last and atomically: a cell is complete exactly when
cells/<cell>.parquet exists. A sweep killed in the middle of a cell therefore loses that cell only, and
`parity sweep --resume` re-runs just the cells without rows (and those that ended in error rows, which are often
transient on a cluster: a lost node, a timeout).

plan.json records what the run was asked to do (the suite's cells, seeds, prompts and sampling, the shard, the
backend, the library versions and parity's git state, and the command-line options). A resume must match it: rows
of two different suites or library versions never end up in one report.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import pandas as pd

from harness.runfiles import DTYPES
from harness.schema import ERROR
from harness.suites import Cell, Suite

PLAN, CELLS, IMAGES, WEIGHTS = "plan.json", "cells", "images", "weights.csv"
# Per-layer tables a cell may write beside its rows (weights.csv: L0 weight SQNR; the quant oracle's two tables);
# each is committed with the cell and concatenated over cells into the run folder.
TABLES = (WEIGHTS, "quant_oracle.csv", "quant_layers.csv")
TMP_PREFIX = ".tmp-"
# Plan entries a resume may not change; "options" may (an executor, a cache folder: they do not change values).
CHECKED = ("suite", "suite_fingerprint", "all_cells", "cells", "shard", "backend", "golden", "versions")


class ResumeError(ValueError):
    """The folder cannot be resumed as asked; the message says why. The CLI exits 2."""


def slug(cell: Cell | str) -> str:
    return (cell if isinstance(cell, str) else cell.name).replace("/", "_")


def suite_fingerprint(suite: Suite) -> str:
    """Every cell field, the prompts and the seeds: an edited suite file cannot resume an old run."""
    return hashlib.sha256(repr((suite.name, suite.prompts, suite.seeds, suite.cells)).encode()).hexdigest()[:16]


def make_plan(suite: Suite, cells: Sequence[Cell], shard: str | None, backend: str, golden: bool,
              versions: dict, options: dict) -> dict:
    return {"suite": suite.name, "suite_path": str(suite.path), "suite_fingerprint": suite_fingerprint(suite),
            "all_cells": [c.name for c in suite.cells], "cells": [c.name for c in cells], "shard": shard,
            "backend": backend, "golden": golden, "versions": dict(versions), "options": dict(options)}


def read_plan(run_dir: Path) -> dict:
    path = Path(run_dir) / PLAN
    if not path.is_file():
        raise ResumeError(f"{run_dir} has no {PLAN}: not a run folder written by this version of parity sweep")
    return json.loads(path.read_text())


def tmp_dir(out_root: Path, run_id: str) -> Path:
    return Path(out_root) / f"{TMP_PREFIX}{run_id}"


def locate(run_dir: str | Path) -> tuple[Path, str]:
    """(out root, run id) of an unfinished run given as its .tmp- folder or as the final name it will get."""
    path = Path(run_dir)
    name = path.name
    run_id = name[len(TMP_PREFIX):] if name.startswith(TMP_PREFIX) else name
    tmp = tmp_dir(path.parent, run_id)
    if not tmp.is_dir():
        if (path.parent / run_id / "results.parquet").is_file():
            raise ResumeError(f"run {run_id} in {path.parent} is complete: nothing to resume "
                              f"(gate it again with `parity gate {path.parent / run_id}`)")
        raise ResumeError(f"no unfinished run at {tmp} (pass the .tmp-<run id> folder an interrupted sweep left)")
    return path.parent, run_id


class CellStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def create(cls, root: Path, plan: dict) -> "CellStore":
        shutil.rmtree(root, ignore_errors=True)
        (root / IMAGES).mkdir(parents=True)
        (root / CELLS).mkdir()
        _write_atomic(root / PLAN, json.dumps(plan, indent=2, default=str).encode())
        return cls(root)

    @classmethod
    def reopen(cls, root: Path, plan: dict) -> "CellStore":
        saved = read_plan(root)
        diffs = [f"{k}: {_short(saved.get(k))} then, {_short(plan.get(k))} now" for k in CHECKED
                 if saved.get(k) != json.loads(json.dumps(plan.get(k), default=str))]
        if diffs:
            raise ResumeError(f"cannot resume {root}: the run differs from the one it began as ("
                              + "; ".join(diffs) + "). Start a new run instead.")
        (root / IMAGES).mkdir(exist_ok=True)
        (root / CELLS).mkdir(exist_ok=True)
        return cls(root)

    def rows_path(self, cell: Cell | str) -> Path:
        return self.root / CELLS / f"{slug(cell)}.parquet"

    def done(self, cell: Cell | str) -> bool:
        """Rows on disk and none of them an error row (a crashed cell is tried again)."""
        path = self.rows_path(cell)
        if not path.is_file():
            return False
        return not pd.read_parquet(path, columns=["status"])["status"].eq(ERROR).any()

    def stage(self, cell: Cell) -> Path:
        """An empty folder for the cell to write its images and weight table into before it is complete."""
        path = self.root / CELLS / f".stage-{slug(cell)}"
        shutil.rmtree(path, ignore_errors=True)
        (path / IMAGES).mkdir(parents=True)
        return path

    def commit(self, cell: Cell, rows: list[dict], stage: Path) -> None:
        """Publish a finished cell: images, then its weight table, then (atomically, last) its rows."""
        for folder in sorted((stage / IMAGES).iterdir()) if (stage / IMAGES).is_dir() else []:
            target = self.root / IMAGES / folder.name
            shutil.rmtree(target, ignore_errors=True)  # a re-run cell replaces the images of its lost attempt
            os.replace(folder, target)
        for table in TABLES:
            target = self.root / CELLS / f"{slug(cell)}.{table}"
            if (stage / table).is_file():
                os.replace(stage / table, target)
            else:
                target.unlink(missing_ok=True)
        frame = _typed(pd.DataFrame(rows))
        path = self.rows_path(cell)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        shutil.rmtree(stage, ignore_errors=True)

    def frame(self, cells: Sequence[Cell]) -> pd.DataFrame:
        """Every cell's rows in the order given (suite order), from disk: a resumed run and an uninterrupted one
        build their report from the same files the same way."""
        missing = [c.name for c in cells if not self.rows_path(c).is_file()]
        if missing:
            raise RuntimeError(f"cells without rows in {self.root}: {missing}")
        return pd.concat([pd.read_parquet(self.rows_path(c)) for c in cells], ignore_index=True)

    def write_weights(self, cells: Sequence[Cell]) -> None:
        for table in TABLES:
            parts = [self.root / CELLS / f"{slug(c)}.{table}" for c in cells]
            frames = [pd.read_csv(p) for p in parts if p.is_file()]
            if frames:
                pd.concat(frames, ignore_index=True).to_csv(self.root / table, index=False)


    def close(self) -> None:
        shutil.rmtree(self.root / CELLS, ignore_errors=True)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Schema dtypes where the rows carry schema columns: the nullable ints (`step`, `seed`) would otherwise
    come back from parquet as floats."""
    for col, dtype in DTYPES.items():
        if col in frame.columns:
            frame[col] = frame[col].astype(dtype)
    return frame


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

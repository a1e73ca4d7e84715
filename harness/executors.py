"""Who runs a sweep's cells: `local` (one after another in this process; multi-rank cells under torchrun, see
harness.launch) or `ray` (each cell a Ray task asking for the GPUs its parallel config needs, so a Ray cluster of
many GPU machines runs a suite in parallel; multi-rank cells start torchrun inside their task).

Either way each finished cell is committed to the run's CellStore as soon as it is done (harness.runstore), which
is what lets an interrupted sweep resume. Ray is an optional extra (`pip install parity[ray]`).
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from harness.launch import REPO_ROOT, nproc_for
from harness.suites import Cell
from harness.sweep import LocalExecutor  # the default lives with the sweep; this module adds the others

if TYPE_CHECKING:
    from harness.runstore import CellStore
    from harness.sweep import SweepContext

# Versions a Ray worker must share with the driver: the report states the driver's in every row.
MATCHED_VERSIONS = ("torch_version", "diffusers_version", "transformers_version")
# Not uploaded to a cluster with the code: outputs, caches, the environment.
UPLOAD_EXCLUDES = [".git", ".venv", ".zoo", ".cache", "reports", "build", "**/__pycache__", "*.egg-info"]


class Executor(Protocol):
    def run(self, cells: Sequence[Cell], ctx: SweepContext, store: CellStore) -> None:
        """Run every cell and store.commit each one as it finishes; a failing cell becomes error rows."""


def task_resources(cell: Cell) -> dict:
    """What a cell's Ray task asks for: one GPU per rank on CUDA (Ray then sets CUDA_VISIBLE_DEVICES to them and
    torchrun's ranks take one each), one CPU per rank on CPU."""
    ranks = nproc_for(cell.parallel)
    if cell.device.startswith("cuda"):
        return {"num_gpus": ranks, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": ranks}


@dataclass(frozen=True)
class RayExecutor:
    """address: a Ray cluster (`ray://head:10001` or `auto`); None uses RAY_ADDRESS if set, else starts a Ray on
    this machine. clip: (open_clip model, local weights path) to rebuild the CLIP scorer in every task; None for
    the default tiny one. When connecting to a cluster the driver's checkout travels with the tasks (Ray's
    working_dir), so every node runs exactly this code; its Python packages must be installed on the nodes."""

    address: str | None = None
    clip: tuple[str, str] | None = None

    def run(self, cells: Sequence[Cell], ctx: SweepContext, store: CellStore) -> None:
        import ray

        from harness.provenance import versions
        from harness.sweep import error_rows

        started = not ray.is_initialized()
        if started:
            ray.init(**self.init_kwargs())
        try:
            shipped = ray.put(portable(ctx))
            task = ray.remote(run_cell_task)
            threads = torch.get_num_threads()  # CPU results depend on the thread count: match this process
            pending = {task.options(**task_resources(cell), max_retries=0, name=f"parity {cell.name}")
                       .remote(shipped, cell, self.clip, threads, str(REPO_ROOT)): cell for cell in cells}
            mine = versions()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(ready[0])
                stage = store.stage(cell)
                try:
                    out = ray.get(ready[0])
                except Exception as e:  # the task's process died (OOM kill, lost node): that cell's error rows
                    rows = error_rows(cell, ctx, f"Ray task failed: {type(e).__name__}: {e}")
                else:
                    rows = out["rows"]
                    differ = {k: (out["versions"][k], mine[k]) for k in MATCHED_VERSIONS
                              if out["versions"][k] != mine[k]}
                    if differ:
                        rows = error_rows(cell, ctx, f"Ray worker {out['host']} runs other library versions than "
                                          f"the driver (worker, driver): {differ}")
                    else:
                        for rel, data in out["files"].items():
                            path = stage / rel
                            path.parent.mkdir(parents=True, exist_ok=True)
                            path.write_bytes(data)
                    ctx.log(f"cell {cell.name} done on {out['host']} in {out['seconds']:.1f}s")
                store.commit(cell, rows, stage)
        finally:
            if started:
                ray.shutdown()

    def init_kwargs(self) -> dict:
        address = self.address or os.environ.get("RAY_ADDRESS")
        if not address:  # a Ray of this machine's own: its workers import this checkout from the driver's sys.path
            return {"include_dashboard": False}
        return {"address": address,
                "runtime_env": {"working_dir": str(REPO_ROOT), "excludes": UPLOAD_EXCLUDES}}


def portable(ctx: SweepContext) -> SweepContext:
    """A copy of ctx to send to tasks: no loaded models or runs, no CLIP model (rebuilt in the task), and the
    local executor (a task runs its one cell in its own process)."""
    return replace(ctx, clip=None, log=print, executor=LocalExecutor(), resume=False, _references={},
                   _reference_runs={}, _engine_runners={}, _engine_runs={}, _hashes={}, rank_pools=None)


def _rebase(path: Path, driver_repo: Path) -> Path:
    """A path inside the driver's checkout (the default zoo, goldens, cache) means the same place in the copy of
    the checkout this task runs from, which on a cluster node lives elsewhere."""
    try:
        return REPO_ROOT / Path(path).relative_to(driver_repo)
    except ValueError:
        return Path(path)


def run_cell_task(ctx: SweepContext, cell: Cell, clip: tuple[str, str] | None, threads: int,
                  driver_repo: str) -> dict:
    """One cell inside a Ray worker: rows plus the files it wrote (images, weight table), brought back as bytes
    so the driver needs no storage shared with the workers."""
    import time

    from harness.quiet import quiet_loading
    from harness.clip import ClipScorer
    from harness.provenance import versions
    from harness.sweep import cell_rows

    torch.set_num_threads(threads)
    quiet_loading()
    repo = Path(driver_repo)
    ctx.zoo_root, ctx.golden_root = _rebase(ctx.zoo_root, repo), _rebase(ctx.golden_root, repo)
    if ctx.ref_cache is not None:
        ctx.ref_cache.root = _rebase(ctx.ref_cache.root, repo)
    ctx.clip = ClipScorer.from_pretrained(*clip) if clip else ClipScorer.default()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="parity-ray-cell-") as tmp:
        rows = cell_rows(cell, ctx, Path(tmp) / "images")
        files = {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    return {"rows": rows, "files": files, "versions": versions(), "host": socket.gethostname(),
            "seconds": time.perf_counter() - t0}


def _local(address: str | None, clip) -> Executor:
    if address:
        raise ValueError("--ray-address needs --executor ray")
    return LocalExecutor()


def _ray(address: str | None, clip) -> Executor:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'parity[ray]'") from None
    return RayExecutor(address, clip)


EXECUTORS = {"local": _local, "ray": _ray}


def make_executor(name: str, address: str | None = None, clip: tuple[str, str] | None = None) -> Executor:
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; valid: {sorted(EXECUTORS)}")
    return EXECUTORS[name](address, clip)

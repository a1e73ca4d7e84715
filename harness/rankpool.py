"""Ranks kept alive between a sweep's multi-rank cells.

A tiny CPU cell spends ~13 of its ~16 seconds importing torch, diffusers and transformers in every rank (measured
with cProfile on a smoke ulysses2 rank); the work itself is ~3 s. A pool starts one torchrun world per
(processes, device kind, environment) and feeds it the cells' jobs one after another through files in its folder
(harness.worker --serve): job-<n>.pt in, result-<n>.pt out, `stop` to end. The process group and its meshes are
reused; each job still builds its own model, and the ranks drop compiled code between jobs.

Failure semantics are the one-shot launcher's (harness.launch): a rank that raises exits, torchrun ends the world,
and the cell gets a DistributedCellError quoting that rank's log; a job past its timeout has the whole tree killed.
Either way the pool is gone and the next job starts a new one, so one bad cell never poisons the next. A pool is
keyed by the full environment its ranks start with, so a selftest plant put on PYTHONPATH (a sitecustomize that
patches the ranks) gets ranks of its own and never leaks into a clean cell's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping

import torch

from engine.api import Artifacts, RunConfig
from harness.launch import (REPO_ROOT, DistributedCellError, _failure_reason, _job_env, _on_cpu, kill_tree,
                            load_results, nproc_for, rank_log_tails, torchrun_command, write_job)

POLL_S = 0.02
STOP_GRACE_S = 30.0


class RankPool:
    """One torchrun world of `nproc` ranks serving jobs in order. Not thread-safe: one job at a time."""

    def __init__(self, nproc: int, env: Mapping[str, str]):
        self.nproc = nproc
        self.folder = Path(tempfile.mkdtemp(prefix="parity-pool-"))
        self.log_dir, self.agent_log = self.folder / "logs", self.folder / "torchrun.log"
        self.next = 0
        with open(self.agent_log, "w") as agent_out:
            self.proc = subprocess.Popen(
                torchrun_command(nproc, self.log_dir, ["--serve", str(self.folder), "--owner", str(os.getpid())]),
                stdout=agent_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env), cwd=REPO_ROOT,
                start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, cfgs: list[RunConfig], step0_inputs: list[dict[str, torch.Tensor]], timeout_s: float
            ) -> list[tuple[Artifacts, torch.Tensor]]:
        """Like harness.launch.run_engine_distributed_many. The timeout counts from the job's submission (for
        the first job that includes the ranks' start-up). On any failure the pool is shut down and the error
        raised; the caller starts a new pool for its next job."""
        n = self.next
        job, result = self.folder / f"job-{n}.pt", self.folder / f"result-{n}.pt"
        write_job(job, cfgs, step0_inputs, self.nproc)
        self.next += 1
        what, t0 = cfgs[0].parallel, time.monotonic()
        try:
            while not result.is_file():
                rc = self.proc.poll()
                if rc is not None:
                    reason = (f"every rank exited 0 but rank 0 wrote no result at {result}" if rc == 0 else
                              _failure_reason(self.agent_log, self.log_dir, rc))
                    raise DistributedCellError(f"cell {what} failed after {time.monotonic() - t0:.1f}s: {reason}")
                if time.monotonic() - t0 > timeout_s:
                    killed = kill_tree(self.proc.pid)
                    self.proc.wait()
                    raise DistributedCellError(
                        f"cell {what} timed out after {timeout_s:.0f}s; killed {len(killed)} processes "
                        f"(torchrun and its ranks). Rank log tails:\n{rank_log_tails(self.log_dir)}")
                time.sleep(POLL_S)
            out = load_results(result)
        except BaseException:
            self.close(graceful=False)  # a failed, hung or interrupted job: leave nothing behind
            raise
        job.unlink(missing_ok=True)
        result.unlink(missing_ok=True)
        return out

    def close(self, graceful: bool = True) -> None:
        """Ask idle ranks to stop (killed if they have not within STOP_GRACE_S); graceful=False kills at once."""
        if self.alive and graceful:
            (self.folder / "stop").touch()
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        if self.alive:
            kill_tree(self.proc.pid)
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class RankPools:
    """The pools of one sweep, by (processes, device kind, environment); a context manager that closes them all."""

    def __init__(self):
        self._pools: dict[tuple, RankPool] = {}

    def run(self, cfgs: list[RunConfig], step0_inputs: list[dict[str, torch.Tensor]], timeout_s: float,
            extra_env: Mapping[str, str] | None = None) -> list[tuple[Artifacts, torch.Tensor]]:
        nproc = nproc_for(cfgs[0].parallel)
        # Read now: a plant may have changed os.environ since the last cell.
        env = _job_env(extra_env, _on_cpu(cfgs[0]), nproc)
        key = (nproc, torch.device(cfgs[0].device).type, tuple(sorted(env.items())))
        pool = self._pools.get(key)
        if pool is None or not pool.alive:
            pool = self._pools[key] = RankPool(nproc, env)
        try:
            return pool.run(cfgs, step0_inputs, timeout_s)
        except BaseException:
            self._pools.pop(key, None)
            raise

    def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def __enter__(self) -> RankPools:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

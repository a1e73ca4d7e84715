"""The persistent rank pool (harness.rankpool): the same results as a fresh torchrun per cell, bitwise, for several
jobs in one world; a crashed or hung job ends its pool and leaves no process behind, and the next job gets a new
pool; ranks whose owner died exit on their own."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.api import RunConfig
from harness.launch import DistributedCellError
from harness.metrics import cosine
from harness.rankpool import RankPool, RankPools

BASE = dict(family="flux1", prompts=("a red fox in snow", "a lighthouse at dusk"), seed=5, steps=2, height=36,
            width=36, dtype="fp32")

# A job for seed 13 fails on rank 1 (CRASH) or never returns there (HANG); every other job runs untouched.
PLANT = """
import os
if os.environ.get("RANK") == "1":
    import time, torch, harness.worker
    real = harness.worker.run
    def run(job_path, *a, **k):
        if torch.load(job_path, weights_only=True)["cfgs"][0]["seed"] == 13:
            {action}
        return real(job_path, *a, **k)
    harness.worker.run = run
"""
CRASH, HANG = "raise RuntimeError('planted crash on rank 1')", "time.sleep(3600)"


def _env(tmp_path: Path, action: str) -> dict[str, str]:
    folder = tmp_path / "plant"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(PLANT.format(action=action))
    return {"PYTHONPATH": str(folder)}


def _pids_mentioning(marker: str) -> list[int]:
    pids = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmd.read_bytes().decode(errors="replace"):
                pids.append(int(cmd.parent.name))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def single(tiny_flux_dir):
    from engine.runner import open_runner

    cfg = RunConfig(model_dir=str(tiny_flux_dir), **BASE)
    runner = open_runner(cfg)
    art = runner.generate(cfg)
    return art, runner.transformer_forward(art.step0_inputs)


def _cfg(model_dir, parallel: str, seed: int = 5) -> RunConfig:
    return RunConfig(model_dir=str(model_dir), **{**BASE, "seed": seed}, parallel=parallel)


def _same(a, b) -> bool:
    (art_a, step_a), (art_b, step_b) = a, b
    return (torch.equal(art_a.final_latents, art_b.final_latents) and torch.equal(step_a, step_b)
            and torch.equal(art_a.step_outputs, art_b.step_outputs) and (art_a.images == art_b.images).all())


def test_pool_serves_cells_like_fresh_launches_and_survives_a_crashed_cell(tiny_flux_dir, single, tmp_path,
                                                                          launched_cfg2):
    art_ref, step_ref = single
    inputs = [art_ref.step0_inputs]
    env = _env(tmp_path, CRASH)
    with RankPools() as pools:
        t0 = time.perf_counter()
        # The cell conftest.launched_cfg2 ran in a fresh torchrun, on its inputs.
        cfg2 = pools.run([launched_cfg2.cfg], [launched_cfg2.single[0].step0_inputs], 120, env)[0]
        first = time.perf_counter() - t0
        (pool,) = pools._pools.values()
        t0 = time.perf_counter()
        ring = pools.run([_cfg(tiny_flux_dir, "ring2")], inputs, 120, env)[0]
        second = time.perf_counter() - t0
        assert pools._pools and next(iter(pools._pools.values())) is pool  # the same world served both
        with pytest.raises(DistributedCellError, match=r"(?s)rank 1 failed first \(exit code 1\).*planted crash"):
            pools.run([_cfg(tiny_flux_dir, "ring2", seed=13)], inputs, 120, env)
        assert not pool.alive and _pids_mentioning(str(pool.folder)) == []
        again = pools.run([_cfg(tiny_flux_dir, "ring2")], inputs, 120, env)[0]  # a new pool
        (fresh_pool,) = pools._pools.values()
        assert fresh_pool is not pool
    # Closing asks the idle ranks to stop: torchrun exits 0 and nothing is left behind.
    assert not fresh_pool.alive and fresh_pool.proc.returncode == 0 and _pids_mentioning(str(fresh_pool.folder)) == []
    print(f"\npool: first job {first:.1f}s (start-up included), second {second:.1f}s")
    assert _same(cfg2, launched_cfg2.launched)  # a pool rank computes what a fresh torchrun computes, bit for bit
    assert _same(ring, again)  # and a second job in a world equals a first one: nothing leaks between jobs
    for (art, step), (want, want_step) in ((cfg2, launched_cfg2.single), (ring, single)):
        assert cosine(art.final_latents, want.final_latents).min() >= 0.999999
        assert cosine(step, want_step).min() >= 0.999999
    assert not pools._pools


def test_a_hung_job_is_killed_with_its_pool(tiny_flux_dir, single, tmp_path, monkeypatch):
    import harness.rankpool as rankpool

    started = []

    class Recorded(rankpool.RankPool):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            started.append(self)

    monkeypatch.setattr(rankpool, "RankPool", Recorded)
    pools = RankPools()
    t0 = time.perf_counter()
    with pytest.raises(DistributedCellError, match=r"timed out after 10s; killed \d+ processes"):
        pools.run([_cfg(tiny_flux_dir, "ring2", seed=13)], [single[0].step0_inputs], 10, _env(tmp_path, HANG))
    assert time.perf_counter() - t0 < 20 and not pools._pools
    time.sleep(0.2)  # SIGKILLed processes vanish once reaped
    (pool,) = started
    assert not pool.alive and _pids_mentioning(str(pool.folder)) == []


def test_ranks_exit_when_their_owner_dies(tmp_path):
    """A sweep killed with SIGKILL cannot close its pools: the ranks notice and exit instead of polling forever."""
    script = ("import os, sys\nfrom harness.launch import _job_env\nfrom harness.rankpool import RankPool\n"
              "pool = RankPool(2, _job_env(None))\nprint(pool.folder, flush=True)\nos._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    folder = out.stdout.strip()
    assert folder.startswith("/"), out.stderr
    deadline = time.monotonic() + 90
    while _pids_mentioning(folder) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _pids_mentioning(folder) == []


def test_cpu_ranks_use_this_processs_thread_count(monkeypatch):
    """torchrun gives each rank 1 thread unless told; CPU sums depend on the thread count (the tiny Wan VAE decodes
    the same latents one level apart with 1 and 2 threads), so CPU ranks get this process's count, a count set by
    the user is kept, and CUDA jobs are left alone."""
    from harness.launch import _job_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _job_env(None, cpu=True)["OMP_NUM_THREADS"] == str(torch.get_num_threads())
    assert "OMP_NUM_THREADS" not in _job_env(None, cpu=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _job_env(None, cpu=True)["OMP_NUM_THREADS"] == "3"


def test_oversubscribed_cpu_ranks_wait_passively(monkeypatch):
    """Ranks x threads beyond the cores: OpenMP threads sleep instead of spinning (a user's own policy is kept); within
    the cores, and on CUDA, the default stays."""
    from harness import launch
    from harness.launch import _job_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    assert _job_env(None, cpu=True, nproc=2)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in _job_env(None, cpu=True, nproc=1)
    assert "OMP_WAIT_POLICY" not in _job_env(None, cpu=False, nproc=4)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 8)
    assert "OMP_WAIT_POLICY" not in _job_env(None, cpu=True, nproc=4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")  # one count per nesting level: the outer one counts, 3 x 4 > 8
    assert _job_env(None, cpu=True, nproc=4)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: no crash here, OpenMP itself will say so
    assert "OMP_WAIT_POLICY" not in _job_env(None, cpu=True, nproc=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    assert _job_env(None, cpu=True, nproc=2)["OMP_WAIT_POLICY"] == "ACTIVE"

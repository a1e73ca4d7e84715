"""Parallel FLUX.1 tiny pipelines against the single-device pipeline, fp32, 36x36 (81 image tokens: odd, so every
degree shards unevenly), and the torchrun launcher's failure handling.

The configs and planted bugs run as jobs inside one world of 4 processes (forked from the session's server that
imported the engine once: conftest.start_ranks; a job takes the ranks it needs and starts its own process group),
so the suite fits the CI budget on 2 cores. One
cell goes end to end through harness.launch / harness.worker; crashed and hung ranks go through it too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine.api import RunConfig
from engine.pipelines.flux1 import FluxSampling
from harness.metrics import cosine

COSINE_MIN = 0.999999
BASE = dict(family="flux1", prompts=("a red fox in snow", "a lighthouse at dusk"), seed=5, steps=3, height=36,
            width=36, dtype="fp32")
CFG = dict(sampling=FluxSampling(negative_prompt="blurry, low quality", true_cfg_scale=4.0))


@dataclass(frozen=True)
class Job:
    key: str
    parallel: str
    ranks: tuple[int, ...]
    guidance: bool = False  # negative prompt + true CFG
    plant: str | None = None
    # FLUX.1 cuts its text across a ring's ranks by default; "replicated" keeps it whole on every rank (the path
    # replicated-text families take, and the one the text-counted-per-ring-rank plant breaks).
    text_on_ring: str = "sharded"


# Run in this order by every member rank; jobs on disjoint ranks run side by side.
JOBS = (
    Job("usp2x2", "usp2x2", (0, 1, 2, 3)),
    Job("cfg2-ring2", "cfg2-ring2", (0, 1, 2, 3), guidance=True),
    Job("ulysses2", "ulysses2", (0, 1)), Job("ring2", "ring2", (2, 3)),
    Job("cfg2", "cfg2", (0, 1), guidance=True),
    Job("plant_text_twice", "ring2", (2, 3), plant="text_twice", text_on_ring="replicated"),
    Job("ring2-textrep", "ring2", (0, 1), text_on_ring="replicated"),
    Job("plant_rope_offset", "ulysses2", (0, 1), plant="rope_offset"),
    Job("plant_padded", "ring2", (2, 3), plant="padded"),
    Job("plant_cfg_noise", "cfg2", (0, 1), guidance=True, plant="cfg_noise"),
    Job("plant_cfg_noise_unguarded", "cfg2", (2, 3), guidance=True, plant="cfg_noise_unguarded"),
)
CORRECT = ("usp2x2", "cfg2-ring2", "ulysses2", "ring2", "cfg2", "ring2-textrep")


def _config(model_dir, guidance: bool, parallel: str = "sp1") -> RunConfig:
    return RunConfig(model_dir=str(model_dir), parallel=parallel, **BASE, **(CFG if guidance else {}))


# --- plants: the product's catalogue (harness/selftest/flux1.py), installed as the selftest installs them ------
PLANTS = {"text_twice": "ring_text_double_counted", "rope_offset": "rope_shard_offset", "padded": "uneven_tail_padded",
          "cfg_noise": "cfg_ranks_different_noise", "cfg_noise_unguarded": "cfg_noise_guard_silenced"}


def install_plant(name: str | None):
    """Install a planted bug; returns an undo function."""
    from harness.selftest import install

    return (lambda: None) if name is None else install(PLANTS[name])


def _job_worker(proc: int, model_dir: str, tmp: str):
    torch.set_num_threads(1)  # 4 processes on 2 cores
    from engine.runner import open_runner

    from engine.parallel.transformer import ReplicationError, SequenceParallelTransformer

    for i, job in enumerate(JOBS):
        if proc not in job.ranks:
            continue
        rank = job.ranks.index(proc)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store{i}", rank=rank, world_size=len(job.ranks))
        undo = install_plant(job.plant)
        SequenceParallelTransformer.shard_text_with_ring = job.text_on_ring == "sharded"  # set for every job
        try:
            cfg = _config(model_dir, job.guidance, job.parallel)
            runner = open_runner(cfg)
            try:
                art = runner.generate(cfg)
                step = runner.transformer_forward(torch.load(f"{tmp}/step0_{job.guidance}.pt"))
                result = {"final": art.final_latents, "outputs": art.step_outputs, "step": step, "images": art.images}
            except ReplicationError as e:
                result = {"error": str(e)}
        finally:
            undo()
        torch.save(result, f"{tmp}/{job.key}.rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def references(tiny_flux_dir, tmp_path_factory):
    from engine.runner import open_runner

    tmp = tmp_path_factory.mktemp("parallel_pipeline")
    refs = {}
    for guidance in (False, True):
        cfg = _config(tiny_flux_dir, guidance)
        runner = open_runner(cfg)
        art = runner.generate(cfg)
        torch.save(art.step0_inputs, tmp / f"step0_{guidance}.pt")
        refs[guidance] = (art, runner.transformer_forward(art.step0_inputs))
    return tmp, refs


@pytest.fixture(scope="module")
def job_results(references, tiny_flux_dir, start_ranks):
    tmp, refs = references
    t0 = time.perf_counter()
    start_ranks(_job_worker, (str(tiny_flux_dir), str(tmp)), 4)
    print(f"\n4-process job world: {time.perf_counter() - t0:.1f}s")
    out = {}
    for job in JOBS:
        ranks = [torch.load(tmp / f"{job.key}.rank{r}.pt", weights_only=False) for r in range(len(job.ranks))]
        out[job.key] = (job, ranks, refs[job.guidance])
    return out


def _cosines(result, ref):
    art, step = ref
    return (cosine(result["final"], art.final_latents).min(), cosine(result["step"], step).min(),
            cosine(result["outputs"].flatten(0, 1), art.step_outputs.flatten(0, 1)).min())


@pytest.mark.parametrize("key", CORRECT)
def test_parallel_pipeline_matches_single_device(job_results, key):
    job, ranks, ref = job_results[key]
    final, step, outputs = _cosines(ranks[0], ref)
    err = (ranks[0]["final"] - ref[0].final_latents).abs().max().item()
    print(f"\n{key}: final-latent cosine {final:.15f} (1 - cos {1 - final:.1e}, max abs {err:.1e}), "
          f"single-step 1 - cos {1 - step:.1e}, step-output 1 - cos {1 - outputs:.1e}")
    assert final >= COSINE_MIN and step >= COSINE_MIN and outputs >= COSINE_MIN
    for other in ranks[1:]:  # every rank returns the same artifacts
        assert torch.equal(other["final"], ranks[0]["final"]) and torch.equal(other["step"], ranks[0]["step"])
        assert (other["images"] == ranks[0]["images"]).all()


@pytest.mark.parametrize("key", ["plant_text_twice", "plant_rope_offset", "plant_padded", "plant_cfg_noise_unguarded"])
def test_planted_bug_fails_the_pipeline_check(job_results, key):
    _, ranks, ref = job_results[key]
    final, step, _ = _cosines(ranks[0], ref)
    print(f"\n{key}: final-latent cosine {final:.9f}, single-step cosine {step:.9f}")
    assert final < COSINE_MIN


def test_planted_cfg_noise_is_refused_by_the_replication_guard(job_results):
    _, ranks, _ = job_results["plant_cfg_noise"]
    assert all("not the same on every rank" in r.get("error", "") for r in ranks), ranks


def test_apply_parallel_outside_torchrun_says_how_to_launch(monkeypatch):
    from types import SimpleNamespace

    from engine.parallel.api import apply_parallel
    from engine.parallel.mesh import DistributedSetupError

    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    from engine.families import family

    pipe = SimpleNamespace(device=torch.device("cpu"), transformer=None)
    assert apply_parallel(pipe, "sp1", family("flux1")) is pipe
    with pytest.raises(DistributedSetupError, match="needs 4 processes.*--nproc-per-node 4"):
        apply_parallel(pipe, "usp2x2", family("flux1"))
    no_sp = SimpleNamespace(name="wan", denoiser=("transformer",), sequence_parallel=None)
    with pytest.raises(ValueError, match="model family 'wan' declares no sequence-parallel layout"):
        apply_parallel(SimpleNamespace(device=torch.device("cpu")), "ring2", no_sp)


def test_swapping_attention_after_wrapping_keeps_sequence_parallelism():
    """engine.optimize assigns `model.attention`: on a wrapped model that picks the SP backend's local kernel."""
    from types import SimpleNamespace

    from engine.attention import math_attention, sdpa_attention
    from engine.parallel.transformer import SequenceParallelTransformer

    axis = SimpleNamespace(size=2)
    inner = torch.nn.Linear(1, 1)
    inner.attention = sdpa_attention
    wrapped = SequenceParallelTransformer(inner, SimpleNamespace(sp=axis, ulysses=axis))
    sp = inner.attention
    assert sp is not sdpa_attention and sp.local_attention is sdpa_attention
    wrapped.attention = math_attention
    assert inner.attention is sp and sp.local_attention is math_attention and wrapped.attention is sp
    assert wrapped.weight is inner.weight  # other attributes read through


# --- through the launcher ---------------------------------------------------------------------------------------
def _processes_mentioning(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (the cell's unique workdir): what a kill must not leave."""
    pids = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmd.read_bytes().decode(errors="replace"):
                pids.append(int(cmd.parent.name))
        except OSError:
            pass
    return pids


def _sitecustomize(tmp_path: Path, body: str) -> dict[str, str]:
    plant_dir = tmp_path / "plant"
    plant_dir.mkdir()
    (plant_dir / "sitecustomize.py").write_text(body)
    return {"PYTHONPATH": str(plant_dir)}


def test_launcher_runs_a_cfg2_cell(references, tiny_flux_dir, launched_cfg2):
    """The cell launched by conftest.launched_cfg2 (shared with the rank pool's test), against this file's reference."""
    _, refs = references
    art_ref, step_ref = refs[True]
    assert launched_cfg2.cfg == _config(tiny_flux_dir, True, "cfg2")  # this file's cfg2 cell
    assert all(torch.equal(launched_cfg2.single[0].step0_inputs[k], v) for k, v in art_ref.step0_inputs.items())
    art, step = launched_cfg2.launched
    print(f"\nlauncher cfg2 cell: {launched_cfg2.seconds:.1f}s, final-latent cosine "
          f"{cosine(art.final_latents, art_ref.final_latents).min():.12f}")
    assert cosine(art.final_latents, art_ref.final_latents).min() >= COSINE_MIN
    assert cosine(step, step_ref).min() >= COSINE_MIN and (art.images == art_ref.images).all()


# Rank 1 fails inside the worker (after torch and the worker imported, before the engine): the other rank is
# still starting; the launcher must report rank 1 with its traceback.
CRASH = """
import os
if os.environ.get("RANK") == "1":
    import harness.worker
    def run(*a, **k):
        raise RuntimeError("planted crash on rank 1")
    harness.worker.run = run
"""
# Rank 1 never returns; rank 0 goes on and waits for it in the process group: only the timeout ends the cell.
HANG = """
import os
if os.environ.get("RANK") == "1":
    import harness.worker, time
    def run(*a, **k):
        time.sleep(3600)
    harness.worker.run = run
"""


def test_launcher_reports_a_crashed_rank(tiny_flux_dir, tmp_path, references):
    from harness.launch import DistributedCellError, run_engine_distributed

    _, refs = references
    cfg = _config(tiny_flux_dir, False, "ring2")
    t0 = time.perf_counter()
    with pytest.raises(DistributedCellError, match=r"(?s)rank 1 failed first \(exit code 1\).*planted crash on rank 1"):
        run_engine_distributed(cfg, refs[False][0].step0_inputs, 2, 60, tmp_path / "cell",
                               extra_env=_sitecustomize(tmp_path, CRASH))
    assert time.perf_counter() - t0 < 30
    assert _processes_mentioning(str(tmp_path / "cell")) == []


def test_launcher_kills_a_hung_cell(tiny_flux_dir, tmp_path, references):
    from harness.launch import DistributedCellError, run_engine_distributed

    _, refs = references
    cfg = _config(tiny_flux_dir, False, "ring2")
    t0 = time.perf_counter()
    with pytest.raises(DistributedCellError, match=r"timed out after 12s; killed \d+ processes"):
        run_engine_distributed(cfg, refs[False][0].step0_inputs, 2, 12, tmp_path / "cell",
                               extra_env=_sitecustomize(tmp_path, HANG))
    assert time.perf_counter() - t0 < 20
    time.sleep(0.2)  # SIGKILLed processes vanish once reaped
    assert _processes_mentioning(str(tmp_path / "cell")) == []

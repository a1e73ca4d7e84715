import multiprocessing
import multiprocessing.forkserver
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub


@pytest.fixture(scope="session", autouse=True)
def ref_cache_root(tmp_path_factory):
    """Sweeps in tests keep their reference cache to the session: never the developer's .cache/reference."""
    before = os.environ.get("PARITY_REF_CACHE")
    os.environ["PARITY_REF_CACHE"] = str(tmp_path_factory.mktemp("ref-cache"))
    yield os.environ["PARITY_REF_CACHE"]
    if before is None:
        os.environ.pop("PARITY_REF_CACHE")
    else:
        os.environ["PARITY_REF_CACHE"] = before


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def tiny_flux_dir(zoo_root):
    from harness.zoo import cached_build

    return cached_build("flux1", "tiny", seed=0, root=zoo_root)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny ops: on a shared 2-core machine OpenMP spin-waits made them 20-50x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_ci_step_summary(monkeypatch):
    """The gate appends to $GITHUB_STEP_SUMMARY; the test suite's own synthetic gates must not land on CI's page."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


# What every rank of a test's spawned world imports. A spawned rank paid these again (~10 s of CPU each on 2
# cores, measured: a world of 4 spent most of its set-up importing); ranks forked from one fork server that
# imported them once start with them loaded. Each world is still a fresh set of processes with its own process
# group: nothing a test's ranks do (plants, compiled code, process-group state) reaches another test's.
RANK_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "engine.runner", "engine.parallel.transformer",
                "harness.zoo", "harness.selftest", "harness.metrics"]


@pytest.fixture(scope="session")
def start_ranks():
    """start_ranks(fn, args, nprocs): like mp.start_processes(fn, args, nprocs) with spawn (fn(rank, *args) in each
    of nprocs new processes, an exception in any raised here), but the processes fork from a server that already
    imported RANK_PRELOAD. The server forks with the environment it started with: a test whose ranks need another
    environment variable must not use this."""
    multiprocessing.set_forkserver_preload(RANK_PRELOAD)
    # Started now, from the session's environment (not from whatever a later test has monkeypatched), and it
    # imports in the background while the first test builds its references.
    multiprocessing.forkserver.ensure_running()

    def start(fn, args: tuple, nprocs: int) -> None:
        mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")

    return start


class RankResults(list):
    """What each rank of a world saved (rank{r}.pt), in rank order; entries(kind) flattens the cases of one kind."""

    def entries(self, kind: str) -> dict:
        """{(rank, *rest of the key): value} for every saved key (kind, *rest)."""
        return {(rank,) + key[1:]: value for rank, res in enumerate(self) for key, value in res.items()
                if key[0] == kind}


@pytest.fixture(scope="session")
def rank_results(start_ranks, tmp_path_factory):
    """rank_results(worker, world): start `world` ranks of worker(rank, world, store, out_dir) (each saves its dict
    of results to out_dir/rank{rank}.pt) and return those dicts as RankResults."""

    def run(worker, world: int) -> RankResults:
        tmp = tmp_path_factory.mktemp(f"{worker.__module__.rsplit('.', 1)[-1]}-{world}")
        start_ranks(worker, (world, str(tmp / "store"), str(tmp)), world)
        return RankResults(torch.load(tmp / f"rank{r}.pt") for r in range(world))

    return run


@pytest.fixture(scope="session")
def launched_cfg2(tiny_flux_dir, tmp_path_factory):
    """One FLUX.1 tiny cfg2 cell through a fresh torchrun (harness.launch.run_engine_distributed), and the one-device
    run whose step-0 inputs it was given. A fresh launch pays a torchrun start-up and every rank's imports (~15 s on
    2 cores), so the launcher's own test (tests/test_parallel_pipeline.py: it matches one device) and the rank
    pool's (tests/test_rankpool.py: a pool job equals a fresh launch bitwise) share this one."""
    from engine.api import RunConfig
    from engine.pipelines.flux1 import FluxSampling
    from engine.runner import open_runner
    from harness.launch import run_engine_distributed

    cfg = RunConfig(family="flux1", model_dir=str(tiny_flux_dir), prompts=("a red fox in snow", "a lighthouse at dusk"),
                    seed=5, steps=3, height=36, width=36, dtype="fp32", parallel="cfg2",
                    sampling=FluxSampling(negative_prompt="blurry, low quality", true_cfg_scale=4.0))
    runner = open_runner(cfg.replace(parallel="sp1"))
    art = runner.generate(cfg.replace(parallel="sp1"))
    single = (art, runner.transformer_forward(art.step0_inputs))
    t0 = time.perf_counter()
    launched = run_engine_distributed(cfg, art.step0_inputs, 2, 120, tmp_path_factory.mktemp("cfg2-cell"))
    return SimpleNamespace(cfg=cfg, single=single, launched=launched, seconds=time.perf_counter() - t0)

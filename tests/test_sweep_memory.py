"""On an accelerator a sweep drops each model as soon as its runs are in hand (harness.sweep.frees_models): the
reference's before the cell's engine runs, the engine's one-device model before a parallel cell's ranks start.
The runs stay memoized, so nothing is run twice and the rows are the same. The policy is CUDA's; here it is
switched on for the CPU, where the behaviour (not the memory) can be watched."""
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from harness import backends, sweep
from harness.suites import load_suite
from harness.sweep import SweepContext, run_sweep

SUITE = """\
name = "free-models"
description = "two cells sharing one reference"
prompts = ["a red fox standing in fresh snow"]
seeds = [0, 1]

[defaults]
size = "tiny"
device = "cpu"
dtype = "bf16"
parallel = "sp1"
steps = 2
height = 64
width = 64
golden = false

[defaults.flux1]
guidance = 3.5
true_cfg_scale = 1.0
max_sequence_length = 32

[[matrix]]
model = "flux1"
quant = ["none", "fp8"]
"""


def watched_sweep(tmp_path: Path, zoo_root: Path, monkeypatch, run_id: str):
    """Sweep the two cells with the reference and engine models watched: how often diffusers is loaded and run,
    and whether a reference model is still loaded while the engine runs."""
    path = tmp_path / "suite.toml"
    path.write_text(SUITE)
    ctx = SweepContext(suite=load_suite(str(path)), run_id=run_id, zoo_root=zoo_root, golden=False, log=lambda _: None)
    seen = {"opened": 0, "generated": 0, "engine_beside_reference": 0}
    real_open = backends.open_backend

    def open_backend(name, cfg):
        runner = real_open(name, cfg)
        if name == "diffusers":
            seen["opened"] += 1
            generate = runner.generate

            def counted(run_cfg):
                seen["generated"] += 1
                return generate(run_cfg)
            runner.generate = counted
        else:
            seen["engine_beside_reference"] += bool(ctx._references)
        return runner

    monkeypatch.setattr(sweep, "open_backend", open_backend)
    run_dir, frame = run_sweep(ctx, tmp_path / "out")
    return ctx, seen, frame.drop(columns=["run_id"])


@pytest.fixture(scope="module")
def kept(tmp_path_factory, zoo_root):
    """The CPU default: models kept."""
    with pytest.MonkeyPatch.context() as mp:
        return watched_sweep(tmp_path_factory.mktemp("kept"), zoo_root, mp, "kept")


def test_the_reference_model_is_dropped_before_the_engine_loads_and_nothing_runs_twice(
        tmp_path, zoo_root, monkeypatch, kept):
    monkeypatch.setattr(sweep, "frees_models", lambda device: True)
    ctx, seen, frame = watched_sweep(tmp_path, zoo_root, monkeypatch, "freed")
    assert seen == {"opened": 1, "generated": 2, "engine_beside_reference": 0}, seen  # 2 seeds, shared by 2 cells
    assert not ctx._references
    _, seen_kept, frame_kept = kept
    assert seen_kept["engine_beside_reference"] > 0  # the default on the CPU keeps it: the check above can fail
    pd.testing.assert_frame_equal(frame, frame_kept)


def test_a_release_that_drops_the_runs_too_is_caught(tmp_path, zoo_root, monkeypatch):
    """Plant: freeing the reference's runs with its model makes the second cell load and run diffusers again."""
    monkeypatch.setattr(sweep, "frees_models", lambda device: True)
    real = SweepContext.free_models

    def free_everything(self, reference=False, engine=False):
        if reference:
            self._reference_runs.clear()
        real(self, reference, engine)

    monkeypatch.setattr(SweepContext, "free_models", free_everything)
    _, seen, _ = watched_sweep(tmp_path, zoo_root, monkeypatch, "planted")
    assert seen["opened"] == 2 and seen["generated"] == 4


def test_the_engine_model_is_dropped_before_a_parallel_cells_ranks_start(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "frees_models", lambda device: True)
    ctx = SweepContext(suite=None, run_id="r", log=lambda _: None)
    ctx._engine_runners["sp1"] = object()
    loaded_when_ranks_ran = []

    def ranks(cfgs, inputs, timeout_s):
        loaded_when_ranks_ran.append(dict(ctx._engine_runners))
        return [(SimpleNamespace(extras={}), None) for _ in cfgs]

    monkeypatch.setattr(ctx, "run_distributed", ranks)

    class Cfg:
        device = "cuda:0"

    ctx.prefetch_distributed([Cfg()], [{}], 60.0)
    assert loaded_when_ranks_ran == [{}]

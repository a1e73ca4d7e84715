"""Nightly sweeps that outgrow one machine, each checked against one uninterrupted local run of the same suite:
a sweep SIGKILLed in the middle of a cell and resumed, `--shard 1/2` + `--shard 2/2` + `parity merge`, and
`--executor ray` on a local Ray give the same rows (values exact; only the run id differs)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness import backends, executors
from harness.cli import main
from harness.executors import task_resources
from harness.shards import Shard
from harness.suites import load_suite

TESTS = Path(__file__).parent
REPO = TESTS.parent
SUITE = str(TESTS / "data" / "nightly_suite.toml")  # cells: flux1/tiny/fp32/none/sp1/cpu, then .../bf16/...
pytestmark = pytest.mark.slow


def sweep(out, zoo_root, run_id, *extra):
    return main(["sweep", "--suite", SUITE, "--out", str(out), "--run-id", run_id, "--zoo-root", str(zoo_root),
                 *extra])


def rows(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "results.parquet").drop(columns=["run_id"])


def gate_section(run: Path) -> str:
    summary = (run / "summary.md").read_text()
    return summary[summary.index("<!-- gate:begin -->"):]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, zoo_root):
    out = tmp_path_factory.mktemp("whole")
    assert sweep(out, zoo_root, "whole") == 0
    return out / "whole"


@pytest.fixture(scope="module")
def shard1(tmp_path_factory, zoo_root):
    """`--shard 1/2` of the suite, clean: merged with a clean and with a failing second shard below."""
    out = tmp_path_factory.mktemp("shard1")
    assert sweep(out, zoo_root, "s1", "--shard", "1/2") == 0
    return out / "s1"


HANG = """\
import os
if os.environ.get("PARITY_TEST_HANG_MARKER"):
    # The bf16 cell writes its images, then hangs: the sweep is killed in the middle of that cell.
    import time
    from pathlib import Path
    import harness.sweep as sweep
    real = sweep.save_images
    def save_images(folder, *args):
        real(folder, *args)
        if "bf16" in Path(folder).name:
            Path(os.environ["PARITY_TEST_HANG_MARKER"]).touch()
            time.sleep(3600)
    sweep.save_images = save_images
"""


def test_a_sweep_killed_mid_cell_resumes_to_the_same_rows(tmp_path, zoo_root, whole, monkeypatch):
    hook, marker, out = tmp_path / "hook", tmp_path / "in-bf16-cell", tmp_path / "out"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG)
    env = {**os.environ, "PARITY_TEST_HANG_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", "--suite", SUITE, "--out", str(out),
                             "--run-id", "r", "--zoo-root", str(zoo_root)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, f"the sweep exited ({proc.returncode}) before reaching the bf16 cell"
            assert time.monotonic() < deadline, "the sweep never reached the bf16 cell"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    tmp = out / ".tmp-r"
    assert not (out / "r").exists()
    assert sorted(p.name for p in (tmp / "cells").glob("*.parquet")) == ["flux1_tiny_fp32_none_sp1_cpu.parquet"]
    assert list((tmp / "cells").glob(".stage-*bf16*/images/*/*.png"))  # killed with the cell's images half-made

    # The finished cell is not run again: here its engine would crash.
    real_engine = backends.BACKENDS["engine"]

    def no_fp32(cfg):
        if cfg.dtype == "fp32":
            raise RuntimeError("the complete fp32 cell ran again")
        return real_engine(cfg)

    monkeypatch.setitem(backends.BACKENDS, "engine", no_fp32)
    assert main(["sweep", "--resume", str(tmp)]) == 0
    pd.testing.assert_frame_equal(rows(out / "r"), rows(whole), check_exact=True)
    assert gate_section(out / "r") == gate_section(whole)
    images = sorted(p.relative_to(out / "r") for p in (out / "r" / "images").rglob("*.png"))
    assert images == sorted(p.relative_to(whole) for p in (whole / "images").rglob("*.png"))


def test_resume_refuses_another_run(tmp_path, zoo_root, whole):
    assert main(["sweep", "--resume", str(whole)]) == 2  # complete: nothing to resume
    assert main(["sweep", "--resume", str(tmp_path / ".tmp-nothing")]) == 2
    assert sweep(tmp_path, zoo_root, "r", "--shard", "1/2", "--no-gate") == 0
    os.rename(tmp_path / "r", tmp_path / ".tmp-r")  # as if killed just before the rename
    (tmp_path / ".tmp-r" / "results.parquet").unlink()
    edited = tmp_path / "edited.toml"
    edited.write_text(Path(SUITE).read_text().replace("steps = 2", "steps = 3"))
    assert main(["sweep", "--resume", str(tmp_path / ".tmp-r"), "--suite", str(edited)]) == 2  # not its options
    plan = json.loads((tmp_path / ".tmp-r" / "plan.json").read_text())
    plan["versions"]["torch_version"] = "0.0"  # the run began under another torch
    (tmp_path / ".tmp-r" / "plan.json").write_text(json.dumps(plan))
    assert main(["sweep", "--resume", str(tmp_path / ".tmp-r")]) == 2


def test_shards_are_a_deterministic_partition():
    cells = load_suite("smoke").cells
    parts = [Shard(k, 3).select(cells) for k in (1, 2, 3)]
    assert sorted(c.name for p in parts for c in p) == sorted(c.name for c in cells)
    assert parts == [Shard(k, 3).select(cells) for k in (1, 2, 3)]
    for bad in ("0/2", "3/2", "1/0", "a/b", "1"):
        with pytest.raises(ValueError, match="K/N|1 <= K <= N"):
            Shard.parse(bad)


def test_two_shards_merged_give_the_whole_suites_gated_report(tmp_path, zoo_root, whole, shard1):
    assert sweep(tmp_path, zoo_root, "s2", "--shard", "2/2") == 0
    assert set(rows(shard1).dtype) == {"fp32"} and set(rows(tmp_path / "s2").dtype) == {"bf16"}
    assert main(["merge", str(tmp_path / "s2"), str(shard1), "--out", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    pd.testing.assert_frame_equal(rows(merged), rows(whole), check_exact=True)
    assert gate_section(merged) == gate_section(whole)
    assert len(list((merged / "images").rglob("*.png"))) == len(list((whole / "images").rglob("*.png")))

    # A merge that is not one whole sweep is an error, and writes nothing.
    assert main(["merge", str(shard1), "--out", str(tmp_path / "half")]) == 2
    assert main(["merge", str(shard1), str(shard1), "--out", str(tmp_path / "twice")]) == 2
    assert main(["merge", str(shard1), str(whole), "--out", str(tmp_path / "mixed")]) == 2
    assert not any((tmp_path / n).exists() for n in ("half", "twice", "mixed", ".tmp-half"))


def test_a_merged_report_with_a_failing_shard_fails_its_gate(tmp_path, zoo_root, monkeypatch, shard1):
    import engine.models.flux1 as flux1_model

    monkeypatch.setattr(flux1_model, "TIMESTEP_SCALE", 1.0)  # the planted bug of tests/test_sweep.py
    assert sweep(tmp_path, zoo_root, "s2", "--shard", "2/2") == 1
    monkeypatch.undo()
    assert main(["merge", str(shard1), str(tmp_path / "s2"), "--out", str(tmp_path / "merged")]) == 1
    assert "single_step_cosine" in gate_section(tmp_path / "merged")


def test_ray_tasks_ask_for_one_gpu_per_rank():
    cell = load_suite("smoke").cells[0]
    from dataclasses import replace

    assert task_resources(replace(cell, device="cuda", parallel="ulysses2")) == {"num_gpus": 2, "num_cpus": 1}
    assert task_resources(replace(cell, device="cuda", parallel="sp1")) == {"num_gpus": 1, "num_cpus": 1}
    assert task_resources(replace(cell, device="cpu", parallel="ring2")) == {"num_gpus": 0, "num_cpus": 2}
    remote = executors.RayExecutor(address="ray://head:10001").init_kwargs()
    assert remote["address"] == "ray://head:10001" and ".zoo" in remote["runtime_env"]["excludes"]


def test_the_ray_executor_gives_the_local_executors_rows(tmp_path, zoo_root, whole):
    import ray  # the optional extra `parity[ray]`, part of the test extra
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20)
    try:
        # No reference cache: the Ray workers run diffusers themselves, independently of the local run.
        assert sweep(tmp_path, zoo_root, "ray", "--executor", "ray", "--no-ref-cache") == 0
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(rows(tmp_path / "ray"), rows(whole), check_exact=True)
    assert gate_section(tmp_path / "ray") == gate_section(whole)
    assert len(list((tmp_path / "ray" / "images").rglob("*.png"))) == 2 * 4

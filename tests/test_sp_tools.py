"""tools/sp_bench.py and tools/sp_run.py without a GPU: the config set the issue asks for, the default mode, the
commands built, the speed-up table, and sp_run's switches and bad input."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import sp_bench  # noqa: E402
import sp_run  # noqa: E402


def test_configs_cover_the_issue_and_default_to_cuda_graphs():
    names = [c[0] for c in sp_bench.CONFIGS]
    assert len(names) == len(set(names))
    for want in ("sp1@1024", "ulysses2@1024", "ulysses4@1024", "ring4@1024", "usp2x2@1024", "ulysses2+chunks1@1024",
                 "ulysses4+chunks1@1024", "sp1@2048", "ulysses4@2048"):
        assert want in names
    assert "+cuda_graphs" in sp_bench.DEFAULT_MODE and "+compile" in sp_bench.DEFAULT_MODE
    from harness.bench_modes import parse_mode

    for name, parallel, height, options, mode_options in sp_bench.CONFIGS:
        assert name.startswith(parallel) and name.endswith(f"@{height}")
        args, rest = sp_run.parse([*options, "--", "bench"])  # every variant's options are sp_run's
        assert rest == ["bench"]
        assert parse_mode(sp_bench.DEFAULT_MODE + mode_options).optimize.sp_overlap == ("+overlap" in name)
    # The overlap A/B: every Ulysses mesh of the issue, and sp1 (where it must change nothing).
    for want in ("ulysses2", "ulysses4", "usp2x2", "sp1"):
        assert f"{want}+overlap@1024" in names


def test_run_config_goes_through_sp_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sp_bench.subprocess, "run", lambda cmd, cwd, check: calls.append(cmd))
    args = SimpleNamespace(out=str(tmp_path), family="flux1", mode=sp_bench.DEFAULT_MODE, iters=10, warmup=3)
    sp_bench.run_config("ulysses4+chunks1@2048", "ulysses4", 2048, sp_bench.CHUNKS1, "", args)
    sp_bench.run_config("ulysses2+overlap@1024", "ulysses2", 1024, (), sp_bench.OVERLAP, args)
    chunks, overlap = calls
    outputs = str(sp_bench.run_dir(tmp_path, "ulysses4+chunks1@2048") / "outputs.pt")
    assert "--nproc-per-node=4" in chunks
    assert chunks[chunks.index("tools/sp_run.py") + 1:][:5] == ["--ulysses-chunks", "1", "--save-outputs", outputs, "--"]
    assert chunks[chunks.index("--modes") + 1] == "engine-bf16+compile+cuda_graphs"
    assert chunks[chunks.index("--height") + 1] == "2048"
    assert overlap[overlap.index("--modes") + 1] == "engine-bf16+compile+cuda_graphs+sp_overlap"


def test_table_divides_by_the_sp1_row_of_the_same_height(tmp_path):
    for name, parallel, height, ms in [("sp1@1024", "sp1", 1024, 130.0), ("ulysses4@1024", "ulysses4", 1024, 40.0),
                                       ("sp1@2048", "sp1", 2048, 900.0), ("ulysses4@2048", "ulysses4", 2048, 250.0)]:
        out = sp_bench.run_dir(tmp_path, name)
        out.mkdir(parents=True)
        pd.DataFrame([{"parallel": parallel, "height": height, "median_ms": ms}]).to_csv(
            out / f"bench-{parallel}.csv", index=False)
    frame = sp_bench.table(tmp_path, [c[0] for c in sp_bench.CONFIGS]).set_index("config")
    assert frame.speedup_vs_sp1["ulysses4@1024"] == pytest.approx(130 / 40)
    assert frame.speedup_vs_sp1["ulysses4@2048"] == pytest.approx(900 / 250)
    assert frame.cosine_vs_sp1.isna().all()  # no saved outputs: not a number, never a made-up 1


def test_cosine_vs_sp1_compares_saved_outputs_of_the_same_height(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 64, 16, generator=g)
    outputs = {"sp1@1024": ref, "ulysses4@1024": ref + 1e-3 * torch.randn(1, 64, 16, generator=g),
               "ulysses2@1024": -ref,  # a plant: the output negated
               "sp1+overlap@1024": ref + 1.0, "ulysses4@2048": ref}  # no sp1@2048 saved
    for name, out in outputs.items():
        parallel = name.split("+")[0].split("@")[0]
        d = sp_bench.run_dir(tmp_path, name)
        d.mkdir(parents=True)
        pd.DataFrame([{"parallel": parallel, "height": int(name[-4:]), "median_ms": 1.0}]).to_csv(
            d / f"bench-{parallel}.csv", index=False)
        torch.save([out], d / sp_bench.OUTPUTS)
    cos = sp_bench.table(tmp_path, list(outputs)).set_index("config").cosine_vs_sp1
    assert cos["sp1@1024"] == pytest.approx(1.0) and 0.9999 < cos["ulysses4@1024"] < 1.0
    assert cos["ulysses2@1024"] == pytest.approx(-1.0) and cos["sp1+overlap@1024"] < 0.9
    assert pd.isna(cos["ulysses4@2048"])


def test_sp_run_saves_each_modes_output_on_rank_0(tmp_path, monkeypatch):
    import torch

    import harness.bench as bench

    outs = iter([torch.ones(2, dtype=torch.bfloat16), torch.zeros(3)])
    monkeypatch.setattr(bench, "time_forward", lambda fn, cfg: ([1.0], next(outs)))  # restored after the test
    path = tmp_path / "run" / "outputs.pt"
    sp_run.save_outputs(path)
    for _ in range(2):
        bench.time_forward(None, None)
    saved = torch.load(path)
    assert [t.dtype for t in saved] == [torch.float32] * 2 and torch.equal(saved[0], torch.ones(2))
    monkeypatch.setenv("RANK", "1")
    other = tmp_path / "rank1.pt"
    outs = iter([torch.ones(1)])
    monkeypatch.setattr(bench, "time_forward", lambda fn, cfg: ([1.0], next(outs)))
    sp_run.save_outputs(other)
    bench.time_forward(None, None)
    assert not other.exists()


def test_sp_run_sets_the_switches_and_refuses_bad_input(monkeypatch):
    from engine.parallel.transformer import SequenceParallelTransformer as SPT
    import harness.cli

    seen = {}
    monkeypatch.setattr(harness.cli, "main", lambda rest: seen.update(
        rest=rest, chunks=SPT.ulysses_chunks, shard=SPT.shard_text_with_ring) or 0)
    monkeypatch.setattr(SPT, "ulysses_chunks", SPT.ulysses_chunks)  # restored after the test
    monkeypatch.setattr(SPT, "shard_text_with_ring", SPT.shard_text_with_ring)
    assert sp_run.main(["--ulysses-chunks", "3", "--replicate-text-on-ring", "--", "bench", "-x"]) == 0
    assert seen == {"rest": ["bench", "-x"], "chunks": 3, "shard": False}
    for bad in (["--ulysses-chunks", "0", "--", "bench"], ["--shard-text-with-ring", "--", "bench"]):
        with pytest.raises(SystemExit) as e:
            sp_run.parse(bad)
        assert e.value.code == 2
    for bad in ([], ["--ulysses-chunks", "1", "bench"]):
        with pytest.raises(SystemExit, match="usage"):
            sp_run.parse(bad)


def test_sp_run_takes_the_arguments_torchrun_hands_it():
    """torchrun parses its script's arguments with argparse.REMAINDER, which drops a leading "--": sp_bench's default
    configs (no sp_run option) reached sp_run as the bare parity command and all failed on the GPU."""
    from torch.distributed.run import get_args_parser

    for script_args, chunks in ((["--", "bench", "-x"], None), (["--ulysses-chunks", "1", "--", "bench", "-x"], 1)):
        handed = get_args_parser().parse_args(["--nproc-per-node=2", "tools/sp_run.py", *script_args])
        args, rest = sp_run.parse(handed.training_script_args)
        assert rest == ["bench", "-x"] and args.ulysses_chunks == chunks

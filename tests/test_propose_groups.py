"""tools/propose_groups.py: measured rows in, threshold groups out, with its stated margins; a bitwise group becomes an
exactness tier plus the identical-value thresholds; the groups it writes load and pass the run they came from, and a
planted regression past the margin fails them."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from harness.thresholds import parse_thresholds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import propose_groups  # noqa: E402


def rows(optimize: str, values: dict[str, float]) -> list[dict]:
    return [{"run_id": "r1", "model": "flux1", "dtype": "bf16", "quant": "none", "parallel": "sp1",
             "optimize": optimize, "device": "cuda:0", "comparison": "optimized_vs_eager", "metric": m,
             "value": v, "status": "ok", "step": pd.NA, "seed": s, "prompt_idx": 0}
            for m, v in values.items() for s in (0, 1)]


def run_dir(tmp_path: Path, frame: pd.DataFrame) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    frame.to_parquet(d / "results.parquet")
    return d


def propose(run: Path) -> str:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "propose_groups.py"), str(run), "--device", "cuda",
                          "--comparisons", "optimized_vs_eager", "--name-parallel", "flux1", "--measured-on", "a test"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return out.stdout


def test_margins_and_exact_tiers(tmp_path):
    frame = pd.DataFrame(rows("compile_blocks", {"single_step_cosine": 0.99998, "psnr_db": 49.7,
                                                 "single_step_rel_error": 0.007, "mean_abs_diff": 0.5})
                         + rows("cuda_graphs", {"single_step_cosine": 1.0, "psnr_db": 100.0,
                                                "single_step_rel_error": 0.0, "mean_abs_diff": 0.0}))
    data = tomllib.loads(propose(run_dir(tmp_path, frame)))
    groups = {(g["optimize"], g.get("exact", False)): g for g in data["group"]}
    compiled = groups[("compile_blocks", False)]
    assert compiled["device"] == "cuda" and compiled["parallel"] == "sp1"
    assert compiled["at_least"] == {"single_step_cosine": 0.9999, "psnr_db": 42.0}  # 5x 1 - cos; 7 dB below
    assert compiled["at_most"]["single_step_rel_error"] == pytest.approx(0.016)  # sqrt(5) x 0.007, rounded up
    assert compiled["at_most"]["mean_abs_diff"] == 2.0  # 4x
    assert ("cuda_graphs", True) in groups  # bitwise: a tier, and the identical values as its thresholds
    assert groups[("cuda_graphs", False)]["at_least"] == {"single_step_cosine": 1.0, "psnr_db": 100.0}
    thresholds = parse_thresholds(data)
    assert len(thresholds.exact) == 1


def test_groups_pass_their_run_and_fail_a_regression_past_the_margin(tmp_path):
    frame = pd.DataFrame(rows("compile_blocks", {"single_step_cosine": 0.99998, "single_step_rel_error": 0.007}))
    thresholds = parse_thresholds(tomllib.loads(propose(run_dir(tmp_path, frame))))
    key = ("flux1", "bf16", "none", "sp1", "optimized_vs_eager")
    cos = thresholds.lookup(key + ("single_step_cosine",), "compile_blocks", "cuda:0")
    rel = thresholds.lookup(key + ("single_step_rel_error",), "compile_blocks", "cuda:0")
    assert thresholds.lookup(key + ("single_step_cosine",), "compile_blocks", "cpu") is None  # cuda rows only
    assert cos.passes(0.99998) and rel.passes(0.007)
    assert not cos.passes(1 - 6 * 2e-5) and not rel.passes(0.007 * 2.5)  # past the stated margins


def test_no_rows_is_an_error(tmp_path):
    frame = pd.DataFrame(rows("compile_blocks", {"single_step_cosine": 0.99998}))
    frame["device"] = "cpu"
    with pytest.raises(subprocess.CalledProcessError) as e:
        propose(run_dir(tmp_path, frame))
    assert "no ok cuda rows" in e.value.stderr


def test_size_and_seeds_select_rows_and_the_size_is_named(tmp_path):
    """--size full: only full-size rows, and the groups say size = "full" (they must not judge the tiny zoo);
    --seeds 0: groups from seed 0 only, so that seed 1 is a held-out check (per-cell rows without a seed stay)."""
    tiny = pd.DataFrame(rows("compile_blocks", {"single_step_cosine": 0.9}))
    full = pd.DataFrame(rows("compile_blocks", {"single_step_cosine": 0.99998}))
    full.loc[full.seed == 1, "value"] = 0.99  # seed 1 is worse: left out by --seeds 0
    frame = pd.concat([tiny.assign(size="tiny"), full.assign(size="full")], ignore_index=True)
    out = subprocess.run([sys.executable, str(REPO / "tools" / "propose_groups.py"), str(run_dir(tmp_path, frame)),
                          "--device", "cuda", "--comparisons", "optimized_vs_eager", "--name-parallel", "flux1",
                          "--measured-on", "a test", "--size", "full", "--seeds", "0"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    (group,) = tomllib.loads(out)["group"]
    assert group["size"] == "full" and group["at_least"] == {"single_step_cosine": 0.9999}
    assert "1 samples" in group["source"]
    assert parse_thresholds({"group": [group]}).lookup(
        ("flux1", "bf16", "none", "sp1", "optimized_vs_eager", "single_step_cosine"), "compile_blocks", "cuda",
        "tiny") is None


def test_quant_policy_and_any_device(tmp_path):
    """--policy quant: issue #3's margins (2x 1 - cosine, 3 dB, 1.5x errors, |CLIP delta| at least 0.5); --any-device
    leaves `device` out of the ordinary groups, so they judge every device kind."""
    frame = pd.DataFrame(rows("eager", {"single_step_cosine": 0.9927, "psnr_db": 29.36, "single_step_rel_error": 0.12,
                                        "mean_abs_diff": 5.4, "clip_score_delta": -0.12}))
    out = subprocess.run([sys.executable, str(REPO / "tools" / "propose_groups.py"), str(run_dir(tmp_path, frame)),
                          "--device", "cuda", "--comparisons", "optimized_vs_eager", "--name-parallel", "flux1",
                          "--measured-on", "a test", "--policy", "quant", "--any-device"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    [group] = tomllib.loads(out)["group"]
    assert "device" not in group and "issue #3's quant margins" in group["source"]
    assert group["at_least"] == {"single_step_cosine": 0.985, "psnr_db": 26.36}  # 2x 0.0073 -> 0.015; 3 dB
    assert group["at_most"] == {"single_step_rel_error": 0.18, "mean_abs_diff": 8.1, "clip_score_delta": 0.5}
    thresholds = parse_thresholds({"group": [group]})
    key = ("flux1", "bf16", "none", "sp1", "optimized_vs_eager", "single_step_cosine")
    assert thresholds.lookup(key, "eager", "cpu") is thresholds.lookup(key, "eager", "cuda:0") is not None

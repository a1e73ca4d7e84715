"""Regressions against an accepted baseline (harness/baseline.py): the judging on synthetic frames, the CLI verbs,
and on real sweeps of the fp8 cell: a planted 1% degradation that stays above every floor fails the baseline
gate, while 3 clean repeats pass it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import report_fixtures as F
from harness import baseline as B
from harness.cli import main
from harness.gate import gate, judge_run
from harness.runfiles import load_results
from harness.thresholds import parse_thresholds

SUITE = str(Path(__file__).with_name("data") / "quant_suite.toml")
TOL = B.Tolerances({"*": B.Tolerance("*", rel=0.005, noise_factor=3.0, source="test")})


def with_value(df: pd.DataFrame, metric: str, value: float, seed: int = 0) -> pd.DataFrame:
    df = df.copy()
    hit = (df.metric == metric) & (df.seed == seed) & (df.comparison == "engine_vs_reference") & (df.quant == "fp8")
    assert hit.sum() == 1
    df.loc[hit, "value"] = value
    return df


def judged(run: pd.DataFrame, base: pd.DataFrame, tol=TOL) -> pd.DataFrame:
    r = B.regressions(run, base, tol)
    return r[~r.passed]


def test_error_scale_per_metric():
    from harness.margins import budget_used, error_of

    assert error_of("single_step_cosine", 0.999) == pytest.approx(1e-3)
    assert error_of("psnr_db", 30.0) == pytest.approx(1e-3)
    assert error_of("mean_abs_diff", 2.0) == 2.0 and error_of("clip_score_delta", -1.5) == 1.5
    assert budget_used("psnr_db", 27.0, 30.0) == pytest.approx(10 ** 0.3)
    assert budget_used("single_step_cosine", 1.0, 1.0) == 0.0


def test_one_percent_worse_fails_half_percent_passes():
    clean = F.results()
    base = B.build_baseline(clean, [], F.META)
    assert judged(clean, base).empty  # the same run: nothing regressed
    err = 1 - 0.9985  # seed 0 fp8 single_step_cosine
    worse = judged(with_value(clean, "single_step_cosine", 1 - err * 1.01), base)
    assert list(worse.metric) == ["single_step_cosine"] and "+1%" in worse.why.iloc[0]
    assert judged(with_value(clean, "single_step_cosine", 1 - err * 1.004), base).empty
    assert judged(with_value(clean, "single_step_cosine", 1 - err * 0.5), base).empty  # better is never a failure
    # dB metrics in their power scale: 0.05 dB lower is 1.2% more noise power.
    assert list(judged(with_value(clean, "psnr_db", 36.0 - 0.05), base).metric) == ["psnr_db"]


def test_measured_noise_widens_the_tolerance():
    clean = F.results()
    err = 1 - 0.9985
    noisy = with_value(clean, "single_step_cosine", 1 - err * 1.02)  # a repeat that moved 2%
    base = B.build_baseline(clean, [noisy], F.META)
    assert base.loc[base.metric == "single_step_cosine", "noise"].max() == pytest.approx(err * 0.02)
    assert judged(with_value(clean, "single_step_cosine", 1 - err * 1.05), base).empty  # within 3 x noise
    assert len(judged(with_value(clean, "single_step_cosine", 1 - err * 1.07), base)) == 1


def test_exact_baseline_may_not_move():
    clean = F.results()
    base = B.build_baseline(clean, [], F.META)
    moved = clean.copy()
    hit = (moved.metric == "single_step_cosine") & (moved.quant == "none") & (moved.dtype == "fp32") & (moved.seed == 1)
    moved.loc[hit, "value"] = 1 - 1e-12
    assert "was exact" in judged(moved, base).why.iloc[0]


def test_weight_rows_without_seed_match_their_baseline():
    clean = F.results()
    base = B.build_baseline(clean, [], F.META)
    r = B.regressions(clean, base, TOL)
    assert (r.metric == "weight_sqnr_db_min").sum() == 1
    worse = clean.copy()
    worse.loc[worse.metric == "weight_sqnr_db_min", "value"] = 31.0
    assert list(judged(worse, base).metric) == ["weight_sqnr_db_min"]


def test_gate_fails_on_regression_above_floors_and_counts_new_cells():
    clean = F.results()
    base = B.build_baseline(clean[clean.dtype == "bf16"], [], F.META)  # the fp32 cell is new
    th = parse_thresholds({"threshold": [
        {"model": "*", "dtype": "*", "quant": "*", "parallel": "*", "comparison": c, "metric": m, "op": op,
         "value": v, "source": "test"}
        for c in ("engine_vs_reference", "engine_vs_unquantized")
        for m, op, v in (("single_step_cosine", ">=", 0.99), ("psnr_db", ">=", 20.0), ("mean_abs_diff", "<=", 8.0),
                         ("weight_sqnr_db_min", ">=", 20.0))]})
    assert gate(clean, th, base, TOL).exit_code == 0
    res = gate(with_value(clean, "psnr_db", 35.9), th, base, TOL)
    assert res.failed.empty and res.exit_code == 1 and len(res.regressed) == 1
    assert "have no baseline yet" in res.baseline_note


def test_repeat_lacking_samples_is_refused():
    clean = F.results()
    with pytest.raises(B.BaselineError, match="repeat run #1 lacks"):
        B.build_baseline(clean, [clean[clean.seed == 0]], F.META)


@pytest.mark.parametrize("text, message", [
    ('[[tolerance]]\nmetric = "*"\nrel = 0.005\nnoise_factor = 3.0\n', "missing field(s) ['source']"),
    ('[[tolerance]]\nmetric = "psnr"\nrel = 0.005\nnoise_factor = 3\nsource = "x"\n', "'psnr' is not a gated metric"),
    ('[[tolerance]]\nmetric = "*"\nrel = -1\nnoise_factor = 3\nsource = "x"\n', "rel must be a finite number >= 0"),
    ('', "no [[tolerance]] tables"),
])
def test_bad_tolerance_file_is_rejected(tmp_path, text, message):
    (tmp_path / "t.toml").write_text(text)
    with pytest.raises(B.BaselineError) as e:
        B.load_tolerances(tmp_path / "t.toml")
    assert message in str(e.value)


def test_checked_in_tolerances_load_with_a_source():
    t = B.load_tolerances()
    assert t.for_metric("psnr_db").source and t.for_metric("psnr_db").rel > 0


def test_cli_accept_gate_and_compare(tmp_path, capsys):
    good = F.write_synthetic_run(tmp_path / "good")
    thresholds = str(F.thresholds_toml(tmp_path / "t.toml"))
    out = tmp_path / "base.parquet"
    assert main(["baseline", "accept", str(good), "--out", str(out), "--thresholds", thresholds]) == 0
    assert set(pd.read_parquet(out).suite) == {"synthetic"}
    worse = F.write_synthetic_run(tmp_path / "worse", F.results(psnr_fp8=35.9))
    assert main(["gate", str(worse), "--thresholds", thresholds, "--no-baseline"]) == 0
    assert main(["gate", str(worse), "--thresholds", thresholds, "--baseline", str(out)]) == 1
    assert "REGRESSION flux1/tiny/bf16/fp8/sp1/cpu engine_vs_reference psnr_db" in capsys.readouterr().out
    assert "Regressions against the baseline (4)" in (worse / "summary.md").read_text()
    assert main(["compare", str(good), str(worse), "--changed-only"]) == 0
    table = pd.read_csv(worse / "compare.csv")
    psnr = table[(table.metric == "psnr_db") & (table.comparison == "engine_vs_reference")
                 & (table.cell == "flux1/tiny/bf16/fp8/sp1/cpu")].iloc[0]
    assert psnr.delta == pytest.approx(-0.1) and psnr.worse_pct == pytest.approx((10 ** 0.01 - 1) * 100)
    # A failing run cannot become the baseline; a missing --baseline file is a usage error.
    bad = F.write_synthetic_run(tmp_path / "bad", F.results(psnr_fp8=20.0))
    assert main(["baseline", "accept", str(bad), "--out", str(tmp_path / "b2.parquet"), "--thresholds", thresholds]) == 2
    assert not (tmp_path / "b2.parquet").exists()
    assert main(["gate", str(good), "--baseline", str(tmp_path / "absent.parquet")]) == 2


def test_default_baseline_is_the_suites(tmp_path, monkeypatch):
    run = F.write_synthetic_run(tmp_path / "run")
    monkeypatch.setattr(B, "BASELINE_DIR", tmp_path / "golden")
    thresholds = F.thresholds_toml(tmp_path / "t.toml")
    result, _ = judge_run(run, thresholds)
    assert result.exit_code == 0 and "no accepted baseline for suite 'synthetic'" in result.baseline_note
    B.accept(run, out=B.baseline_path("synthetic"))
    result, _ = judge_run(run, thresholds)
    assert result.regressions is not None and len(result.regressions) == len(B.gated_values(load_results(run)))


# ---------------------------------------------------------------- the planted degradation, on real sweeps

ROUNDING_OFFSET = 0.004  # grid 0.4% coarser: makes the fp8 activation error ~1% larger (see _plant)


def _plant(monkeypatch):
    """fp8 activations rounded once more, onto the grid of a per-token scale 0.4% larger, before the real
    rounding. On heavy-tailed random activations that makes the activation quantization error 1.0-1.6% larger
    (0.4%: +1.0%, 0.5%: +1.6%; measured with fp8.quantize_rows); product code knows nothing of it."""
    import engine.quant.formats.fp8 as fp8
    import engine.quant.linear as linear

    forward = linear.Fp8Linear.forward

    def rounded_once_more(self, x):
        s = fp8.row_scales(x) * (1 + ROUNDING_OFFSET)
        return forward(self, fp8.dequantize_rows(fp8.cast(x.float() / s), s).to(x.dtype))

    monkeypatch.setattr(linear.Fp8Linear, "forward", rounded_once_more)


def _sweep(tmp_path, zoo_root, run_id):
    code = main(["sweep", "--suite", SUITE, "--out", str(tmp_path), "--run-id", run_id, "--zoo-root",
                 str(zoo_root), "--cells", "/fp8/", "--no-gate"])
    assert code == 0
    return tmp_path / run_id


def test_activation_error_of_the_plant_is_about_one_percent():
    import engine.quant.formats.fp8 as fp8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 512, generator=g) * torch.rand(4096, 1, generator=g) * 3
    x[:, :4] *= 20  # outlier channels, as activations have

    def err(x_in):
        codes, s = fp8.quantize_rows(x_in)
        return float((fp8.dequantize_rows(codes, s) - x).norm() / x.norm())

    s = fp8.row_scales(x) * (1 + ROUNDING_OFFSET)
    ratio = err(fp8.dequantize_rows(fp8.cast(x / s), s)) / err(x)
    assert 1.005 < ratio < 1.02


@pytest.mark.slow
def test_planted_one_percent_degradation_fails_the_baseline_not_the_floors(tmp_path, zoo_root, monkeypatch, capsys):
    clean = [_sweep(tmp_path, zoo_root, f"clean{i}") for i in range(3)]
    base = tmp_path / "baseline.parquet"
    assert main(["baseline", "accept", str(clean[0]), "--repeat", str(clean[1]), str(clean[2]),
                 "--out", str(base)]) == 0
    assert (pd.read_parquet(base)["noise"] == 0).all()  # CPU repeats: bitwise identical
    false_alarms = [main(["gate", str(run), "--baseline", str(base)]) for run in clean]
    assert false_alarms == [0, 0, 0]

    _plant(monkeypatch)
    planted = _sweep(tmp_path, zoo_root, "planted")
    capsys.readouterr()
    # Above every end-to-end floor; only the quant oracle (issue 16: each fp8 linear against torchao) sees the
    # extra rounding layer by layer.
    floors, _ = judge_run(planted, baseline=None)
    assert set(floors.failed.comparison) == {"quant_oracle"}, floors.failed[["comparison", "metric"]]
    assert main(["gate", str(planted), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION flux1/tiny/bf16/fp8/sp1/cpu" in out, out
    result, _ = judge_run(planted, baseline=base)
    worst = (result.regressions.worse_by / result.regressions.baseline_error).max()
    assert worst > 0.005

"""The gate's exactness tiers (issue 16): where the engine was measured bitwise equal to the reference on a device,
any difference fails; elsewhere (another device, metrics without an identical-input value) the floors judge.
Also: the report's "closest to its threshold" never picks a negative control. Pure pandas, no models."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from harness import metrics as M
from harness import tables
from harness.gate import BITWISE, format_verdict, gate
from harness.report import gate_section
from harness.schema import ENGINE_VS_REFERENCE, NEGATIVE_CONTROL
from harness.thresholds import ThresholdError, load_thresholds, parse_thresholds
from tests.test_gate import frame, row

FLOORS = [{"model": "flux1", "dtype": "fp32", "quant": "none", "parallel": "sp1", "comparison": ENGINE_VS_REFERENCE,
           "source": "test floors", "at_least": {"single_step_cosine": 0.99999, "psnr_db": 40.0},
           "at_most": {"single_step_rel_error": 0.005, "clip_score_delta": 0.5}}]
EXACT = {"model": "flux1", "dtype": "fp32", "quant": "none", "parallel": "sp1", "device": "cpu", "optimize": "eager",
         "comparison": ENGINE_VS_REFERENCE, "exact": True, "source": "test: measured bitwise"}


def rules(*exact: dict):
    return parse_thresholds({"group": FLOORS + list(exact)})


def exact_rows(device="cpu", rel=0.0, cos=1.0, optimize="eager"):
    kw = dict(device=device, optimize=optimize)
    return frame(row("single_step_cosine", cos, **kw), row("single_step_rel_error", rel, **kw),
                 row("psnr_db", 100.0, **kw), row("clip_score_delta", 0.2, **kw))


def test_every_identical_value_is_what_the_metric_gives_on_identical_inputs():
    """MetricSpec.identical is what the exactness tier demands: it must be exactly what each metric computes for
    bitwise-identical inputs (cosine included: sqrt(x)^2 need not round back to x)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 77, 13, generator=g, dtype=torch.float64) * 3.7
    images = np.random.default_rng(0).integers(0, 256, size=(2, 1, 16, 16, 3), dtype=np.uint8)
    compute = {"cosine": lambda: M.cosine(latents, latents.clone()),
               "rel_error": lambda: M.rel_error(latents, latents.clone()),
               "sqnr_db": lambda: M.sqnr_db(latents, latents.clone()),
               "trajectory_cosine_min": lambda: M.trajectory_cosine(latents[None], latents[None].clone()).min(0),
               "psnr_db": lambda: M.psnr_db(images, images.copy()), "ssim": lambda: M.ssim(images, images.copy()),
               "mean_abs_diff": lambda: M.mean_abs_diff(images, images.copy())}
    from harness import token_metrics as T  # token-logits metrics: one value per prompt
    logits, tokens = latents[0], torch.arange(16)
    compute = {"embedder_cosine_min": lambda: T.rows_cosine_min(latents, latents.clone()),
               "embedder_rel_error": lambda: T.rel_error(latents, latents.clone()),
               "logits_cosine_min": lambda: T.logits_cosine_min(logits, logits.clone()),
               "top1_agreement": lambda: T.top1_agreement(logits, logits.clone()),
               "next_token_kl_max": lambda: T.next_token_kl_max(logits, logits.clone()),
               "greedy_match_rate": lambda: T.greedy_match_rate(tokens, tokens.clone()), **compute}
    video = np.random.default_rng(1).integers(0, 256, size=(2, 3, 16, 16, 3), dtype=np.uint8)
    compute.update({  # video metrics: exact names, matched before the suffixes above
        "video_psnr_db_min": lambda: M.frame_psnr_db(video, video.copy()).min(1),
        "video_ssim_min": lambda: M.frame_ssim(video, video.copy()).min(1),
        "video_mad_max": lambda: M.frame_mean_abs_diff(video, video.copy()).max(1),
        "frame_diff_cosine_min": lambda: M.frame_diff_cosine_min(video, video.copy()),
        "frame_latent_cosine_min": lambda: M.frame_latent_cosine_min(latents, latents.clone(), 7)})
    from harness import conditioning as C  # the step-0 conditioning of a true-CFG step: both branches compared
    inputs = {"encoder_hidden_states": latents, "pooled_projections": latents[:, 0], "negative.encoder_hidden_states":
              latents * 2, "negative.pooled_projections": latents[:, 1], "guided.true_cfg_scale": torch.tensor(3.0)}
    names = ("encoder_hidden_states", "pooled_projections", "negative.encoder_hidden_states",
             "negative.pooled_projections")
    copy = {k: v.clone() for k, v in inputs.items()}
    compute.update({m: lambda m=m: C.compare(inputs, copy, names, 3)[m][0] for m in C.METRICS})
    compute = dict(sorted(compute.items(), key=lambda kv: not kv[0].startswith(("video_", "frame_", "conditioning_"))))
    checked = 0
    for name, spec in M.METRICS.items():
        if spec.identical is None:
            continue
        fn = next(f for suffix, f in compute.items() if name.endswith(suffix) or name == suffix
                  or (suffix == "trajectory_cosine_min" and name == "step_output_cosine_min"))
        assert (np.asarray(fn()) == spec.identical).all(), name
        checked += 1
    assert checked == 24


def test_cosine_of_identical_rows_is_exactly_one_and_of_one_ulp_apart_is_not_forced():
    x = torch.tensor([[0.1, 0.7, 1.3, 2.9]], dtype=torch.float64)
    assert M.cosine(x, x.clone())[0] == 1.0
    y = x.clone()
    y[0, 0] = torch.nextafter(y[0, 0], torch.tensor(1.0, dtype=torch.float64))
    assert M.rel_error(y, x)[0] > 0  # the tier's rel_error row sees one ulp even where cosine rounds to 1


def test_bitwise_cell_passes_and_is_reported_as_bitwise():
    result = gate(exact_rows(), rules(EXACT))
    assert result.exit_code == 0, format_verdict(result)
    judged = result.rows.set_index("metric")
    assert (judged.loc[["single_step_cosine", "single_step_rel_error", "psnr_db"], "tier"] == BITWISE).all()
    assert judged.loc["clip_score_delta", "tier"] == "threshold"  # no identical value: its floor judges
    assert "3 judged bitwise (exactness tier), 3 exact" in format_verdict(result)
    assert "bitwise (engine_vs_reference): 3 of 3 metrics exact" in gate_section(result)


def test_any_difference_fails_the_exact_tier_but_passes_the_floor():
    tiny = 1e-9  # far inside the 0.005 floor
    result = gate(exact_rows(rel=tiny), rules(EXACT))
    assert result.exit_code == 1
    failed = result.failed
    assert list(failed.metric) == ["single_step_rel_error"]
    assert failed.iloc[0].op == "==" and "not bitwise: value 1e-09 != 0" in failed.iloc[0].why
    assert gate(exact_rows(rel=tiny), rules()).exit_code == 0  # the floors alone let it through


def test_exact_tier_holds_on_its_device_and_engine_switches_only():
    assert gate(exact_rows(optimize="compile_blocks", rel=1e-6), rules(EXACT)).exit_code == 0
    assert gate(exact_rows(device="cuda", rel=1e-6, cos=0.9999999), rules(EXACT)).exit_code == 0
    assert gate(exact_rows(rel=1e-6), rules(EXACT)).exit_code == 1
    assert gate(exact_rows(device="cuda:1", rel=1e-6), rules({**EXACT, "device": "cuda"})).exit_code == 1


def test_exact_groups_are_validated():
    with pytest.raises(ThresholdError, match="takes no"):
        rules({**EXACT, "at_least": {"psnr_db": 100.0}})
    with pytest.raises(ThresholdError, match="missing field"):
        rules({k: v for k, v in EXACT.items() if k != "device"})
    with pytest.raises(ThresholdError, match="one device kind"):
        rules({**EXACT, "device": "*"})
    with pytest.raises(ThresholdError, match="exact must be true"):
        rules({**EXACT, "exact": False})
    with pytest.raises(ThresholdError, match="duplicate"):
        rules(EXACT, dict(EXACT))


def test_the_shipped_thresholds_hold_exact_tiers_with_sources():
    exact = load_thresholds().exact
    assert exact, "golden/thresholds.toml has no exactness tier"
    assert all(r.device in ("cpu", "cuda") and "measured" in r.source for r in exact)
    assert {r.device for r in exact} == {"cpu", "cuda"}  # CUDA tiers from the GPU runs (tools/propose_groups.py)


def test_closest_to_threshold_never_picks_a_negative_control():
    results = frame(row("single_step_cosine", 0.999995),
                    row("single_step_cosine", 0.5, comparison=NEGATIVE_CONTROL))
    result = gate(results, rules())
    line = tables.per_cell(tables.per_metric(result.rows)).iloc[0]
    assert line.closest["comparison"] == ENGINE_VS_REFERENCE
    assert line.closest["metric"] == "single_step_cosine"
    assert pd.notna(line.closest["budget_used"])

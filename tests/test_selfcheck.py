"""The checks every run makes on itself (harness/selfcheck.py): each one fails on the bug it exists for."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine.api import OptimizeSpec
from harness import metrics as M
from harness import selfcheck
from harness.thresholds import load_thresholds

SUITE = str(Path(__file__).with_name("data") / "tiny_suite.toml")


@pytest.mark.parametrize("snr", [34.0, 6.5, -1.0])
def test_control_noise_has_exactly_the_snr_asked(snr):
    ref = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    control = selfcheck.perturb(ref, snr, seed=3)
    exact = selfcheck.exact_values(snr)
    np.testing.assert_allclose(M.sqnr_db(control, ref), snr, atol=1e-9)
    np.testing.assert_allclose(M.cosine(control, ref), exact["cosine"], atol=1e-12)
    np.testing.assert_allclose(M.rel_error(control, ref), exact["rel_error"], atol=1e-12)


def _rows(**kw):
    base = {"model": "flux1", "dtype": "fp32", "quant": "none", "parallel": "sp1", "cell": "c", "status": "ok",
            "reason": "", "comparison": "negative_control", "metric": "single_step_cosine"}
    return pd.DataFrame([{**base, **kw}])


def test_a_control_that_passes_its_threshold_fails_the_gate():
    t = load_thresholds()
    judged, errors = selfcheck.judge_controls(_rows(value=0.9998), t)  # rejected by the 0.99999 floor: good
    assert not errors and judged.passed.iloc[0]
    judged, _ = selfcheck.judge_controls(_rows(value=0.999999), t)  # accepted: the threshold could not fail
    assert not judged.passed.iloc[0] and "cannot fail" in judged.why.iloc[0]


def test_a_bitwise_groups_control_is_capped_where_a_float64_cosine_still_sees_it():
    """A CUDA bitwise group gates at identical-input values (cosine >= 1, SQNR >= 200 dB). A control 3 dB under 200 dB
    reads cosine 1.0 exactly and passed "cosine >= 1" (4 x H200 sp-wide run); capped at 140 dB it is rejected."""
    from types import SimpleNamespace

    cell = SimpleNamespace(model="wan", dtype="fp32", quant="none", parallel="cfg2", optimize=OptimizeSpec(),
                           device="cuda", size="tiny")
    snr, why = selfcheck.control_snr_db(cell)
    assert snr == selfcheck.CONTROL_MAX_DB and "capped" in why
    ref = torch.randn(2, 4, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for at, rejected in ((197.0, False), (snr, True)):  # the uncapped control passed; the capped one fails
        cos = M.cosine(selfcheck.perturb(ref, at, seed=1), ref)
        assert (np.asarray(cos) < 1.0).all() == rejected, (at, cos)
    judged, errors = selfcheck.judge_controls(_rows(model="wan", parallel="cfg2", device="cuda", value=float(
        np.min(M.cosine(selfcheck.perturb(ref, snr, seed=1), ref)))), load_thresholds())
    assert not errors and judged.passed.iloc[0]


def test_a_reference_from_another_backend_is_an_error():
    ok = _rows(value=1.0, comparison="engine_vs_reference", reference_backend="diffusers 0.42.1")
    assert selfcheck.provenance_errors(ok) == []
    for stamp in ("unstamped", "engine"):
        errors = selfcheck.provenance_errors(ok.assign(reference_backend=stamp))
        assert errors and "did not come from the reference backend 'diffusers'" in errors[0]
    assert selfcheck.provenance_errors(ok.drop(columns="reference_backend"))


def test_missing_rows_are_counted_but_a_crashed_cell_is_left_to_its_error_rows():
    rows = pd.concat([_rows(value=1.0, seed=s, prompt_idx=p, step=pd.NA) for s in (0, 1) for p in (0, 1)])
    expected = {"c|negative_control|single_step_cosine": 4, "c|negative_control|single_step_sqnr_db": 4}
    assert selfcheck.missing_rows(rows, expected) == [("c", "negative_control", "single_step_sqnr_db", 4, 0)]
    assert selfcheck.missing_rows(rows.iloc[1:], expected)[0][3:] == (4, 3)
    assert selfcheck.missing_rows(rows.assign(status="error"), expected) == []


def test_image_crosscheck_catches_lenient_image_metrics():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    test = np.clip(ref.astype(int) + rng.integers(-9, 10, ref.shape), 0, 255).astype(np.uint8)
    test[1] = ref[1]  # one identical pair: SSIM must be exactly 1 and PSNR capped

    def worst(metrics):
        check = selfcheck.Crosscheck(np.zeros(2), ["", ""])
        selfcheck._check_images(check, test, ref, metrics)
        return check.worst

    honest = {"psnr_db": M.psnr_db, "ssim": M.ssim, "mean_abs_diff": M.mean_abs_diff}
    assert (worst(honest) <= selfcheck.CROSSCHECK_TOLERANCE).all()
    for name, lenient in {"psnr_db": lambda t, r: M.psnr_db(t, r) + 12, "ssim": lambda t, r: M.ssim(r, r),
                          "mean_abs_diff": lambda t, r: M.mean_abs_diff(t, r) / 2}.items():
        assert worst({**honest, name: lenient})[0] > selfcheck.CROSSCHECK_TOLERANCE, name


@pytest.mark.slow
def test_sweep_with_the_engine_as_reference_exits_2_saying_so(tmp_path, zoo_root, capsys):
    from harness.cli import main
    from harness.selftest import install

    undo = install("reference_is_the_engine")
    try:
        # --no-ref-cache: a cached reference really did come from diffusers, so the swap must not be served from it.
        code = main(["sweep", "--suite", SUITE, "--out", str(tmp_path), "--run-id", "run", "--zoo-root",
                     str(zoo_root), "--no-ref-cache"])
    finally:
        undo()
    assert code == 2
    assert "did not come from the reference backend 'diffusers'" in capsys.readouterr().out


def _stale_controls(made_db: float, floors: dict, **extra) -> tuple[pd.DataFrame, object]:
    """Control rows of one full-size cell made at made_db (the run's floors), and thresholds whose SQNR floors (and
    `extra` metrics) are `floors`: what a run re-gated after its own groups were measured looks like."""
    from harness.schema import ENGINE_VS_REFERENCE, NEGATIVE_CONTROL
    from harness.thresholds import parse_thresholds
    from tests.test_gate import frame, row

    key = dict(model="ideogram4", dtype="bf16", quant="fp8-wo", parallel="sp1")
    exact = selfcheck.exact_values(made_db)
    rows = [row(f"{p}_{n}", exact[n], comparison=NEGATIVE_CONTROL, device="cuda:0", size="full", **key)
            for p in ("single_step", "final_latent") for n in ("cosine", "rel_error", "sqnr_db")]
    controls = frame(*rows).assign(control_snr_db=made_db)
    group = {**key, "comparison": ENGINE_VS_REFERENCE, "device": "cuda", "size": "full", "source": "test",
             "at_least": {**floors, **extra.get("at_least", {})}, "at_most": extra.get("at_most", {})}
    return controls, parse_thresholds({"group": [group]})


FULL_FLOORS = {"single_step_sqnr_db": 18.0, "final_latent_sqnr_db": 23.0, "single_step_cosine": 0.9931,
               "final_latent_cosine": 0.9977}
FULL_CEILINGS = {"single_step_rel_error": 0.12, "final_latent_rel_error": 0.068}


def test_controls_made_for_other_floors_are_remade_at_the_snr_the_floors_in_use_ask_for():
    """A run's controls were made 3 dB under the floors of its day (33.44 dB); its own full-size groups were then
    measured at 18 / 23 dB. Judged as made, every control passes the looser floors ("cannot fail"), which says
    nothing about those floors; re-made at 15 dB (3 dB under 18) each is rejected, and its row says so."""
    controls, t = _stale_controls(33.44, FULL_FLOORS, at_most=FULL_CEILINGS)
    judged, errors = selfcheck.judge_controls(controls, t)
    assert not errors and judged.passed.all(), judged[["metric", "value", "why"]]
    assert (judged.value[judged.metric.str.endswith("sqnr_db")] == 15.0).all()
    assert judged.reason.str.startswith("re-made at 15.00 dB for the thresholds in use (the run made it at 33.44").all()

    # Planted: judge them as made (no re-making): the stale controls pass every floor and the gate cries wolf.
    original = selfcheck._remade
    try:
        selfcheck._remade = lambda *a: None
        as_made, _ = selfcheck.judge_controls(controls, t)
    finally:
        selfcheck._remade = original
    assert not as_made.passed.any() and as_made.why.str.contains("cannot fail").all()


def test_a_remade_control_still_catches_a_floor_that_cannot_fail():
    """Re-making moves the control to the floors in use; a floor looser than the control (a cosine of 0.98 beside
    an 18 dB SQNR floor) is still reported as one that cannot fail."""
    controls, t = _stale_controls(33.44, {**FULL_FLOORS, "single_step_cosine": 0.98}, at_most=FULL_CEILINGS)
    judged, _ = selfcheck.judge_controls(controls, t)
    bad = judged[~judged.passed.astype(bool)]
    assert list(bad.metric) == ["single_step_cosine"] and "cannot fail" in bad.why.iloc[0]


def test_controls_made_for_the_floors_in_use_are_judged_as_made():
    controls, t = _stale_controls(15.0, FULL_FLOORS, at_most=FULL_CEILINGS)
    judged, _ = selfcheck.judge_controls(controls, t)
    assert judged.passed.all() and (judged.value == controls.value).all()
    assert not judged.reason.fillna("").str.startswith("re-made").any()

"""Quantized cells through the `parity` CLI: the clean suite passes its gate, and each planted format bug makes
it fail (exit 1) on the metric that exists to catch it; an ignored-layer pattern that matches nothing is an
input error (exit 2) before anything runs."""
from pathlib import Path

import pandas as pd
import pytest

from harness import schema
from harness.cli import main
from harness.selftest import install

SUITE = str(Path(__file__).with_name("data") / "quant_suite.toml")
pytestmark = pytest.mark.slow


def sweep(tmp_path, zoo_root, cells, *extra):
    code = main(["sweep", "--suite", SUITE, "--out", str(tmp_path), "--run-id", "run", "--zoo-root", str(zoo_root),
                 "--cells", *cells, *extra])
    return code, tmp_path / "run"


def failed(run_dir) -> pd.DataFrame:
    """(cell, comparison, metric) of every row the gate failed, read back from the report."""
    from harness.gate import gate
    from harness.report import load_results
    from harness.thresholds import load_thresholds

    rows = gate(load_results(run_dir), load_thresholds()).rows
    return rows[rows.passed == False]  # noqa: E712 (nullable boolean)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, zoo_root):
    """The whole quant suite, unplanted: the control of every plant below, and the fully quantized fp8 cell that
    test_ignored_layers_reach_fused_modules compares with (a cell's rows do not depend on the other cells run)."""
    return sweep(tmp_path_factory.mktemp("clean"), zoo_root, ["/"])


def test_clean_quant_cells_pass(clean):
    code, run = clean
    assert code == 0, (run / "summary.md").read_text()
    frame = pd.read_parquet(run / "results.parquet")
    assert set(frame.quant) == {"fp8", "fp8-wo", "nvfp4-wo", "mxfp4", "nvfp4"}
    assert schema.ENGINE_VS_UNQUANTIZED in set(frame.comparison)
    by_mode = frame.groupby("quant")[["weight_bytes", "quantized_fraction"]].first()
    assert by_mode.weight_bytes["nvfp4"] < by_mode.weight_bytes["fp8"] < 3_694_368  # bf16 tiny transformer bytes
    assert (by_mode.quantized_fraction > 0.5).all()
    assert (run / "weights.csv").is_file()


PLANTS = {
    # catalogue plant (harness/selftest/flux1.py): (cell of tests/data/quant_suite.toml, metrics that must fail)
    "nvfp4_nibbles_swapped": ("nvfp4-ckpt", {"single_step_cosine", "weight_sqnr_db_min"}),
    "nvfp4_block_scales_transposed": ("nvfp4-ckpt", {"single_step_cosine", "weight_sqnr_db_min"}),
    "nvfp4_global_scale_dropped": ("nvfp4-ckpt", {"single_step_cosine", "weight_sqnr_db_min"}),
    "fp8_as_e5m2": ("fp8-wo", {"weight_sqnr_db_min"}),
    "mxfp4_exponent_off_by_one": ("mxfp4", {"single_step_cosine", "weight_sqnr_db_min"}),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_quant_bug_fails_the_gate(tmp_path, zoo_root, plant):
    cell, must_fail = PLANTS[plant]
    undo = install(plant)
    try:
        code, run = sweep(tmp_path, zoo_root, [f"/{cell}/"])
    finally:
        undo()
    assert code == 1, (run / "summary.md").read_text()
    assert must_fail <= set(failed(run).metric), sorted(set(failed(run).metric))


def test_ignored_layer_pattern_that_matches_nothing_is_exit_2(tmp_path, zoo_root, capsys):
    code, run = sweep(tmp_path, zoo_root, ["/fp8/"], "--quant-ignored-layers", "transformer_blocks.0.attn.to_q",
                      "single_blocks.99")
    assert code == 2
    assert "'single_blocks.99' matches no linear module" in capsys.readouterr().err
    assert not run.exists()


def test_ignored_layers_reach_fused_modules(tmp_path, zoo_root, clean):
    """A diffusers name (to_q) keeps the engine's fused img_qkv in bf16: fewer quantized parameters than the same
    fp8 cell with nothing ignored (the clean run's)."""
    run = sweep(tmp_path, zoo_root, ["/fp8/"], "--quant-ignored-layers", "transformer_blocks.0.attn.to_q")[1]

    def frac(r):
        frame = pd.read_parquet(r / "results.parquet")
        return frame[frame.quant == "fp8"].quantized_fraction.dropna().iloc[0]

    assert frac(run) < frac(clean[1])


def test_quantize_verb(tmp_path, tiny_flux_dir, capsys):
    out = tmp_path / "nvfp4"
    assert main(["quantize", str(tiny_flux_dir), "--format", "nvfp4", "--out", str(out), "--keep-bf16",
                 "transformer_blocks.0.attn.to_q"]) == 0
    assert (out / "transformer" / "hf_quant_config.json").is_file() and (out / "model_index.json").is_file()
    assert main(["quantize", str(tiny_flux_dir), "--format", "nvfp4", "--out", str(tmp_path / "bad"),
                 "--keep-bf16", "no_such_layer"]) == 2
    assert "no_such_layer" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["quantize", str(tmp_path), "--format", "nvfp4", "--out", str(tmp_path / "x")]) == 2

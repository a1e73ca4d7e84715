"""The quantized-layer oracle (harness/quant_oracle.py) and the ignored-layer check: torchao's references agree with
the engine's linears where the thresholds say they do, every planted quant bug the oracle exists for fails the gate
(planted from outside, as `parity selftest` does), and `parity quantize --calibrate` writes static input scales."""
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from engine.api import RunConfig, open_runner, quant_probe
from harness import quant_oracle as Q
from harness.cli import main
from harness.gate import gate
from harness.quantize import quantize_folder
from harness.selftest import install
from harness.thresholds import load_thresholds

IGNORED = ("transformer_blocks.0.attn.to_k",)  # a diffusers name: keeps the whole fused QKV of block 0 in bf16
PROMPTS = ("a red fox standing in fresh snow", "a lighthouse on a cliff at dusk")


def _cell(quant, source="online", ignored=()):
    return SimpleNamespace(name=f"flux1/tiny/bf16/{quant}-{source}/sp1/cpu", quant=quant, quant_source=source,
                           quant_ignored=tuple(ignored))


def _base(quant):
    # Columns a sweep row carries; device, optimize and size let the gate look up exactness tiers and keyed floors.
    return {"model": "flux1", "dtype": "bf16", "quant": quant, "parallel": "sp1", "device": "cpu", "optimize": "eager",
            "size": "tiny", "cell": f"flux1/{quant}"}


@pytest.fixture(scope="module")
def bf16_cfg(tiny_flux_dir):
    return RunConfig(family="flux1", model_dir=str(tiny_flux_dir), prompts=PROMPTS, dtype="bf16")


@pytest.fixture(scope="module")
def step0(bf16_cfg, one_thread):
    return open_runner(bf16_cfg).generate(bf16_cfg).step0_inputs


@pytest.fixture(scope="module")
def calibrated(tiny_flux_dir, bf16_cfg, tmp_path_factory):
    return quantize_folder(tiny_flux_dir, "nvfp4", tmp_path_factory.mktemp("cal") / "q", calibration=bf16_cfg)


def _gate(quant, cell, cfg, source_dir, inputs, tmp_path, plant=None):
    undo = install(plant) if plant else (lambda: None)
    try:
        rows = Q.oracle_rows(cell, _base(quant), quant_probe(cfg, source_dir, inputs, Q.TOKENS), torch.bfloat16,
                             tmp_path)
    finally:
        undo()
    return gate(pd.DataFrame(rows), load_thresholds()), rows


@pytest.mark.parametrize("quant", ["fp8", "fp8-wo", "nvfp4", "nvfp4-wo", "mxfp4", "mxfp4-wo"])
def test_every_online_mode_passes_the_oracle(quant, bf16_cfg, step0, tiny_flux_dir, tmp_path):
    result, rows = _gate(quant, _cell(quant), bf16_cfg.replace(quant=quant), tiny_flux_dir, step0, tmp_path)
    assert result.exit_code == 0, result.failed[["metric", "layer", "why"]].to_string()
    oracle = [r for r in rows if r["comparison"] == Q.QUANT_ORACLE]
    assert len(oracle) >= 16 and all(r["status"] == "ok" for r in oracle)
    table = pd.read_csv(tmp_path / Q.ORACLE_CSV)
    if quant != "fp8":  # fp8 W8A8: CPU _scaled_mm sums in another order than torchao's fp32 matmul (thresholds.toml)
        assert table.bitwise_equal.all()


@pytest.mark.parametrize("quant, plant", [
    ("fp8", "fp8_activation_scale_per_tensor"),
    ("nvfp4", "nvfp4_activations_not_quantized"),
    ("fp8-wo", "fp8_as_e5m2"),
    ("mxfp4", "mxfp4_exponent_off_by_one"),
    ("mxfp4-wo", "mxfp4_exponent_off_by_one"),
    ("mxfp4-wo", "mxfp4_wo_activations_quantized"),  # inside the end-to-end floors: only the oracle sees it
])
def test_planted_quant_bugs_fail_the_oracle(quant, plant, bf16_cfg, step0, tiny_flux_dir, tmp_path):
    result, _ = _gate(quant, _cell(quant), bf16_cfg.replace(quant=quant), tiny_flux_dir, step0, tmp_path, plant)
    assert result.exit_code == 1
    assert set(result.failed.comparison) == {Q.QUANT_ORACLE}


def test_static_input_scale_checkpoint_passes_and_its_plants_fail(calibrated, bf16_cfg, step0, tiny_flux_dir,
                                                                    tmp_path):
    with safe_open(str(calibrated / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        scales = [k for k in f.keys() if k.endswith(".input_scale")]
    assert scales  # every quantized module carries one
    cell = _cell("nvfp4", "calibrated", IGNORED)
    cfg = bf16_cfg.replace(model_dir=str(calibrated), quant="nvfp4", quant_ignored=IGNORED)
    result, rows = _gate("nvfp4", cell, cfg, tiny_flux_dir, step0, tmp_path)
    assert result.exit_code == 0, result.failed[["metric", "layer", "why"]].to_string()
    table = pd.read_csv(tmp_path / Q.ORACLE_CSV)
    assert table.static_input_scale.all() and table.bitwise_equal.all()
    layers = pd.read_csv(tmp_path / Q.LAYERS_CSV)
    assert layers[layers.asked_unquantized].layer.tolist() == ["double_blocks.0.img_qkv"]
    assert not layers[layers.asked_unquantized].quantized.any()
    for plant in ("nvfp4_static_input_scale_ignored", "nvfp4_static_input_scale_inverted"):
        result, _ = _gate("nvfp4", cell, cfg, tiny_flux_dir, step0, tmp_path, plant)
        assert result.exit_code == 1 and set(result.failed.comparison) == {Q.QUANT_ORACLE}, plant


def test_a_layer_asked_for_but_quantized_fails_the_layer_check(calibrated, bf16_cfg, step0, tiny_flux_dir, tmp_path):
    cfg = bf16_cfg.replace(model_dir=str(calibrated), quant="nvfp4", quant_ignored=IGNORED)
    result, rows = _gate("nvfp4", _cell("nvfp4", "calibrated", IGNORED), cfg, tiny_flux_dir, step0, tmp_path,
                         "ignored_layers_quantized_anyway")
    assert result.exit_code == 1
    [failed] = result.failed.itertuples()
    assert failed.comparison == Q.QUANT_LAYERS and failed.value == 1 and "double_blocks.0.img_qkv" in failed.reason


def test_layer_set_counts_patterns_that_matched_nothing():
    records = [SimpleNamespace(denoiser="t", layer="blocks.0.qkv", sources=("blocks.0.attn.to_q",), kind="Linear",
                               quantized=False),
               SimpleNamespace(denoiser="t", layer="blocks.1.qkv", sources=("blocks.1.attn.to_q",), kind="NVFP4Linear",
                               quantized=True)]
    table, unmatched = Q.layer_set(records, ("blocks.0.attn", "blocks.9", "blocks.1.qkv"))
    assert table.asked_unquantized.tolist() == [True, True]
    assert table.mismatch.tolist() == [False, True] and unmatched == ["blocks.9"]
    assert not Q.matches("blocks.1", "blocks.10.qkv") and Q.matches("attn.to_*", "blocks.0.attn.to_q")


def test_quantize_cli_calibrates_nvfp4_only(tiny_flux_dir, tmp_path, one_thread):
    assert main(["quantize", str(tiny_flux_dir), "--format", "fp8-wo", "--out", str(tmp_path / "fp8"),
                 "--calibrate", "a fox"]) == 2
    assert not (tmp_path / "fp8").exists()
    assert main(["quantize", str(tiny_flux_dir), "--format", "nvfp4", "--out", str(tmp_path / "nv"),
                 "--calibrate", "a fox", "--calib-steps", "1"]) == 0
    with safe_open(str(tmp_path / "nv" / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        scales = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".input_scale")}
        quantized = [k for k in f.keys() if k.endswith(".weight_scale_2")]
    assert len(scales) == len(quantized) and all(s.dtype == torch.float32 and s.ndim == 0 and s > 0
                                                 for s in scales.values())

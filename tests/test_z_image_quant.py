"""Z-Image quantization (issue 10): `--quant-ignored-layers` naming a checkpoint module of the fused feed-forward (w1 or
w3) keeps the engine's w13 of that layer unquantized, a pattern that matches nothing is exit 2 before anything runs,
and MXFP4's output-dim < 256 skip reaches this model's small linears."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness.cli import main

SUITE = "zimage"


def _linears(quant: str, ignored: tuple[str, ...] = ()) -> set[str]:
    from engine.models import z_image as Z
    from engine.quant.api import QuantSpec, select_linears
    from engine.quant.names import packed_from_key_map
    from harness.zoo import transformer_config

    cfg = Z.ZImageConfig.from_diffusers(transformer_config("z-image", "tiny"))
    with torch.device("meta"):
        model = Z.ZImageTransformer(cfg)
    return set(select_linears(model, QuantSpec(quant, ignored), packed_from_key_map(Z.diffusers_key_map(cfg), None)))


def test_w1_pattern_keeps_the_fused_w13_unquantized():
    every = _linears("fp8")
    kept = every - _linears("fp8", ("layers.0.feed_forward.w1",))
    assert kept == {"layers.0.feed_forward.w13"}
    assert every - _linears("fp8", ("feed_forward.w3",)) == {n for n in every if n.endswith("feed_forward.w13")}


def test_mxfp4_skips_outputs_narrower_than_256():
    """Tiny Z-Image (dim 96): to_out, w2 (96 outputs) and the final projection stay bf16 under MXFP4; the fused
    to_qkv (288), w13 (512) and the adaLN modulation (384) are quantized. fp8 takes them all."""
    mx, fp8 = _linears("mxfp4"), _linears("fp8")
    assert "layers.0.attention.to_qkv" in mx and "layers.0.feed_forward.w13" in mx
    assert "layers.0.adaLN_modulation" in mx
    assert not any(n.endswith(("attention.to_out", "feed_forward.w2")) for n in mx)
    assert {"layers.0.attention.to_out", "layers.0.feed_forward.w2"} <= fp8


def test_ignored_layer_pattern_that_matches_nothing_is_exit_2(tmp_path, zoo_root, capsys):
    code = main(["sweep", "--suite", SUITE, "--out", str(tmp_path), "--run-id", "run", "--zoo-root", str(zoo_root),
                 "--cells", "/bf16/fp8/sp1/", "--quant-ignored-layers", "layers.0.feed_forward.w9"])
    assert code == 2
    assert "'layers.0.feed_forward.w9' matches no linear module" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sweep_keeps_the_ignored_w13_out_of_weights_csv(tmp_path, zoo_root):
    code = main(["sweep", "--suite", SUITE, "--out", str(tmp_path), "--run-id", "run", "--zoo-root", str(zoo_root),
                 "--cells", "/bf16/fp8/sp1/", "--no-golden", "--quant-ignored-layers", "layers.0.feed_forward.w1"])
    run = Path(tmp_path) / "run"
    assert code == 0, (run / "summary.md").read_text()
    layers = set(pd.read_csv(run / "weights.csv").layer)
    assert "layers.0.feed_forward.w13" not in layers and "layers.1.feed_forward.w13" in layers
    assert "layers.0.attention.to_qkv" in layers
    frame = pd.read_parquet(run / "results.parquet")
    mismatch = frame[frame.metric == "layer_set_mismatch"].value
    assert len(mismatch) and (mismatch == 0).all()


def test_sensitivity_runs_on_a_denoiser_of_per_sample_lists(tmp_path):
    """Z-Image's transformer takes and returns per-sample lists; `parity sensitivity` once failed on it with
    "'list' object has no attribute 'detach'" at full size. The synthesized path at tiny size on CPU is the same
    code: it must rank every kind of linear and write its advice. (32x32: the synthesized inputs take latents at
    1/8 of the image, as the full-size VAE has them.)"""
    out = tmp_path / "sens"
    code = main(["sensitivity", "--model", "z-image", "--size", "tiny", "--device", "cpu", "--quant", "fp8",
                 "--group", "kind", "--suite", SUITE, "--holdout-seeds", "7", "--height", "32", "--width", "32",
                 "--out", str(out)])
    assert code == 0
    ranking = pd.read_parquet(out / "results.parquet")
    assert ranking["value"].notna().all() and len(ranking) > 0

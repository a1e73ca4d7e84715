"""End to end through the `parity` CLI: the smoke suite passes, and each planted engine bug makes the gate
fail (exit 1) with the failing rows in summary.md; a gate that cannot find a threshold errors (exit 2)."""
import dataclasses
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import engine.models.flux1 as flux1_model
from harness import schema
from harness.cli import main
from harness.selftest import install

DATA = Path(__file__).with_name("data")
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sweep(tmp_path, zoo_root, *extra, suite=str(DATA / "tiny_suite.toml"), run_id="run"):
    code = main(["sweep", "--suite", suite, "--out", str(tmp_path), "--run-id", run_id,
                 "--zoo-root", str(zoo_root), *extra])
    return code, tmp_path / run_id


def failing_metrics(run_dir):
    summary = (run_dir / "summary.md").read_text()
    return summary[summary.index("<!-- gate:begin -->"):]


def test_smoke_suite_passes_its_gate(tmp_path, zoo_root):
    """Exactly what `make sweep` runs, goldens included."""
    code, run = sweep(tmp_path, zoo_root, suite="smoke")
    assert code == 0, (run / "summary.md").read_text()
    frame = pd.read_parquet(run / "results.parquet")
    assert set(frame.dtype) == {"fp32", "bf16"}
    assert set(frame.quant) == {"none", "fp8", "fp8-wo", "nvfp4", "nvfp4-wo", "mxfp4", "mxfp4-wo"}
    assert set(frame.parallel) == {"sp1", "ulysses2", "ring2", "cfg2"}
    # sp_overlap against the same two ranks without it: bitwise on CPU (an exactness tier judges it so)
    overlap = frame[(frame.optimize == "sp_overlap") & (frame.comparison == schema.OPTIMIZED_VS_EAGER)]
    assert len(overlap) and (overlap[overlap.metric == "final_latent_cosine"].value == 1.0).all()
    assert set(frame.comparison) == set(schema.COMPARISONS)
    assert (frame.status == schema.OK).all()
    csv = pd.read_csv(run / "results.csv")
    assert len(csv) == len(frame) and list(csv.columns) == list(frame.columns)
    assert frame.parity_git.notna().all() and frame.model_hash.str.len().min() == 16
    n_cells = frame.cell.nunique()
    assert len(list((run / "images").rglob("*.png"))) == n_cells * 2 * 2 * 2  # cells x seeds x prompts x sides


@pytest.mark.parametrize("plant", ["rope_axes_swapped", "timestep_not_scaled"])
def test_planted_engine_bug_fails_the_gate(tmp_path, zoo_root, plant):
    undo = install(plant)  # from the product's catalogue (harness/selftest/flux1.py)
    try:
        code, run = sweep(tmp_path, zoo_root)
    finally:
        undo()
    assert code == 1
    gate = failing_metrics(run)
    assert "FAIL" in gate and "single_step_cosine" in gate and "final_latent_cosine" in gate


def test_whole_forward_compile_fails_the_gate_on_the_compiled_cell(tmp_path, zoo_root, monkeypatch):
    """The README's compile bug: compiling the whole forward (not block by block) lets inductor skip the bf16
    rounding of timestep * 1000. Planted as the engine's compile switch, the smoke suite's compiled cell must fail
    on the metrics that see it, while its (regionally compiled) twin passes in test_smoke_suite_passes_its_gate."""
    import engine.runner as runner

    optimize = runner.optimize

    def whole_forward(model, spec):
        model = optimize(model, dataclasses.replace(spec, compile_blocks=False))
        if spec.compile_blocks:
            model.compile(mode=spec.compile_mode, dynamic=False)
        return model

    monkeypatch.setattr(runner, "optimize", whole_forward)
    code, run = sweep(tmp_path, zoo_root, "--cells", "compile_blocks", "--no-golden", suite="smoke")
    assert code == 1
    frame = pd.read_parquet(run / "results.parquet")
    assert set(frame.cell) == {"flux1/tiny/bf16/none/sp1/cpu/compile_blocks"} and set(frame.optimize) == {"compile_blocks"}
    gate = failing_metrics(run)
    assert "FAIL" in gate and "compile_blocks" in gate and "single_step_cosine" in gate


def test_a_small_compile_regression_fails_the_compiled_cells_own_floors(tmp_path, zoo_root, monkeypatch):
    """A compiled forward that loses a little precision (~3% relative noise on its output, as a reduced-precision
    kernel or a wrong fusion would): inside the eager bf16 floors (single-step cosine >= 0.999), so only the compiled
    cell's own floors (thresholds keyed by optimize = compile_blocks) can catch it."""
    import engine.runner as runner

    optimize = runner.optimize

    def lossy(model, spec):
        model = optimize(model, spec)
        if not spec.compile_blocks:  # the eager twin (optimized_vs_eager) stays clean: the loss is the switch's
            return model
        forward = model.forward

        def noisy(*args, **kwargs):
            out = forward(*args, **kwargs)
            gen = torch.Generator().manual_seed(0)
            noise = torch.randn(out.shape, generator=gen).to(out.dtype)
            return out + 0.03 * out.float().square().mean().sqrt().to(out.dtype) * noise

        model.forward = noisy
        return model

    monkeypatch.setattr(runner, "optimize", lossy)
    code, run = sweep(tmp_path, zoo_root, "--cells", "compile_blocks", "--no-golden", suite="smoke")
    assert code == 1
    frame = pd.read_parquet(run / "results.parquet")
    step = frame[(frame.metric == "single_step_cosine") & (frame.comparison == schema.ENGINE_VS_REFERENCE)]
    print(f"\nplanted compile regression: single-step cosine {step.value.min():.6f}..{step.value.max():.6f}")
    assert (step.value >= 0.999).all() and (step.value < 0.9999).all()  # eager floor passes, compiled floor fails
    assert "single_step_cosine" in failing_metrics(run)
    # The same loss against the same engine eager: the switch's own comparison fails too.
    own = frame[(frame.comparison == schema.OPTIMIZED_VS_EAGER) & (frame.metric == "single_step_cosine")]
    assert len(own) == 4 and (own.value < 0.9999).all()
    assert "optimized_vs_eager" in failing_metrics(run)


def test_nan_in_engine_output_fails_with_the_reason(tmp_path, zoo_root, monkeypatch):
    forward = flux1_model.Flux1Transformer.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out.index_fill(1, torch.tensor([3]), float("nan"))

    monkeypatch.setattr(flux1_model.Flux1Transformer, "forward", poisoned)
    code, run = sweep(tmp_path, zoo_root)
    assert code == 1
    frame = pd.read_parquet(run / "results.parquet")
    # The engine's rows; the negative controls perturb the (finite) reference and stay ok.
    bad = frame[(frame.metric == "final_latent_cosine") & (frame.comparison == schema.ENGINE_VS_REFERENCE)]
    assert (bad.status == schema.INVALID).all() and bad.reason.str.contains("NaN").all()
    assert "NaN" in failing_metrics(run)


def test_crashing_cell_becomes_error_rows_and_the_sweep_goes_on(tmp_path, zoo_root, monkeypatch):
    from engine.pipelines.flux1 import Flux1Pipeline

    def crash(self, cfg):
        if cfg.dtype == "bf16":
            raise RuntimeError("planted crash")
        return generate(self, cfg)

    generate = Flux1Pipeline.generate
    monkeypatch.setattr(Flux1Pipeline, "generate", crash)
    suite = tmp_path / "two.toml"
    suite.write_text((DATA / "tiny_suite.toml").read_text().replace('dtype = "fp32"', 'dtype = ["fp32", "bf16"]'))
    code, run = sweep(tmp_path, zoo_root, suite=str(suite))
    assert code == 1
    frame = pd.read_parquet(run / "results.parquet")
    assert (frame[frame.dtype == "fp32"].status == schema.OK).all()
    errors = frame[frame.dtype == "bf16"]
    assert len(errors) and (errors.status == schema.ERROR).all() and errors.reason.str.contains("planted crash").all()


def test_missing_threshold_is_an_error_not_a_default(tmp_path, zoo_root):
    code, run = sweep(tmp_path, zoo_root, "--no-gate")
    assert code == 0
    blocks = (REPO / "golden" / "thresholds.toml").read_text().split("[[group]]")
    # Every group that could answer flux1/fp32/none/sp1 engine_vs_reference ssim (wildcards included) loses it.
    target = [i for i, b in enumerate(blocks) if all(f in b for f in (
        'dtype = "fp32"', 'quant = "none"', 'comparison = "engine_vs_reference"', "ssim = "))]
    assert target, "expected fp32 engine groups with an ssim threshold"
    for i in target:
        blocks[i] = re.sub(r"ssim = [0-9.]+, ", "", blocks[i])
    thresholds = tmp_path / "thresholds.toml"
    thresholds.write_text("[[group]]".join(blocks))
    assert main(["gate", str(run), "--thresholds", str(thresholds)]) == 2
    assert main(["gate", str(run)]) == 0


def test_golden_drift_is_reported_separately(tmp_path, zoo_root):
    """A changed golden (what a diffusers upgrade looks like) fails reference_vs_golden, not the engine rows."""
    golden = tmp_path / "golden"
    shutil.copytree(REPO / "golden" / "smoke", golden / "smoke")
    for path in (golden / "smoke").rglob("seed0.safetensors"):
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors["final_latents"] = tensors["final_latents"].flip(1).contiguous()
        tensors["images"] = (255 - tensors["images"]).contiguous()
        save_file(tensors, str(path), metadata=meta)
    code, run = sweep(tmp_path, zoo_root, "--golden-root", str(golden), "--cells", "/none/sp1/", suite="smoke")
    assert code == 1
    frame = pd.read_parquet(run / "results.parquet")
    gate = failing_metrics(run)
    assert schema.REFERENCE_VS_GOLDEN in gate and schema.ENGINE_VS_REFERENCE not in gate.split("Failing")[-1]
    assert (frame[frame.comparison == schema.ENGINE_VS_REFERENCE].status == schema.OK).all()


def test_bad_input_is_a_clear_error(tmp_path, zoo_root, capsys):
    assert main(["sweep", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nope'; valid: [" in capsys.readouterr().err
    assert main(["sweep", "--device", "tpu", "--out", str(tmp_path)]) == 2
    assert "valid choices are cpu, cuda" in capsys.readouterr().err
    assert main(["gate", str(tmp_path / "missing")]) == 2
    assert not any(tmp_path.iterdir()), "bad input must leave nothing behind"


def test_same_seed_same_report(tmp_path, zoo_root):
    """Determinism: same seed, weights and noise give the same numbers, row for row."""
    first = sweep(tmp_path, zoo_root, run_id="a")[1]
    second = sweep(tmp_path, zoo_root, run_id="b")[1]
    cols = ["cell", "prompt_idx", "seed", "comparison", "metric", "step", "value", "status"]
    a, b = (pd.read_parquet(r / "results.parquet")[cols] for r in (first, second))
    pd.testing.assert_frame_equal(a, b)

"""Small synthetic runs for the report tests: a results frame, weights.csv and image files, no models."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from harness.runfiles import write_run
from harness.schema import COLUMNS, ENGINE_VS_REFERENCE, ENGINE_VS_UNQUANTIZED

META = dict(run_id="r1", time="2026-11-27T08:00:00Z", suite="synthetic", torch_version="2.14", diffusers_version="0.42.1",
            transformers_version="5.24", parity_git="abc123", clip_model="tiny-random", clip_semantic=False)


def row(metric: str, value: float, cell=("flux1", "bf16", "fp8", "sp1"), **kw) -> dict:
    model, dtype, quant, parallel = cell
    base = {"model": model, "dtype": dtype, "quant": quant, "parallel": parallel, "device": "cpu", "size": "tiny",
            "backend": "engine", "optimize": "eager", "cell": f"{model}/tiny/{dtype}/{quant}/{parallel}/cpu", "prompt_idx": 0,
            "prompt": "a red cube", "seed": 0, "steps": 4, "height": 16, "width": 16, "guidance": 3.5,
            "true_cfg_scale": 1.0, "comparison": ENGINE_VS_REFERENCE, "metric": metric, "step": pd.NA,
            "value": value, "status": "ok", "reason": None, "model_hash": "h0", "weight_bytes": 1000,
            "quantized_fraction": 0.5, **{k: v for k, v in META.items() if k not in ("time", "suite")}}
    base.update(kw)
    return base


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)[list(COLUMNS)].astype({"step": "Int64"})


FP8 = ("flux1", "bf16", "fp8", "sp1")
FP32 = ("flux1", "fp32", "none", "sp1")
VIDEO = ("flux1", "bf16", "none", "sp1")


def results(psnr_fp8: float = 36.0, seeds=(0, 1)) -> pd.DataFrame:
    """fp8 cell (both comparisons, trajectory curves), an exact fp32 cell, and a 'video' cell, 2 seeds."""
    rows = []
    for seed in seeds:
        for c in (ENGINE_VS_REFERENCE, ENGINE_VS_UNQUANTIZED):
            rows += [row("single_step_cosine", 0.9985 - 0.0001 * seed, FP8, seed=seed, comparison=c),
                     row("psnr_db", psnr_fp8 + seed, FP8, seed=seed, comparison=c),
                     row("mean_abs_diff", 2.0, FP8, seed=seed, comparison=c)]
            rows += [row("trajectory_cosine", 1 - 1e-4 * (s + 1) * (seed + 1), FP8, seed=seed, comparison=c, step=s)
                     for s in range(4)]
        rows += [row("single_step_cosine", 1.0, FP32, seed=seed), row("psnr_db", 100.0, FP32, seed=seed),
                 row("trajectory_cosine", 1.0, FP32, seed=seed, step=0),
                 row("single_step_cosine", 1.0, VIDEO, seed=seed)]
    rows.append(row("weight_sqnr_db_min", 31.7, FP8, comparison=ENGINE_VS_UNQUANTIZED, seed=pd.NA, prompt_idx=pd.NA))
    return frame(rows)


def write_synthetic_run(run_dir: Path, results_frame: pd.DataFrame | None = None) -> Path:
    """results + meta + weights.csv + images: fp8 and fp32 as (B, H, W, 3) pairs, the video cell as 3 frames."""
    df = results_frame if results_frame is not None else results()
    write_run(run_dir, df, META)
    pd.DataFrame({"cell": f"flux1/tiny/bf16/fp8/sp1/cpu", "layer": [f"blocks.{i}.fc" for i in range(6)],
                  "sqnr_db": [33.0, 31.7, 35.2, 32.5, 34.0, 31.9]}).to_csv(run_dir / "weights.csv", index=False)
    rng = np.random.default_rng(0)
    for cell, frames in ((FP8, 1), (FP32, 1), (VIDEO, 3)):
        folder = run_dir / "images" / f"{cell[0]}/tiny/{cell[1]}/{cell[2]}/{cell[3]}/cpu".replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for seed in (0, 1):
            ref = rng.integers(0, 256, size=(frames, 16, 16, 3), dtype=np.uint8)
            eng = np.clip(ref.astype(int) + rng.integers(-3, 4, size=ref.shape), 0, 255).astype(np.uint8)
            for j in range(frames):
                tag = f"_f{j}" if frames > 1 else ""
                Image.fromarray(eng[j]).save(folder / f"seed{seed}_p0{tag}_engine.png")
                Image.fromarray(ref[j]).save(folder / f"seed{seed}_p0{tag}_reference.png")
    return run_dir


def thresholds_toml(path: Path, psnr_floor: float = 30.0) -> Path:
    rows = []
    for (model, dtype, quant, parallel), comps in ((FP8, (ENGINE_VS_REFERENCE, ENGINE_VS_UNQUANTIZED)),
                                                   (FP32, (ENGINE_VS_REFERENCE,)), (VIDEO, (ENGINE_VS_REFERENCE,))):
        for comp in comps:
            rows.append(f'[[group]]\nmodel = "{model}"\ndtype = "{dtype}"\nquant = "{quant}"\nparallel = "{parallel}"\n'
                        f'comparison = "{comp}"\nsource = "test fixture"\n'
                        f'at_least = {{ single_step_cosine = 0.997, psnr_db = {psnr_floor} }}\n'
                        f'at_most = {{ mean_abs_diff = 4.0 }}\n')
    rows.append(f'[[threshold]]\nmodel = "flux1"\ndtype = "bf16"\nquant = "fp8"\nparallel = "sp1"\n'
                f'comparison = "{ENGINE_VS_UNQUANTIZED}"\nmetric = "weight_sqnr_db_min"\nop = ">="\nvalue = 28.0\n'
                f'source = "test fixture"\n')
    path.write_text("\n".join(rows))
    return path


def nan_safe(x) -> bool:
    return isinstance(x, float) and math.isnan(x)

"""Pipeline modes of `parity bench`: one whole generation (text encoders, `--steps` denoising steps, VAE decode)
timed wall-clock, the engine's own pipeline (engine.api.open_runner) next to the diffusers pipeline (the family's
reference runner), on the same synthesized weights at the bench's size.

Every component is built in memory on the bench's device (harness.zoo.pipeline_components: a full-size T5-XXL is
synthesized on the GPU in seconds and never written to disk), once per run. The tokenizers, text encoders and VAE are
the same objects in every mode (the engine may use transformers encoders and diffusers VAEs as components), so modes
differ only in the denoiser and the pipeline code around it. Each mode's denoisers are synthesized afresh from the
same seed (the same weights in every mode) and freed after it.

Timing: `pipeline_warmup` untimed generations (compiles, CUDA-graph captures), then `pipeline_iters` timed ones, wall
clock between CUDA synchronisations; median_ms / min_ms are milliseconds per generation. Both pipelines record every
step's latents on the CPU as the harness's runners always do: one device-to-host copy per step in each. Accuracy vs
the first pipeline mode: cosine of the final latents (cosine_vs_first, the worst sample) and PSNR of the decoded
images (psnr_vs_first, dB, the worst sample). peak_mem_gb (the timed generations) and build_peak_gb (building the mode)
include the shared encoders and VAE."""
from __future__ import annotations

import statistics
import time
from dataclasses import fields

import torch

from engine.api import OptimizeSpec, RunConfig, denoiser_names, denoiser_weights, open_runner, sampling_type
from harness import metrics as M
from harness.bench_modes import (QUANT_COLUMNS, BenchConfig, Mode, apply_diffusers_options, own_inductor_config,
                                 quant_columns, release, take_peak, torchao_config, torchao_linears, weight_bytes)
from harness.zoo import pipeline_components, synthesize_transformer_state_dict, transformer_config

PROMPT = "a photograph of a red fox standing in fresh snow, soft morning light, shallow depth of field"
DTYPE_NAME, DTYPE = "bf16", torch.bfloat16  # every bench mode runs in bf16


def run_config(cfg: BenchConfig, mode: Mode) -> RunConfig:
    """The RunConfig of one pipeline mode. The text length is the bench's --text-tokens where the family's sampling
    object has a max_sequence_length (the conditioning length the denoiser sees)."""
    sampling = sampling_type(cfg.family)
    length = {"max_sequence_length": cfg.text_tokens} if "max_sequence_length" in {
        f.name for f in fields(sampling)} else {}
    return RunConfig(family=cfg.family, model_dir=f"<in memory: {cfg.family} {cfg.size} seed {cfg.seed}>",
                     prompts=(PROMPT,), sampling=sampling(**length), seed=cfg.seed, steps=cfg.steps,
                     height=cfg.height, width=cfg.width, dtype=DTYPE_NAME, device=cfg.device, quant=mode.quant,
                     optimize=mode.optimize or OptimizeSpec())


def open_mode(cfg: BenchConfig, mode: Mode, run_cfg: RunConfig, shared: dict):
    """(runner, its denoiser modules): the mode's pipeline with the shared components and freshly synthesized
    denoisers (the state dicts are dropped on return: the models hold what they use)."""
    from reference.registry import open_runner as reference_runner

    if mode.torchao:
        torchao_config(mode.torchao)  # a missing torchao fails before any weight is synthesized
    names = denoiser_names(cfg.family)
    components = dict(shared, **{d: denoiser_weights(
        transformer_config(cfg.family, cfg.size, d),
        synthesize_transformer_state_dict(cfg.family, cfg.size, seed=cfg.seed, device=cfg.device, dtype=DTYPE,
                                          denoiser=d)) for d in names})
    if mode.backend == "engine":
        runner = open_runner(run_cfg, components)
        return runner, [getattr(runner, d) for d in names]
    runner = reference_runner(run_cfg, components)
    models = [getattr(runner.pipe, d) for d in names]  # reference runners keep their diffusers pipeline in .pipe
    for model in models:
        apply_diffusers_options(model, mode)
    return runner, models


def time_generate(runner, run_cfg: RunConfig, cfg: BenchConfig):
    """(milliseconds of each timed generation, the last Artifacts)."""
    cuda = torch.device(cfg.device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(cfg.device)
    for _ in range(cfg.pipeline_warmup):
        runner.generate(run_cfg)
    times = []
    for _ in range(cfg.pipeline_iters):
        sync()
        t0 = time.perf_counter()
        artifacts = runner.generate(run_cfg)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, artifacts


def pipeline_rows(cfg: BenchConfig, modes: list[Mode], base_row):
    """One row per pipeline mode (denoiser "pipeline"), yielded as each finishes; `base_row(mode, denoiser)` gives
    the columns every bench row has (harness.bench)."""
    cuda = torch.device(cfg.device).type == "cuda"
    shared, shared_error = None, ""
    try:
        shared = pipeline_components(cfg.family, cfg.size, seed=cfg.seed, device=cfg.device, dtype=DTYPE)
    except Exception as e:  # every pipeline mode reports it; the denoiser rows already stand
        shared_error = f"{type(e).__name__}: {e}"
    reference, baseline = None, None
    for mode in modes:
        row = {**base_row(mode, "pipeline"), "steps": cfg.steps}
        runner = models = artifacts = None
        try:
            if shared is None:
                raise RuntimeError(f"pipeline components could not be built: {shared_error}")
            run_cfg = run_config(cfg, mode)
            with own_inductor_config():
                t0 = time.perf_counter()
                runner, models = open_mode(cfg, mode, run_cfg, shared)
                build_s = time.perf_counter() - t0
                build_peak = take_peak(cuda)
                times, artifacts = time_generate(runner, run_cfg, cfg)
            if reference is None:
                reference, baseline = artifacts, mode.name
            if mode.backend == "engine":
                quant = {k: sum(quant_columns(m)[k] for m in models) for k in QUANT_COLUMNS}
            else:
                quant = {**dict.fromkeys(QUANT_COLUMNS, 0), "n_quantized_linears": sum(map(torchao_linears, models))}
            row.update({"median_ms": statistics.median(times), "min_ms": min(times), "build_s": round(build_s, 1),
                        "weight_gb": sum(map(weight_bytes, models)) / 1e9, **quant,
                        "peak_mem_gb": take_peak(cuda), "build_peak_gb": build_peak,
                        "cosine_vs_first": float(M.cosine(artifacts.final_latents, reference.final_latents,
                                                          what="final latents").min()),
                        "psnr_vs_first": float(M.psnr_db(artifacts.images, reference.images).min()),
                        "baseline": baseline, "error": ""})
        except Exception as e:  # one mode's failure is its row; the other modes still run
            row.update({"median_ms": float("nan"), "cosine_vs_first": float("nan"), "psnr_vs_first": float("nan"),
                        "baseline": baseline, "error": f"{type(e).__name__}: {e}"})
        yield row
        del runner, models, artifacts
        release(cuda)

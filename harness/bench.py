"""Denoiser step time at full size, engine next to diffusers in one process, on synthesized weights, for every
denoiser of the family (inputs from the family's own bench_inputs hook).

`parity bench --family <family> --height 1024 --width 1024 --modes diffusers-bf16 engine-bf16 ...` materializes the
full-size transformer directly on the GPU (no 24 GB written to disk), times one forward per mode with CUDA
events after warm-up, and checks each mode's output against the diffusers bf16 output on the same inputs."""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from engine.api import OptimizeSpec, bench_inputs, bench_shape, build_denoiser, denoiser_names, quant_summary
from harness import metrics as M
from harness.provenance import versions
from harness.zoo import synthesize_transformer_state_dict, transformer_config


@dataclass(frozen=True)
class BenchConfig:
    family: str
    size: str = "full"
    height: int = 1024
    width: int = 1024
    text_tokens: int = 512
    batch: int = 1
    warmup: int = 3
    iters: int = 10
    device: str = "cuda"
    seed: int = 0
    parallel: str = "sp1"  # under torchrun: every rank times its shard of the same forward


def time_forward(fn, cfg: BenchConfig) -> tuple[list[float], torch.Tensor]:
    with torch.no_grad():
        for _ in range(cfg.warmup):
            out = fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(cfg.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return times, out


def build_diffusers(cfg: BenchConfig, denoiser: str, tcfg: dict, dtype):
    """The reference's own denoiser class for `denoiser`, built on meta and assigned the synthesized weights."""
    from reference.registry import reference

    with torch.device("meta"):
        model = reference(cfg.family).DENOISERS[denoiser](**{k: v for k, v in tcfg.items() if not k.startswith("_")})
    sd = synthesize_transformer_state_dict(cfg.family, cfg.size, seed=cfg.seed, device=cfg.device, dtype=dtype,
                                           denoiser=denoiser)
    model.load_state_dict(sd, assign=True, strict=True)
    model = model.eval().requires_grad_(False)
    return model, lambda x: model(**x, return_dict=False)[0]


def build_engine(cfg: BenchConfig, denoiser: str, tcfg: dict, dtype, quant: str, spec: OptimizeSpec):
    sd = synthesize_transformer_state_dict(cfg.family, cfg.size, seed=cfg.seed, device=cfg.device, dtype=dtype,
                                           denoiser=denoiser)
    return build_denoiser(cfg.family, denoiser, tcfg, sd, quant, spec, cfg.parallel, dtype, cfg.device)


def quant_columns(model) -> dict:
    """How many linears are quantized, and how many fp8 ones run through torch._scaled_mm (vs the emulated twin)."""
    summary = quant_summary(model)
    return {k: summary[k] for k in ("n_quantized_linears", "n_fp8_scaled_mm_linears")}


@dataclass(frozen=True)
class Mode:
    name: str
    backend: str  # "engine" | "diffusers"
    quant: str
    options: frozenset[str]


def parse_mode(mode: str) -> Mode:
    base, *options = mode.split("+")
    backend, _, quant = base.partition("-")
    if backend not in ("engine", "diffusers"):
        raise ValueError(f"unknown bench mode {mode!r}; valid: diffusers-bf16, engine-<bf16|quant mode>")
    if bad := set(options) - {"compile", "cudnn"}:
        raise ValueError(f"unknown bench option(s) {sorted(bad)} in {mode!r}; valid: +compile, +cudnn")
    return Mode(mode, backend, {"bf16": "none"}.get(quant, quant), frozenset(options))


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run_bench(cfg: BenchConfig, modes: list[str], out_dir: Path, log=print) -> pd.DataFrame:
    """Every mode on every denoiser of the family, one row each; cosine_vs_first compares with the first mode on the
    same denoiser and inputs."""
    parsed = [parse_mode(m) for m in modes]
    denoisers = denoiser_names(cfg.family)  # raises, listing the families, on an unknown one
    if not torch.cuda.is_available():
        raise ValueError("bench needs a CUDA device")
    dtype = torch.bfloat16
    rank = int(os.environ.get("RANK", "0"))
    if cfg.parallel != "sp1":
        if bad := [m.name for m in parsed if m.backend != "engine"]:
            raise ValueError(f"parallel bench runs the engine only; {bad[0]!r} is not an engine mode")
        cfg = replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        torch.cuda.set_device(cfg.device)
        log = log if rank == 0 else (lambda *_: None)
    shape = bench_shape(height=cfg.height, width=cfg.width, text_tokens=cfg.text_tokens, batch=cfg.batch, seed=cfg.seed)
    rows = []
    for denoiser in denoisers:
        tcfg = transformer_config(cfg.family, cfg.size, denoiser)
        inputs = bench_inputs(cfg.family, denoiser, tcfg, shape, dtype, cfg.device)
        reference = None
        for mode in parsed:
            t0 = time.perf_counter()
            if mode.backend == "diffusers":
                model, fwd = build_diffusers(cfg, denoiser, tcfg, dtype)
                if "compile" in mode.options:
                    fwd = torch.compile(fwd)
            else:
                spec = OptimizeSpec(compile_blocks="compile" in mode.options,
                                    attention="sdpa-cudnn" if "cudnn" in mode.options else "sdpa")
                model, fwd = build_engine(cfg, denoiser, tcfg, dtype, mode.quant, spec)
            build_s = time.perf_counter() - t0
            times, out = time_forward(lambda: fwd(inputs), cfg)
            if reference is None:
                reference = out.float()
            quant = (quant_columns(model) if mode.backend == "engine"
                     else {"n_quantized_linears": 0, "n_fp8_scaled_mm_linears": 0})
            row = {"mode": mode.name, "denoiser": denoiser, "parallel": cfg.parallel,
                   "median_ms": statistics.median(times), "min_ms": min(times), "build_s": round(build_s, 1),
                   "weight_gb": weight_bytes(model) / 1e9, **quant,
                   "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
                   "cosine_vs_first": float(M.cosine(out.float(), reference).min()),
                   "height": cfg.height, "width": cfg.width, "text_tokens": cfg.text_tokens,
                   "device_name": torch.cuda.get_device_name(), **versions()}
            log(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}))
            rows.append(row)
            del model, fwd, out
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    frame = pd.DataFrame(rows)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out_dir / f"bench-{cfg.parallel}.csv", index=False)
    return frame

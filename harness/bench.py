"""Denoiser step time at full size, engine next to diffusers in one process, on synthesized weights, for every
denoiser of the family (inputs from the family's own bench_inputs hook).

`parity bench --family <family> --height 1024 --width 1024 --modes diffusers-bf16 engine-bf16 ...` materializes the
full-size transformer directly on the GPU (no 24 GB written to disk), times one forward per mode with CUDA
events after warm-up, and checks each mode's output against the diffusers bf16 output on the same inputs.
`--size tiny --device cpu` runs the same modes on the tiny zoo on CPU: a check that they parse, build and agree
(CUDA-only switches fail there as their own rows), not a timing.

Modes: `diffusers-bf16`, `diffusers-bf16+compile` (the whole forward), `diffusers-bf16+regional`
(`compile_repeated_blocks()`), and `engine-<bf16|quant mode>[+option...]`, where an option is a boolean switch of
engine.optimize.OptimizeSpec by name (+cuda_graphs, +fp8_fast_accum, +fp8_wo_output_scale, ...) or one of the
short names of ENGINE_ALIASES (+compile, +cudnn, +autotune)."""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from dataclasses import dataclass, fields, replace
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
    denoisers: tuple[str, ...] = ()  # the family's denoisers to time; empty: all (a two-expert family times both)


def time_forward(fn, cfg: BenchConfig) -> tuple[list[float], torch.Tensor]:
    """Milliseconds of each of cfg.iters calls after cfg.warmup: CUDA events on a GPU, wall clock elsewhere (a CPU run
    checks that modes build and agree; its times mean little)."""
    cuda = torch.device(cfg.device).type == "cuda"
    with torch.no_grad():
        for _ in range(cfg.warmup):
            out = fn()
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(cfg.iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1e3)
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
    optimize: OptimizeSpec | None = None  # engine modes: the switches its +options turn on
    compile: str | None = None  # diffusers modes: None, "whole" (torch.compile of the forward) or "regional"


# Engine mode options: every boolean switch of OptimizeSpec by its field name (+cuda_graphs, +fp8_fast_accum, ...),
# plus these short names for the switches benches used before the field names were options.
ENGINE_ALIASES: dict[str, dict] = {
    "compile": {"compile_blocks": True},
    "cudnn": {"attention": "sdpa-cudnn"},
    "autotune": {"compile_mode": "max-autotune-no-cudagraphs"},  # lets inductor fuse weight dequant into its GEMMs
}
# diffusers-bf16+compile compiles the whole forward; +regional is what a user gets from one line,
# `transformer.compile_repeated_blocks()` (each repeated block compiled on its own, as the engine's +compile).
DIFFUSERS_OPTIONS = {"compile": "whole", "regional": "regional"}


def engine_options() -> list[str]:
    flags = [f.name for f in fields(OptimizeSpec) if f.type in (bool, "bool")]
    return sorted(ENGINE_ALIASES) + flags


def parse_mode(mode: str) -> Mode:
    """`diffusers-bf16[+compile|+regional]` or `engine-<bf16|quant mode>[+option...]` (options: engine_options())."""
    base, *options = mode.split("+")
    backend, _, quant = base.partition("-")
    if backend not in ("engine", "diffusers") or not quant:
        raise ValueError(f"unknown bench mode {mode!r}; valid: diffusers-bf16[+compile|+regional], "
                         f"engine-<bf16|quant mode>[+option...]")
    quant = {"bf16": "none"}.get(quant, quant)
    if backend == "diffusers":
        if quant != "none" or len(options) > 1 or (options and options[0] not in DIFFUSERS_OPTIONS):
            raise ValueError(f"unknown diffusers bench mode {mode!r}; valid: diffusers-bf16, "
                             + ", ".join(f"diffusers-bf16+{o}" for o in DIFFUSERS_OPTIONS))
        return Mode(mode, backend, quant, compile=DIFFUSERS_OPTIONS[options[0]] if options else None)
    valid = engine_options()
    if bad := sorted(set(options) - set(valid)):
        raise ValueError(f"unknown bench option(s) {bad} in {mode!r}; valid: {', '.join('+' + v for v in valid)}")
    switches: dict = {}
    for option in options:
        switches.update(ENGINE_ALIASES.get(option, {option: True}))
    return Mode(mode, backend, quant, optimize=OptimizeSpec(**switches))


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def build_mode(cfg: BenchConfig, mode: Mode, denoiser: str, tcfg: dict, dtype):
    if mode.backend == "diffusers":
        model, fwd = build_diffusers(cfg, denoiser, tcfg, dtype)
        if mode.compile == "whole":
            fwd = torch.compile(fwd)
        elif mode.compile == "regional":
            model.compile_repeated_blocks()
        return model, fwd
    return build_engine(cfg, denoiser, tcfg, dtype, mode.quant, mode.optimize)


def run_bench(cfg: BenchConfig, modes: list[str], out_dir: Path, log=print) -> pd.DataFrame:
    """Every mode on every denoiser of the family, one row each; cosine_vs_first compares with the first mode that
    ran on the same denoiser and inputs (`baseline` names it). A mode that fails to build or run becomes a row with
    its `error`; the others still run."""
    parsed = [parse_mode(m) for m in modes]
    denoisers = denoiser_names(cfg.family)  # raises, listing the families, on an unknown one
    if bad := [d for d in cfg.denoisers if d not in denoisers]:
        raise ValueError(f"bench --denoiser {bad[0]!r} is not a denoiser of {cfg.family}; valid: {list(denoisers)}")
    denoisers = tuple(cfg.denoisers) or denoisers
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"bench --device {cfg.device}: no CUDA device here (valid: cuda, cpu)")
    dtype = torch.bfloat16
    rank = int(os.environ.get("RANK", "0"))
    if cfg.parallel != "sp1":
        if bad := [m.name for m in parsed if m.backend != "engine"]:
            raise ValueError(f"parallel bench runs the engine only; {bad[0]!r} is not an engine mode")
        if not cuda:
            raise ValueError("parallel bench runs on CUDA only (--device cuda)")
        cfg = replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        torch.cuda.set_device(cfg.device)
        log = log if rank == 0 else (lambda *_: None)
    shape = bench_shape(height=cfg.height, width=cfg.width, text_tokens=cfg.text_tokens, batch=cfg.batch, seed=cfg.seed)
    rows = []
    for denoiser in denoisers:
        tcfg = transformer_config(cfg.family, cfg.size, denoiser)
        inputs = bench_inputs(cfg.family, denoiser, tcfg, shape, dtype, cfg.device)
        reference, baseline = None, None
        for mode in parsed:
            row = {"mode": mode.name, "denoiser": denoiser, "parallel": cfg.parallel, "size": cfg.size,
                   "height": cfg.height, "width": cfg.width, "text_tokens": cfg.text_tokens,
                   "device_name": torch.cuda.get_device_name(cfg.device) if cuda else "cpu", **versions()}
            model = fwd = out = None
            try:
                t0 = time.perf_counter()
                model, fwd = build_mode(cfg, mode, denoiser, tcfg, dtype)
                build_s = time.perf_counter() - t0
                times, out = time_forward(lambda: fwd(inputs), cfg)
                if reference is None:
                    reference, baseline = out.float(), mode.name
                quant = (quant_columns(model) if mode.backend == "engine"
                         else {"n_quantized_linears": 0, "n_fp8_scaled_mm_linears": 0})
                row.update({"median_ms": statistics.median(times), "min_ms": min(times),
                            "build_s": round(build_s, 1), "weight_gb": weight_bytes(model) / 1e9, **quant,
                            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
                            "cosine_vs_first": float(M.cosine(out.float(), reference).min()), "baseline": baseline,
                            "error": ""})
            except Exception as e:  # one mode's failure is its row; the other modes still run
                row.update({"median_ms": float("nan"), "cosine_vs_first": float("nan"), "baseline": baseline,
                            "error": f"{type(e).__name__}: {e}"})
            log(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}))
            rows.append(row)
            if rank == 0:  # after every mode: a run killed by a time limit keeps the rows it finished
                out_dir.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_csv(out_dir / f"bench-{cfg.parallel}.csv", index=False)
            del model, fwd, out
            # Every mode compiles from a clean slate: blocks of one class share dynamo's per-code cache across model
            # instances, and a mode past its recompile limit would silently run eager blocks. Inductor's on-disk
            # cache still spares recompiling identical graphs.
            torch._dynamo.reset()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return pd.DataFrame(rows)

"""Denoiser step time at full size, engine next to diffusers and the peers a user would pick instead, in one process,
on synthesized weights, for every denoiser of the family (inputs from the family's own bench_inputs hook); and the
whole pipeline end to end (harness/bench_e2e.py).

`parity bench --family <family> --height 1024 --width 1024 --modes diffusers-bf16 engine-bf16 ...` materializes the
full-size transformer directly on the GPU (no 24 GB written to disk), times one forward per mode with CUDA
events after warm-up, and checks each mode's output against the first mode's output on the same inputs (make that
diffusers-bf16: every cosine is then vs diffusers bf16).
`--size tiny --device cpu` runs the same modes on the tiny zoo on CPU: a check that they parse, build and agree
(CUDA-only switches fail there as their own rows), not a timing.

Modes and their options: harness/bench_modes.py."""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from engine.api import OptimizeSpec, bench_inputs, bench_shape, build_denoiser, denoiser_names
from harness import metrics as M
from harness.bench_e2e import pipeline_rows
from harness.bench_modes import (QUANT_COLUMNS, BenchConfig, Mode, apply_diffusers_options, own_inductor_config,
                                 parse_mode, quant_columns, release, take_peak, torchao_config, torchao_linears,
                                 weight_bytes)
from harness.provenance import versions
from harness.zoo import synthesize_transformer_state_dict, transformer_config


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


def build_mode(cfg: BenchConfig, mode: Mode, denoiser: str, tcfg: dict, dtype):
    if mode.backend == "diffusers":
        if mode.torchao:
            torchao_config(mode.torchao)  # a missing torchao fails here, before 24 GB are synthesized
        model, fwd = build_diffusers(cfg, denoiser, tcfg, dtype)
        apply_diffusers_options(model, mode)
        if mode.compile == "whole":
            fwd = torch.compile(fwd)
        return model, fwd
    return build_engine(cfg, denoiser, tcfg, dtype, mode.quant, mode.optimize)


def run_bench(cfg: BenchConfig, modes: list[str], out_dir: Path, log=print) -> pd.DataFrame:
    """Every denoiser mode on every denoiser of the family, one row each; cosine_vs_first compares with the first
    mode that ran on the same denoiser and inputs (`baseline` names it). Pipeline modes follow, one row each with
    denoiser "pipeline", compared with the first pipeline mode (harness/bench_e2e.py). A mode that fails to build or
    run becomes a row with its `error`; the others still run."""
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
        if bad := [m.name for m in parsed if m.backend != "engine" or m.pipeline]:
            raise ValueError(f"parallel bench runs the engine's denoiser only; {bad[0]!r} is not an engine "
                             "denoiser mode")
        if not cuda:
            raise ValueError("parallel bench runs on CUDA only (--device cuda)")
        cfg = replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        torch.cuda.set_device(cfg.device)
        log = log if rank == 0 else (lambda *_: None)
    rows = []

    def record(row: dict) -> None:
        log(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}))
        rows.append(row)
        if rank == 0:  # after every mode: a run killed by a time limit keeps the rows it finished
            out_dir.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(out_dir / f"bench-{cfg.parallel}.csv", index=False)

    def base_row(mode: Mode, denoiser: str) -> dict:
        return {"mode": mode.name, "denoiser": denoiser, "parallel": cfg.parallel, "size": cfg.size,
                "height": cfg.height, "width": cfg.width, "text_tokens": cfg.text_tokens,
                "device_name": torch.cuda.get_device_name(cfg.device) if cuda else "cpu", **versions()}

    shape = bench_shape(height=cfg.height, width=cfg.width, text_tokens=cfg.text_tokens, batch=cfg.batch, seed=cfg.seed)
    for denoiser in denoisers if any(not m.pipeline for m in parsed) else ():
        tcfg = transformer_config(cfg.family, cfg.size, denoiser)
        inputs = bench_inputs(cfg.family, denoiser, tcfg, shape, dtype, cfg.device)
        reference, baseline = None, None
        for mode in (m for m in parsed if not m.pipeline):
            row = base_row(mode, denoiser)
            model = fwd = out = None
            try:
                with own_inductor_config():
                    t0 = time.perf_counter()
                    model, fwd = build_mode(cfg, mode, denoiser, tcfg, dtype)
                    build_s = time.perf_counter() - t0
                    build_peak = take_peak(cuda)
                    times, out = time_forward(lambda: fwd(inputs), cfg)
                if reference is None:
                    reference, baseline = out.float(), mode.name
                quant = (quant_columns(model) if mode.backend == "engine"
                         else {**dict.fromkeys(QUANT_COLUMNS, 0), "n_quantized_linears": torchao_linears(model)})
                row.update({"median_ms": statistics.median(times), "min_ms": min(times),
                            "build_s": round(build_s, 1), "weight_gb": weight_bytes(model) / 1e9, **quant,
                            "peak_mem_gb": take_peak(cuda), "build_peak_gb": build_peak,
                            "cosine_vs_first": float(M.cosine(out.float(), reference).min()), "baseline": baseline,
                            "error": ""})
            except Exception as e:  # one mode's failure is its row; the other modes still run
                row.update({"median_ms": float("nan"), "cosine_vs_first": float("nan"), "baseline": baseline,
                            "error": f"{type(e).__name__}: {e}"})
            record(row)
            del model, fwd, out
            release(cuda)
    if pipelines := [m for m in parsed if m.pipeline]:
        for row in pipeline_rows(cfg, pipelines, base_row):
            record(row)
    return pd.DataFrame(rows)


def parse_ratios(pairs: list[str], modes: list[str]) -> list[tuple[str, str]]:
    """`MODE:PEER` pairs, both modes of this run (checked before anything is built)."""
    out = []
    for pair in pairs:
        mode, sep, peer = pair.partition(":")
        if not sep or not mode or not peer:
            raise ValueError(f"bench --ratio {pair!r}: expected MODE:PEER, e.g. engine-bf16+compile:diffusers-bf16")
        if missing := [m for m in (mode, peer) if m not in modes]:
            raise ValueError(f"bench --ratio {pair!r}: {missing[0]!r} is not one of this run's --modes {modes}")
        out.append((mode, peer))
    return out


def ratio_lines(frame: pd.DataFrame, pairs: list[tuple[str, str]]) -> list[str]:
    """One line per pair and denoiser: the time ratio mode/peer from this run, and both cosines vs the baseline."""
    lines = []
    for mode, peer in pairs:
        for denoiser, rows in frame.groupby("denoiser", sort=False):
            a, b = (rows[rows["mode"] == m] for m in (mode, peer))
            if a.empty or b.empty:
                continue  # not both on this denoiser (a pipeline mode against a denoiser mode)
            a, b = a.iloc[0], b.iloc[0]
            lines.append(f"{denoiser}: {mode} / {peer} = {a['median_ms'] / b['median_ms']:.3f}x time "
                         f"({a['median_ms']:.1f} / {b['median_ms']:.1f} ms); cosine vs {a['baseline']}: "
                         f"{a['cosine_vs_first']:.5f} / {b['cosine_vs_first']:.5f}")
    return lines

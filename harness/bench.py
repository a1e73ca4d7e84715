"""Denoiser step time at full size, engine next to diffusers in one process, on synthesized weights.

`parity bench --family flux1 --height 1024 --width 1024 --modes diffusers-bf16 engine-bf16 ...` materializes the
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

from harness import metrics as M
from harness.provenance import versions
from harness.zoo import synthesize_transformer_state_dict, transformer_config


@dataclass(frozen=True)
class BenchConfig:
    family: str = "flux1"
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


def flux1_inputs(cfg: BenchConfig, tcfg: dict, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator("cpu").manual_seed(cfg.seed)
    h, w = cfg.height // 16, cfg.width // 16  # VAE /8, then 2x2 packing
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    dev = cfg.device
    return dict(
        hidden_states=torch.randn(cfg.batch, h * w, tcfg["in_channels"], generator=g).to(dev, dtype),
        encoder_hidden_states=torch.randn(cfg.batch, cfg.text_tokens, tcfg["joint_attention_dim"], generator=g).to(dev, dtype),
        pooled_projections=torch.randn(cfg.batch, tcfg["pooled_projection_dim"], generator=g).to(dev, dtype),
        timestep=torch.full([cfg.batch], 0.75).to(dev, dtype), guidance=torch.full([cfg.batch], 3.5, device=dev),
        img_ids=ids.reshape(-1, 3).to(dev, dtype), txt_ids=torch.zeros(cfg.text_tokens, 3).to(dev, dtype),
    )


def qwen_image_inputs(cfg: BenchConfig, tcfg: dict, dtype) -> dict:
    g = torch.Generator("cpu").manual_seed(cfg.seed)
    h, w = cfg.height // 16, cfg.width // 16  # VAE /8, then 2x2 packing
    dev = cfg.device
    return dict(
        hidden_states=torch.randn(cfg.batch, h * w, tcfg["in_channels"], generator=g).to(dev, dtype),
        encoder_hidden_states=torch.randn(cfg.batch, cfg.text_tokens, tcfg["joint_attention_dim"], generator=g).to(dev, dtype),
        timestep=torch.full([cfg.batch], 0.75).to(dev, dtype), img_shapes=[[(1, h, w)]] * cfg.batch,
    )


def qwen_rope_off_meta(model) -> None:
    """diffusers' QwenEmbedRope keeps its tables as plain attributes, not buffers: built on the meta device they hold
    no data and load_state_dict cannot fill them. Rebuild that one module for real (it has no weights)."""
    rope = model.pos_embed
    model.pos_embed = type(rope)(theta=rope.theta, axes_dim=rope.axes_dim, scale_rope=rope.scale_rope)


# Per-family pieces of the bench: inputs, the diffusers transformer class, the engine model module and its call on
# the diffusers-named inputs, a fix-up of the meta-built diffusers model. (Family registration; moves onto the
# family seam of issue 9.)
FAMILIES = {
    "flux1": (flux1_inputs, "FluxTransformer2DModel", "engine.models.flux1", "Flux1Config", "Flux1Transformer",
              lambda m, x: m(x["hidden_states"], x["encoder_hidden_states"], x["timestep"], x["pooled_projections"],
                             x["img_ids"], x["txt_ids"], x["guidance"]), None),
    "qwen-image": (qwen_image_inputs, "QwenImageTransformer2DModel", "engine.models.qwen_image", "QwenImageConfig",
                   "QwenImageTransformer",
                   lambda m, x: m(x["hidden_states"], x["encoder_hidden_states"], x["timestep"], x["img_shapes"][0]),
                   qwen_rope_off_meta),
}


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


def build_diffusers(cfg: BenchConfig, tcfg: dict, dtype):
    import diffusers

    cls = getattr(diffusers, FAMILIES[cfg.family][1])
    with torch.device("meta"):
        model = cls(**{k: v for k, v in tcfg.items() if not k.startswith("_")})
    sd = synthesize_transformer_state_dict(cfg.family, cfg.size, seed=cfg.seed, device=cfg.device, dtype=dtype)
    model.load_state_dict(sd, assign=True, strict=True)
    if FAMILIES[cfg.family][6] is not None:
        FAMILIES[cfg.family][6](model)
    model = model.eval().requires_grad_(False)
    return model, lambda x: model(**x, return_dict=False)[0]


def build_engine(cfg: BenchConfig, tcfg: dict, dtype, quant: str):
    import importlib

    from engine.loading import load_model
    from engine.quant.api import QuantSpec, quantize_model

    _, _, module, config_cls, model_cls, call, _ = FAMILIES[cfg.family]
    module = importlib.import_module(module)
    fcfg = getattr(module, config_cls).from_diffusers(tcfg)
    sd = synthesize_transformer_state_dict(cfg.family, cfg.size, seed=cfg.seed, device=cfg.device, dtype=dtype)
    key_map = module.diffusers_key_map(fcfg)
    model = load_model(lambda: getattr(module, model_cls)(fcfg), key_map, sd, dtype, cfg.device)
    del sd
    model = quantize_model(model, QuantSpec(quant), key_map)
    return model, lambda x: call(model, x)


def parallelize(model, name: str, device: str):
    """Wrap an engine transformer for sequence parallelism over the torchrun world (NCCL on CUDA)."""
    from engine.parallel.config import parse_parallel
    from engine.parallel.mesh import get_mesh, init_distributed
    from engine.parallel.transformer import WRAPPERS

    spec = parse_parallel(name)
    init_distributed(spec, torch.device(device))
    return WRAPPERS["flux1"](model, get_mesh(spec))


def quant_columns(model) -> dict:
    """How many linears are quantized, and how many fp8 ones run through torch._scaled_mm (vs the emulated twin)."""
    if not hasattr(model, "img_in"):  # the diffusers model
        return {"n_quantized_linears": 0, "n_fp8_scaled_mm_linears": 0}
    from engine.quant.api import quant_summary

    summary = quant_summary(getattr(model, "inner", model))
    return {k: summary[k] for k in ("n_quantized_linears", "n_fp8_scaled_mm_linears")}


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run_bench(cfg: BenchConfig, modes: list[str], out_dir: Path, log=print) -> pd.DataFrame:
    if cfg.family not in FAMILIES:
        raise ValueError(f"bench has no family {cfg.family!r}; valid: {sorted(FAMILIES)}")
    if cfg.parallel != "sp1" and cfg.family != "flux1":
        raise ValueError(f"parallel bench runs FLUX.1 only so far; {cfg.family!r} has no sequence parallelism")
    if not torch.cuda.is_available():
        raise ValueError("bench needs a CUDA device")
    dtype = torch.bfloat16
    rank = int(os.environ.get("RANK", "0"))
    if cfg.parallel != "sp1":
        cfg = replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        torch.cuda.set_device(cfg.device)
        log = log if rank == 0 else (lambda *_: None)
    tcfg = transformer_config(cfg.family, cfg.size)
    inputs = FAMILIES[cfg.family][0](cfg, tcfg, dtype)
    reference, rows = None, []
    for mode in modes:
        base, *options = mode.split("+")
        backend, _, quant = base.partition("-")
        quant = {"bf16": "none"}.get(quant, quant)
        if bad := set(options) - {"compile", "cudnn"}:
            raise ValueError(f"unknown bench option(s) {sorted(bad)} in {mode!r}; valid: +compile, +cudnn")
        if cfg.parallel != "sp1" and backend != "engine":
            raise ValueError(f"parallel bench runs the engine only; {mode!r} is not an engine mode")
        t0 = time.perf_counter()
        if backend == "diffusers":
            model, fwd = build_diffusers(cfg, tcfg, dtype)
        elif backend == "engine":
            model, fwd = build_engine(cfg, tcfg, dtype, quant)
        else:
            raise ValueError(f"unknown bench mode {mode!r}; valid: diffusers-bf16, engine-<bf16|quant mode>")
        if backend == "engine":
            from engine.optimize import OptimizeSpec, optimize

            optimize(model, OptimizeSpec(compile_blocks="compile" in options,
                                         attention="sdpa-cudnn" if "cudnn" in options else "sdpa"))
            if cfg.parallel != "sp1":
                wrapped = parallelize(model, cfg.parallel, cfg.device)
                fwd = lambda x: wrapped(x["hidden_states"], x["encoder_hidden_states"], x["timestep"],  # noqa: E731
                                        x["pooled_projections"], x["img_ids"], x["txt_ids"], x["guidance"])
        elif "compile" in options:
            fwd = torch.compile(fwd)
        build_s = time.perf_counter() - t0
        times, out = time_forward(lambda: fwd(inputs), cfg)
        if reference is None:
            reference = out.float()
        row = {"mode": mode, "parallel": cfg.parallel, "median_ms": statistics.median(times), "min_ms": min(times), "build_s": round(build_s, 1),
               "weight_gb": weight_bytes(model) / 1e9, **quant_columns(model), "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
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

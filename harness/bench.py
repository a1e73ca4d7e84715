"""Denoiser step time at full size, engine next to diffusers and the peers a user would pick instead, in one process,
on synthesized weights, for every denoiser of the family (inputs from the family's own bench_inputs hook); and the
whole pipeline end to end (harness/bench_e2e.py).

`parity bench --family <family> --height 1024 --width 1024 --modes diffusers-bf16 engine-bf16 ...` materializes the
full-size transformer directly on the GPU (no 24 GB written to disk), times one forward per mode with CUDA
events after warm-up, and checks each mode's output against the first mode's output on the same inputs (make that
diffusers-bf16: every cosine is then vs diffusers bf16).
`--size tiny --device cpu` runs the same modes on the tiny zoo on CPU: a check that they parse, build and agree
(CUDA-only switches fail there as their own rows), not a timing.

Modes:
- `diffusers-bf16[+torchao-fp8-rowwise|+torchao-fp8-wo][+compile|+regional]`: diffusers' own denoiser class.
  `+compile` compiles the whole forward; `+regional` is `compile_repeated_blocks()`, the one line a user adds.
  `+torchao-fp8-rowwise` is torchao's `quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(
  granularity=PerRow()))` (float8 dynamic activations and float8 weights, per-row scales, torchao's default fast
  accumulation), `+torchao-fp8-wo` its `Float8WeightOnlyConfig()` (per-row float8 weights, bf16 matmul); both on
  every linear of the transformer with torchao's defaults, as its and diffusers' docs apply it, before any
  compile; `-blocks` after either (`+torchao-fp8-rowwise-blocks`) takes only the linears inside the repeated
  blocks, the layers the engine's quant modes take, for a cosine comparison on the same layers. What a user would run is the torchao mode with `+regional`: eager torchao is slower than bf16. torchao is
  optional: without it such a mode is an error row naming the package; its rowwise kernels need CUDA sm89+, so on
  CPU that mode is an error row saying so, while weight-only runs.
- `engine-<bf16|quant mode>[+option...]`, where an option is a boolean switch of engine.optimize.OptimizeSpec by
  name (+cuda_graphs, +fp8_fast_accum, +fp8_wo_output_scale, ...) or one of the short names of ENGINE_ALIASES
  (+compile, +cudnn, +autotune).
- `diffusers-pipeline-bf16[...]` and `engine-pipeline-<bf16|quant mode>[+option...]`: the same options on the
  whole pipeline (text encoders, --steps denoising steps, VAE decode), timed wall-clock (harness/bench_e2e.py).
Every mode runs with torch inductor's config as the process started: torchao's quantize_ changes it globally
(coordinate-descent tuning), and that must not leak into the modes after it."""
from __future__ import annotations

import contextlib
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
    steps: int = 28  # pipeline modes: denoising steps of one generation
    pipeline_warmup: int = 1  # pipeline modes: untimed generations first (compiles, graph captures, autotuning)
    pipeline_iters: int = 2  # pipeline modes: timed generations

    def __post_init__(self) -> None:
        for name in ("iters", "steps", "pipeline_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "pipeline_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"bench {name} must be >= 0, got {getattr(self, name)}")


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


QUANT_COLUMNS = ("n_quantized_linears", "n_fp8_scaled_mm_linears")


def quant_columns(model) -> dict:
    """How many linears are quantized, and how many fp8 ones run through torch._scaled_mm (vs the emulated twin)."""
    summary = quant_summary(model)
    return {k: summary[k] for k in QUANT_COLUMNS}


@dataclass(frozen=True)
class Mode:
    name: str
    backend: str  # "engine" | "diffusers"
    quant: str
    optimize: OptimizeSpec | None = None  # engine modes: the switches its +options turn on
    compile: str | None = None  # diffusers modes: None, "whole" (torch.compile of the forward) or "regional"
    torchao: str | None = None  # diffusers modes: a TORCHAO option, applied before any compile
    pipeline: bool = False  # the whole pipeline end to end (harness/bench_e2e.py), not one denoiser forward


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
# torchao's float8 peers: torchao.quantization config class and its keyword arguments, by mode option
# `+torchao-<name>`; `+torchao-<name>-blocks` quantizes only the linears inside the repeated blocks (the layers the
# engine's quant modes take by default), the plain option every linear of the transformer (what a user runs).
TORCHAO_CONFIGS = {
    "fp8-rowwise": ("Float8DynamicActivationFloat8WeightConfig", {"granularity": "PerRow"}),
    "fp8-wo": ("Float8WeightOnlyConfig", {}),
}
BLOCKS = "-blocks"
TORCHAO = {f"torchao-{name}{scope}": name for name in TORCHAO_CONFIGS for scope in ("", BLOCKS)}
DIFFUSERS_GRAMMAR = ("diffusers[-pipeline]-bf16[+torchao-<" + "|".join(TORCHAO_CONFIGS) + f">[{BLOCKS}]]["
                     + "|".join("+" + o for o in DIFFUSERS_OPTIONS) + "]")
PIPELINE = "pipeline-"  # after the backend: the mode times the whole pipeline


def engine_options() -> list[str]:
    flags = [f.name for f in fields(OptimizeSpec) if f.type in (bool, "bool")]
    return sorted(ENGINE_ALIASES) + flags


def parse_mode(mode: str) -> Mode:
    """`diffusers[-pipeline]-bf16[+torchao-<config>[-blocks]][+compile|+regional]` or
    `engine[-pipeline]-<bf16|quant mode>[+option...]` (options: engine_options())."""
    base, *options = mode.split("+")
    backend, _, quant = base.partition("-")
    pipeline = quant.startswith(PIPELINE)
    quant = quant.removeprefix(PIPELINE)
    if backend not in ("engine", "diffusers") or not quant:
        raise ValueError(f"unknown bench mode {mode!r}; valid: {DIFFUSERS_GRAMMAR}, "
                         f"engine[-pipeline]-<bf16|quant mode>[+option...]")
    quant = {"bf16": "none"}.get(quant, quant)
    if backend == "diffusers":
        compiles = [o for o in options if o in DIFFUSERS_OPTIONS]
        torchao = [o for o in options if o in TORCHAO]
        if quant != "none" or len(compiles) > 1 or len(torchao) > 1 or len(compiles) + len(torchao) < len(options):
            raise ValueError(f"unknown diffusers bench mode {mode!r}; valid: {DIFFUSERS_GRAMMAR} (at most one of "
                             "each bracket)")
        if pipeline and "compile" in compiles:
            raise ValueError(f"bench mode {mode!r}: a pipeline mode compiles the denoiser's blocks only "
                             "(+regional); whole-forward +compile is a denoiser mode")
        return Mode(mode, backend, quant, compile=DIFFUSERS_OPTIONS[compiles[0]] if compiles else None,
                    torchao=torchao[0] if torchao else None, pipeline=pipeline)
    valid = engine_options()
    if bad := sorted(set(options) - set(valid)):
        raise ValueError(f"unknown bench option(s) {bad} in {mode!r}; valid: {', '.join('+' + v for v in valid)}")
    switches: dict = {}
    for option in options:
        switches.update(ENGINE_ALIASES.get(option, {option: True}))
    return Mode(mode, backend, quant, optimize=OptimizeSpec(**switches), pipeline=pipeline)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a wrapper subclass (torchao's Float8Tensor) by the tensors inside it, not by the
    high-precision dtype it reports."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model) -> int:
    return sum(tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))


def torchao_linears(model) -> int:
    """Linears of a diffusers denoiser whose weight torchao replaced by a quantized tensor subclass: what a torchao
    mode did, read back from the model."""
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "__tensor_flatten__"))


def torchao_config(option: str):
    """The torchao config object of a TORCHAO option; a missing torchao names the package (an error row)."""
    name, kwargs = TORCHAO_CONFIGS[TORCHAO[option]]
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise ModuleNotFoundError(f"bench option +{option} needs the torchao package, which is not installed "
                                  f"here ({e})") from e
    return getattr(tq, name)(**{k: getattr(tq, v)() for k, v in kwargs.items()})


def apply_diffusers_options(model, mode: Mode) -> None:
    """A diffusers-mode's torchao quantization, then its regional compile, in place on a diffusers denoiser (a
    torchao mode quantizes first: compile then traces the float8 tensors, as a user's script runs them)."""
    if mode.torchao:
        config = torchao_config(mode.torchao)  # first: a missing torchao is named
        from torchao.quantization import quantize_

        scope = {}
        if mode.torchao.endswith(BLOCKS):  # the linears inside the model's repeated blocks (compile_repeated_blocks')
            blocks = [m for m in model.modules() if type(m).__name__ in (model._repeated_blocks or ())]
            inside = {id(m) for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)}
            if not inside:
                raise ValueError(f"+{mode.torchao}: {type(model).__name__} declares no repeated blocks with linears")
            scope = {"filter_fn": lambda m, fqn: id(m) in inside}
        quantize_(model, config, **scope)
    if mode.compile == "regional":
        model.compile_repeated_blocks()


@contextlib.contextmanager
def own_inductor_config():
    """Restore torch inductor's config on exit: torchao's quantize_ sets inductor flags process-wide."""
    import torch._inductor.config as inductor

    saved = inductor.get_config_copy()
    try:
        yield
    finally:
        inductor.load_config(saved)


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
                    times, out = time_forward(lambda: fwd(inputs), cfg)
                if reference is None:
                    reference, baseline = out.float(), mode.name
                quant = (quant_columns(model) if mode.backend == "engine"
                         else {**dict.fromkeys(QUANT_COLUMNS, 0), "n_quantized_linears": torchao_linears(model)})
                row.update({"median_ms": statistics.median(times), "min_ms": min(times),
                            "build_s": round(build_s, 1), "weight_gb": weight_bytes(model) / 1e9, **quant,
                            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
                            "cosine_vs_first": float(M.cosine(out.float(), reference).min()), "baseline": baseline,
                            "error": ""})
            except Exception as e:  # one mode's failure is its row; the other modes still run
                row.update({"median_ms": float("nan"), "cosine_vs_first": float("nan"), "baseline": baseline,
                            "error": f"{type(e).__name__}: {e}"})
            record(row)
            del model, fwd, out
            release(cuda)
    if pipelines := [m for m in parsed if m.pipeline]:
        from harness.bench_e2e import pipeline_rows

        for row in pipeline_rows(cfg, pipelines, base_row, release):
            record(row)
    return pd.DataFrame(rows)


def release(cuda: bool) -> None:
    """Between modes: every mode compiles from a clean slate (blocks of one class share dynamo's per-code cache
    across model instances, and a mode past its recompile limit would silently run eager blocks; inductor's on-disk
    cache still spares recompiling identical graphs), and starts with its memory freed and the peak reset."""
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


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

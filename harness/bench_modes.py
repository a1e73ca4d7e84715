"""`parity bench`'s modes and what the bench and its pipeline modes share: the run's config, the mode grammar, how a
diffusers denoiser gets a peer's quantization and compile, and how weights and quantized linears are read back.

Modes:
- `diffusers-bf16[+torchao-<fp8-rowwise|fp8-wo>[-blocks]][+compile|+regional]`: diffusers' own denoiser class.
  `+compile` compiles the whole forward; `+regional` is `compile_repeated_blocks()`, the one line a user adds.
  `+torchao-fp8-rowwise` is torchao's `quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(
  granularity=PerRow()))` (float8 dynamic activations and float8 weights, per-row scales, torchao's default fast
  accumulation), `+torchao-fp8-wo` its `Float8WeightOnlyConfig()` (per-row float8 weights, bf16 matmul); both on
  every linear of the transformer with torchao's defaults, as its and diffusers' docs apply it, before any compile.
  `-blocks` (`+torchao-fp8-rowwise-blocks`) takes only the linears inside the repeated blocks, the layers the
  engine's quant modes take, for a cosine comparison on the same layers. What a user would run is a torchao mode
  with `+regional`: eager torchao is slower than bf16. torchao is optional: without it such a mode is an error row
  naming the package; its rowwise kernels need CUDA sm89+, so on CPU that mode is an error row saying so, while
  weight-only runs.
- `engine-<bf16|quant mode>[+option...]`, where an option is a boolean switch of engine.optimize.OptimizeSpec by
  name (+cuda_graphs, +fp8_fast_accum, +fp8_wo_output_scale, ...) or one of the short names of ENGINE_ALIASES
  (+compile, +cudnn, +autotune).
- `diffusers-pipeline-bf16[...]` and `engine-pipeline-<bf16|quant mode>[+option...]`: the same options on the
  whole pipeline (text encoders, --steps denoising steps, VAE decode), timed wall-clock (harness/bench_e2e.py);
  a pipeline mode offers `+regional`, not the whole-forward `+compile`.
Every mode runs with torch inductor's config as the process started: torchao's quantize_ changes it globally
(coordinate-descent tuning), and that must not leak into the modes after it."""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, fields

import torch

from engine.api import OptimizeSpec, quant_summary


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


def take_peak(cuda: bool) -> float:
    """GB allocated at most since the last reset, then reset: called after a mode's build and after its timed runs,
    so that `build_peak_gb` (weights as loaded, with the loader's transient copies: fused QKV concatenated while the
    unfused tensors are still held) and `peak_mem_gb` (weights plus the forward's activations, what serving costs)
    are told apart. NaN off CUDA."""
    if not cuda:
        return float("nan")
    peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    return peak


def release(cuda: bool) -> None:
    """Between modes: every mode compiles from a clean slate (blocks of one class share dynamo's per-code cache
    across model instances, and a mode past its recompile limit would silently run eager blocks; inductor's on-disk
    cache still spares recompiling identical graphs), and starts with its memory freed and the peak reset."""
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

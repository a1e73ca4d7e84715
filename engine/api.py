"""The one door between the harness and any backend (our engine, the diffusers reference, or another engine added
later): a frozen RunConfig in, Artifacts out; plus the few engine services the harness needs (preflight, the weight
report, the quantized-checkpoint export, bench building blocks, the world size of a parallel spec). The harness
imports nothing else of the engine (an import-linter contract in pyproject.toml enforces it).

A backend exposes `open_runner(cfg) -> Runner`; the runner loads the model once and serves `generate(cfg)` (the
whole pipeline) and `transformer_forward(inputs)` (one denoiser call on given inputs, for component-level
comparison free of trajectory drift).

Engine modules are imported inside the functions below: the harness imports this module to build configs and must
not pay for (or cycle through) model code until it runs one.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np
import torch

from engine.optimize import OptimizeSpec
from engine.quant.prequantized import CONFIG_NAME as QUANT_CONFIG_NAME  # noqa: F401  (the file `parity quantize` writes)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PER_RUN = {"per_run": True}  # field metadata: may change between generate() calls on one loaded model


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run's output. Hashable, so it can key caches. `sampling` is the family's own
    sampling object (engine.families: Family.sampling); None means that object's defaults."""

    family: str
    model_dir: str
    prompts: tuple[str, ...] = field(metadata=PER_RUN)
    sampling: Any = field(default=None, metadata=PER_RUN)
    seed: int = field(default=0, metadata=PER_RUN)
    steps: int = field(default=4, metadata=PER_RUN)
    height: int = field(default=64, metadata=PER_RUN)
    width: int = field(default=64, metadata=PER_RUN)
    dtype: str = "fp32"
    device: str = "cpu"
    quant: str = "none"
    quant_ignored: tuple[str, ...] = ()
    parallel: str = "sp1"
    optimize: OptimizeSpec = OptimizeSpec()

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)
        sampling_cls = sampling_type(self.family)
        if self.sampling is None:
            object.__setattr__(self, "sampling", sampling_cls())
        elif not isinstance(self.sampling, sampling_cls):
            raise TypeError(f"RunConfig.sampling for family {self.family!r} must be a {sampling_cls.__name__}, "
                            f"got {type(self.sampling).__name__}")
        if not isinstance(self.optimize, OptimizeSpec):
            raise TypeError(f"RunConfig.optimize must be an OptimizeSpec, got {type(self.optimize).__name__}")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "quant_ignored", tuple(self.quant_ignored))
        if not self.prompts:
            raise ValueError("RunConfig.prompts is empty: give at least one prompt")
        if self.steps < 1:
            raise ValueError(f"RunConfig.steps must be >= 1, got {self.steps}")

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def check_same_model(self, other: "RunConfig") -> None:
        """Raise if `other` needs a different loaded model than this config (a runner serves only its own)."""
        for f in dataclasses.fields(self):
            if not f.metadata.get("per_run") and getattr(self, f.name) != getattr(other, f.name):
                raise ValueError(f"runner was loaded for {f.name}={getattr(self, f.name)!r}, "
                                 f"asked for {getattr(other, f.name)!r}")

    def to_dict(self) -> dict:
        """Plain types only (str, int, float, bool, None, lists, dicts): JSON, TOML and torch.load(weights_only)."""
        def plain(value):
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return list(value) if isinstance(value, tuple) else value
        return plain(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "RunConfig":
        data = dict(data)
        if "family" not in data:
            raise ValueError("RunConfig dict has no 'family'")
        nested = {"sampling": sampling_type(data["family"]), "optimize": OptimizeSpec}
        for key, sub in nested.items():
            if isinstance(data.get(key), Mapping):
                data[key] = dataclass_from_dict(sub, data[key], what=f"RunConfig.{key}")
        return dataclass_from_dict(cls, data, what="RunConfig")


def dataclass_from_dict(cls: type, data: Mapping, what: str):
    """cls(**data), with lists turned back into tuples where the field is a tuple, and unknown keys an error that
    lists the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - names):
        raise ValueError(f"{what}: unknown field(s) {unknown}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {k: tuple(v) if isinstance(v, list) and typing.get_origin(hints[k]) is tuple else v
              for k, v in data.items()}
    return cls(**values)


@dataclass
class Artifacts:
    """What a backend returns for one RunConfig. Latent tensors are the packed (B, N, C) sequence layout the
    denoiser sees; media are uint8 (B, F, H, W, 3), F = 1 for images, rounded as diffusers' numpy_to_pil rounds."""

    initial_latents: torch.Tensor
    step_latents: torch.Tensor  # (steps, B, N, C): latents after each sampler step
    step_outputs: torch.Tensor  # (steps, B, N, C): the guided prediction each step used
    final_latents: torch.Tensor  # (B, N, C)
    images: np.ndarray  # (B, F, H, W, 3) uint8
    step0_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # denoiser kwargs, diffusers naming
    extras: dict[str, float] = field(default_factory=dict)  # timings and other scalars


class Runner(Protocol):
    def generate(self, cfg: RunConfig) -> Artifacts: ...

    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One denoising step's prediction on given inputs: one denoiser call, or, when `inputs` hold a true-CFG
        step (guided_inputs), both branches combined as the family's pipeline guides them."""
        ...


# A true-CFG run's step-0 inputs hold both guidance branches, so that a single-step comparison judges the guided
# prediction (uncond + s (cond - uncond), and whatever rescale the family applies), not the conditional branch
# alone: the conditional branch's denoiser kwargs under their diffusers names, the negative branch's under NEGATIVE
# + name, the guidance scale as a 0-d float64 tensor under GUIDANCE_SCALE. Tensors only: they travel through files
# (torchrun jobs, the reference cache) like any other step-0 input.
NEGATIVE = "negative."
GUIDANCE_SCALE = "guided.true_cfg_scale"


def guided_inputs(cond: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor] | None = None,
                  scale: float | None = None) -> dict[str, torch.Tensor]:
    """Step-0 inputs of one denoising step: `cond` alone, or both branches and the scale of a true-CFG step."""
    out = {k: v for k, v in cond.items() if v is not None}
    if negative is None:
        return out
    if scale is None:
        raise ValueError("a guided step needs its true_cfg_scale")
    out.update({NEGATIVE + k: v for k, v in negative.items() if v is not None})
    out[GUIDANCE_SCALE] = torch.tensor(float(scale), dtype=torch.float64)
    return out


def split_guided(inputs: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, float | None]:
    """(conditional kwargs, negative kwargs or None, scale or None): guided_inputs undone."""
    cond = {k: v for k, v in inputs.items() if not k.startswith(NEGATIVE) and k != GUIDANCE_SCALE}
    negative = {k[len(NEGATIVE):]: v for k, v in inputs.items() if k.startswith(NEGATIVE)}
    if not negative:
        if GUIDANCE_SCALE in inputs:
            raise ValueError(f"step-0 inputs carry {GUIDANCE_SCALE!r} but no negative branch ({NEGATIVE}*)")
        return cond, None, None
    if GUIDANCE_SCALE not in inputs:
        raise ValueError(f"step-0 inputs carry a negative branch but no {GUIDANCE_SCALE!r}")
    return cond, negative, float(inputs[GUIDANCE_SCALE])


# --- the engine's services, by family name ------------------------------------------------------------------------
def _family(name: str):
    from engine.families import family

    return family(name)


def family_names() -> list[str]:
    from engine.families import FAMILIES

    return sorted(FAMILIES)


def sampling_type(family: str) -> type:
    """The family's sampling dataclass (its fields are suite keys and report columns)."""
    return _family(family).sampling


def denoiser_names(family: str) -> tuple[str, ...]:
    return _family(family).denoisers


def conditioning_inputs(family: str) -> tuple[str, ...]:
    """The step-0 input names (guided_inputs naming) that carry the prompt's conditioning (Family.conditioning)."""
    return _family(family).conditioning


def open_runner(cfg: RunConfig, components: Mapping[str, Any] | None = None) -> Runner:
    """The engine's runner for cfg. `components` (optional) are built pipeline components by folder name that replace
    what would be loaded from cfg.model_dir: tokenizers, text encoders and the VAE as objects, "scheduler" as its
    config dict, each denoiser as DenoiserWeights (its diffusers config and state dict, loaded into the engine's own
    model). Families that take them say so in their pipeline (engine.family.Family.pipeline)."""
    from engine.runner import open_runner as _open

    return _open(cfg, components)


def world_size(parallel: str) -> int:
    """How many processes a parallel config needs (ulysses x ring x cfg); raises on an unknown name."""
    from engine.parallel.config import parse_parallel

    return parse_parallel(parallel).world_size


def preflight(cfg: RunConfig) -> None:
    """Input errors that would make a run fail, found without loading weights: the parallel and optimize specs,
    and the quant spec against every denoiser (meta-device builds)."""
    from engine.denoisers import check_quant_spec
    from engine.quant.api import QuantSpec

    world_size(cfg.parallel)
    cfg.optimize.check(cfg.device, cfg.quant)
    check_quant_spec(_family(cfg.family), Path(cfg.model_dir), QuantSpec(cfg.quant, cfg.quant_ignored))


def weight_report(cfg: RunConfig, source_dir: str | Path) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(denoiser, layer, dequantized weight, source weight) for every quantized linear of every denoiser of the
    model `cfg` loads, built as cfg runs it, against the unquantized checkpoint in `source_dir`."""
    from engine.denoisers import dequantized_weight_pairs
    from engine.quant.api import QuantSpec

    yield from dequantized_weight_pairs(_family(cfg.family), Path(cfg.model_dir), Path(source_dir),
                                        QuantSpec(cfg.quant, cfg.quant_ignored), cfg.torch_dtype, cfg.device)


def quant_probe(cfg: RunConfig, source_dir: str | Path, inputs: Mapping[str, torch.Tensor], tokens: int = 8):
    """For the quantized-layer oracle: every linear of every denoiser of the model `cfg` loads, built as cfg runs it
    (engine.quant.oracle.LinearRecord: quantized or not, its checkpoint names; for quantized ones a few input rows
    captured in one forward on the diffusers-named `inputs`, its output on them, and the unquantized weights and
    bias from `source_dir` plus the loaded checkpoint's static input_scale)."""
    from engine.quant.api import QuantSpec
    from engine.quant.oracle import probe_linears

    yield from probe_linears(_family(cfg.family), Path(cfg.model_dir), Path(source_dir),
                             QuantSpec(cfg.quant, cfg.quant_ignored), cfg.torch_dtype, cfg.device, inputs, tokens)


def assert_replicated(x: torch.Tensor, what: str) -> None:
    """Raise if `x` differs between the ranks of the default process group."""
    from engine.parallel.transformer import assert_replicated as _check

    _check(x, None, what)


# --- pre-quantized checkpoints (`parity quantize`) ------------------------------------------------------------------
def checkpoint_formats() -> dict[str, tuple[str, str]]:
    from engine.quant.export import FORMATS

    return dict(FORMATS)


def calibration_formats() -> list[str]:
    """Checkpoint formats that carry a calibrated static input scale."""
    from engine.quant.export import INPUT_SCALE

    return sorted(INPUT_SCALE)


def folder_denoisers(model_dir: str | Path) -> tuple[str, ...]:
    """The denoiser component folders of a diffusers model folder, by its model_index.json pipeline class."""
    return _folder_family(model_dir).denoisers


def folder_family(model_dir: str | Path) -> str:
    """The family name of a diffusers model folder, by its model_index.json pipeline class."""
    return _folder_family(model_dir).name


def _folder_family(model_dir):
    import json

    from engine.families import family_of_pipeline

    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    return family_of_pipeline(index.get("_class_name"))


def quantized_denoiser(model_dir: str | Path, denoiser: str, fmt: str, keep_bf16: tuple[str, ...] = (),
                       input_amax: Mapping[str, float] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, hf_quant_config) of the quantized copy of one denoiser folder, chosen by the engine's own walk;
    with `input_amax` (one denoiser's entry of calibrate_input_amax) every quantized module carries a static
    input_scale."""
    from engine.denoisers import builder
    from engine.quant.export import quantize_checkpoint

    src = Path(model_dir) / denoiser
    build, key_map = builder(_folder_family(model_dir), denoiser, src)
    return quantize_checkpoint(build, key_map, src, fmt, tuple(keep_bf16), input_amax)


def quantized_components(model_dir: str | Path, fmt: str) -> tuple[str, ...]:
    """The non-denoiser component folders the family's release stores in checkpoint format `fmt`
    (engine.family.QuantizedComponent; e.g. a text encoder shipped in FP8 too)."""
    return tuple(c.folder for c in _folder_family(model_dir).quantized_components if fmt in c.formats)


def quantized_component(model_dir: str | Path, folder: str, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, hf_quant_config) of the quantized copy of one such component folder, its linears chosen by the
    family's declaration."""
    from engine.quant.component import quantize_component

    components = {c.folder: c for c in _folder_family(model_dir).quantized_components}
    if folder not in components:
        raise ValueError(f"{folder!r} is no quantized component of this family; valid: {sorted(components)}")
    return quantize_component(components[folder], Path(model_dir) / folder, fmt)


def calibrate_input_amax(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """denoiser -> checkpoint module -> the largest |input| of that linear over one unquantized generate(cfg):
    cfg.prompts, steps and size are the calibration data (engine/quant/calibrate.py)."""
    from engine.quant.calibrate import input_amax

    return input_amax(cfg, _family(cfg.family), open_runner)


# --- bench building blocks ------------------------------------------------------------------------------------------
def bench_inputs(family: str, denoiser: str, config: dict, shape, dtype: torch.dtype, device) -> dict:
    """Random diffusers-named inputs for one denoiser forward at `shape` (engine.family.BenchShape)."""
    return _family(family).bench_inputs(denoiser, config, shape, dtype, device)


def denoiser_weights(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]):
    """A denoiser in memory (engine.family.DenoiserWeights), for open_runner's components."""
    from engine.family import DenoiserWeights

    return DenoiserWeights(config, state_dict)


def bench_shape(**kwargs):
    from engine.family import BenchShape

    return BenchShape(**kwargs)


def build_denoiser(family: str, denoiser: str, config: dict, state_dict: Mapping[str, torch.Tensor], quant: str,
                   optimize: OptimizeSpec, parallel: str, dtype: torch.dtype, device):
    """An engine denoiser from an in-memory diffusers state dict, in the runner's order (load, quantize, optimize,
    parallelize over the torchrun world); returns (model, forward(diffusers-named inputs))."""
    from engine.loading import load_model
    from engine.optimize import optimize as apply_optimize
    from engine.quant.api import QuantSpec, quantize_model

    fam = _family(family)
    build, key_map = fam.denoiser_builder(denoiser, config)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}  # each fused segment its own NVFP4 global scale
    model = load_model(build, key_map, state_dict, dtype, device)
    model = apply_optimize(quantize_model(model, QuantSpec(quant), key_map, shapes), optimize)
    if world_size(parallel) > 1:
        from engine.parallel.api import parallel_mesh, parallelize
        from engine.parallel.config import parse_parallel

        mesh = parallel_mesh(parse_parallel(parallel), torch.device(device))
        model = parallelize(fam, model, mesh, optimize.sp_overlap)
    return model, lambda inputs: fam.denoiser_forward(model, inputs)


def quant_summary(model: torch.nn.Module) -> dict:
    from engine.quant.api import quant_summary as _summary

    return _summary(getattr(model, "inner", model))


def sensitivity_probe(cfg: RunConfig, synthesize: Callable[[str], tuple[dict, Mapping[str, torch.Tensor]]] | None = None):
    """A quantization sensitivity probe (engine/quant/sensitivity.py) for quant mode cfg.quant over every denoiser of
    cfg.family: loaded with its pipeline from cfg.model_dir (to capture step-0 inputs), or built alone on cfg.device
    from `synthesize(denoiser) -> (diffusers config, state dict)`."""
    from engine.quant.sensitivity import open_probe

    return open_probe(cfg, _family(cfg.family), open_runner, synthesize)


# --- token families (multimodal language models; engine.family.TokenFamily) ---------------------------------------
def token_family_names() -> list[str]:
    from engine.families import TOKEN_FAMILIES

    return sorted(TOKEN_FAMILIES)


def quant_modes() -> tuple[str, ...]:
    from engine.quant.api import MODES

    return MODES


def open_token_model(family: str, model_dir: str | Path, dtype: str = "fp32", quant: str = "none",
                     device: str = "cpu") -> torch.nn.Module:
    """A token family's model loaded from its transformers folder, its block linears quantized as `quant` says
    (the same walk and the same default layer choice as the DiTs: linears inside numbered blocks)."""
    from engine.families import token_family
    from engine.quant.api import QuantSpec, quantize_

    model = token_family(family).load(Path(model_dir), torch_dtype(dtype), device)
    return quantize_(model, QuantSpec(mode=quant))

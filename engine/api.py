"""The one narrow interface between the harness and any backend (our engine, the diffusers reference, or
another engine added later): a frozen RunConfig in, Artifacts out.

A backend exposes `open_runner(cfg) -> Runner`; the runner loads the model once and serves
`generate(cfg)` (the whole pipeline) and `transformer_forward(inputs)` (one denoiser call on given inputs,
for component-level comparison free of trajectory drift).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run's output. Hashable, so it can key caches."""

    family: str
    model_dir: str
    prompts: tuple[str, ...]
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 4
    height: int = 64
    width: int = 64
    guidance: float = 3.5
    true_cfg_scale: float = 1.0
    max_sequence_length: int = 32
    dtype: str = "fp32"
    device: str = "cpu"
    quant: str = "none"
    quant_ignored: tuple[str, ...] = ()
    parallel: str = "sp1"

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)
        if not self.prompts:
            raise ValueError("RunConfig.prompts is empty: give at least one prompt")
        if self.steps < 1:
            raise ValueError(f"RunConfig.steps must be >= 1, got {self.steps}")

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


@dataclass
class Artifacts:
    """What a backend returns for one RunConfig. Latent tensors are the packed (B, N, C) sequence layout the
    denoiser sees; images are uint8 (B, H, W, 3) rounded as diffusers' numpy_to_pil rounds them."""

    initial_latents: torch.Tensor
    step_latents: torch.Tensor  # (steps, B, N, C): latents after each sampler step
    step_outputs: torch.Tensor  # (steps, B, N, C): the guided prediction each step used
    final_latents: torch.Tensor  # (B, N, C)
    images: np.ndarray  # (B, H, W, 3) uint8
    step0_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # denoiser kwargs, diffusers naming
    extras: dict[str, float] = field(default_factory=dict)  # timings and other scalars


class Runner(Protocol):
    def generate(self, cfg: RunConfig) -> Artifacts: ...

    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor: ...


def sensitivity_probe(cfg: RunConfig, synthesize: Callable[[str], tuple[dict, Mapping[str, torch.Tensor]]] | None = None):
    """A quantization sensitivity probe (engine/quant/sensitivity.py) for quant mode cfg.quant over every denoiser of
    cfg.family: loaded with its pipeline from cfg.model_dir (to capture step-0 inputs), or built alone on cfg.device
    from `synthesize(denoiser) -> (diffusers config, state dict)`."""
    from engine.quant.sensitivity import open_probe

    return open_probe(cfg, synthesize)

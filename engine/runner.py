"""Backend entry point of the engine: `open_runner(cfg)` loads the family's pipeline for a RunConfig, then
applies parallelism to the built pipeline (quantization is applied while loading the transformer)."""
from __future__ import annotations

from engine.api import RunConfig, Runner
from engine.parallel.api import apply_parallel
from engine.pipelines.flux1 import Flux1Pipeline
from engine.pipelines.qwen_image import QwenImageEditPipeline, QwenImagePipeline  # family registration (issue 9)

FAMILIES: dict[str, type] = {
    "flux1": Flux1Pipeline,
    "qwen-image": QwenImagePipeline,  # family registration (issue 9)
    "qwen-image-edit": QwenImageEditPipeline,  # family registration (issue 9)
}


def open_runner(cfg: RunConfig) -> Runner:
    if cfg.family not in FAMILIES:
        raise ValueError(f"the engine has no model family {cfg.family!r}; valid: {sorted(FAMILIES)}")
    return apply_parallel(FAMILIES[cfg.family](cfg), cfg.parallel)

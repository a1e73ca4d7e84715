"""Backend entry point of the engine: `open_runner(cfg)` loads the family's pipeline for a RunConfig."""
from __future__ import annotations

from engine.api import RunConfig, Runner
from engine.pipelines.flux1 import Flux1Pipeline

FAMILIES: dict[str, type] = {"flux1": Flux1Pipeline}


def open_runner(cfg: RunConfig) -> Runner:
    try:
        family = FAMILIES[cfg.family]
    except KeyError:
        raise ValueError(f"the engine has no model family {cfg.family!r}; valid: {sorted(FAMILIES)}") from None
    if cfg.quant != "none":
        raise ValueError(f"quant mode {cfg.quant!r} is not implemented yet; valid: ['none']")
    if cfg.parallel != "sp1":
        raise ValueError(f"parallel config {cfg.parallel!r} is not implemented yet; valid: ['sp1']")
    return family(cfg)

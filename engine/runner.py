"""Backend entry point of the engine: `open_runner(cfg)` builds the family's pipeline for a RunConfig in one order,
the same for every family: load and quantize each denoiser (inside the family's pipeline), optimize each denoiser
(cfg.optimize), then parallelize (cfg.parallel)."""
from __future__ import annotations

from typing import Any, Mapping

from engine.api import RunConfig, Runner
from engine.families import family
from engine.optimize import optimize
from engine.parallel.api import apply_parallel


def open_runner(cfg: RunConfig, components: Mapping[str, Any] | None = None) -> Runner:
    fam = family(cfg.family)
    pipeline = fam.pipeline(cfg) if components is None else fam.pipeline(cfg, components=components)
    for name in fam.denoisers:
        setattr(pipeline, name, optimize(getattr(pipeline, name), cfg.optimize))
    return apply_parallel(pipeline, cfg.parallel, fam, overlap=cfg.optimize.sp_overlap)

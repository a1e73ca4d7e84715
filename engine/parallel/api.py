"""Entry point used by engine.runner: `apply_parallel(pipeline, name)` turns a built single-device pipeline into
one rank of a parallel run. Every rank calls it (collectively) with the same name and then behaves as the
single-device pipeline: the same generate() / transformer_forward() results, on every rank.

What it changes on the pipeline, and nothing else:
  - pipeline.transformer: wrapped (engine.parallel.transformer) to shard image tokens over the sequence group,
    with the model's attention backend swapped for the sequence-parallel one;
  - pipeline.cfg_executor: for cfg2, one guidance branch per half of the mesh (engine.parallel.cfg).
"""
from __future__ import annotations

from engine.parallel.cfg import ParallelCFG
from engine.parallel.config import ParallelSpec, parse_parallel
from engine.parallel.mesh import get_mesh, init_distributed
from engine.parallel.transformer import WRAPPERS


def apply_parallel(pipeline, name: str):
    spec: ParallelSpec = parse_parallel(name)
    if spec.is_serial:
        return pipeline
    family = getattr(pipeline, "family", None)
    if family not in WRAPPERS:
        raise ValueError(f"no sequence-parallel wrapper for model family {family!r}; have: {sorted(WRAPPERS)}")
    init_distributed(spec, pipeline.device)
    mesh = get_mesh(spec)
    pipeline.transformer = WRAPPERS[family](pipeline.transformer, mesh)
    if spec.cfg > 1:
        pipeline.cfg_executor = ParallelCFG(mesh.cfg)
    return pipeline

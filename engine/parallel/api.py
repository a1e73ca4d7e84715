"""Entry point used by engine.runner: `apply_parallel(pipeline, name, family)` turns a built single-device pipeline
into one rank of a parallel run. Every rank calls it (collectively) with the same name and then behaves as the
single-device pipeline: the same generate() / transformer_forward() results, on every rank.

What it changes on the pipeline, and nothing else:
  - every denoiser the family declares (pipeline.<name>): wrapped in the family's sequence-parallel layout
    (engine.parallel.transformer) to shard image tokens over the sequence group, with the model's attention backend
    swapped for the sequence-parallel one;
  - pipeline.cfg_executor: for cfg2, one guidance branch per half of the mesh (engine.parallel.cfg).
"""
from __future__ import annotations

from engine.parallel.cfg import ParallelCFG
from engine.parallel.config import ParallelSpec, parse_parallel
from engine.parallel.mesh import get_mesh, init_distributed


def apply_parallel(pipeline, name: str, family, overlap: bool = False):
    """family: the engine.family.Family record (its denoisers and sequence_parallel wrapper); overlap: the run's
    OptimizeSpec.sp_overlap (SequenceParallelTransformer.set_overlap)."""
    spec: ParallelSpec = parse_parallel(name)
    if spec.is_serial:
        return pipeline
    if family.sequence_parallel is None:
        raise ValueError(f"model family {family.name!r} declares no sequence-parallel layout; "
                         f"it runs only with parallel 'sp1'")
    mesh = parallel_mesh(spec, pipeline.device)
    for denoiser in family.denoisers:
        setattr(pipeline, denoiser, parallelize(family, getattr(pipeline, denoiser), mesh, overlap))
    if spec.cfg > 1:
        pipeline.cfg_executor = ParallelCFG(mesh.cfg)
    return pipeline


def parallel_mesh(spec: ParallelSpec, device):
    """Join the run's process group (collective: every rank) and return the mesh of `spec`."""
    init_distributed(spec, device)
    return get_mesh(spec)


def parallelize(family, model, mesh, overlap: bool = False):
    """One denoiser in the family's sequence-parallel layout on `mesh`; `overlap`: OptimizeSpec.sp_overlap
    (SequenceParallelTransformer.set_overlap). The pipeline's denoisers and the bench's one denoiser both come here."""
    wrapped = family.sequence_parallel(model, mesh)
    if overlap:
        wrapped.set_overlap(True)
    return wrapped

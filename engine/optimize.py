"""Speed-ups applied to a built model, one switch each, so an accuracy regression can be traced to one flag. Every
switch is a field of OptimizeSpec, which RunConfig holds, so each is a suite axis the gate sees.

Compilation is regional: each transformer block is compiled on its own and the conditioning path (timestep,
guidance and pooled-text embeddings) stays eager (why: the comment below)."""
# The pattern is the flux-fast project's `optimize()`, with every step optional. Compiling the whole forward let
# inductor fuse the bf16 `timestep * 1000` into the sinusoid in float32, skipping the bf16 rounding the model was run
# with; at t ~ 750 that rounding moves t by up to 2, which rotates the high-frequency embedding channels: the compiled
# output had cosine 0.53 against eager on full-size FLUX.1 (H100) and 0.94 on the tiny zoo (CPU). The smoke suite's
# compiled cell catches that regression (tests/test_sweep.py plants it).
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import attention_backend


@dataclass(frozen=True)
class OptimizeSpec:
    compile_blocks: bool = False
    attention: str = "sdpa"
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks of a DiT: every ModuleList child of the model (looking inside a parallel wrapper)."""
    model = getattr(model, "inner", model)
    blocks = [m for m in model.children() if isinstance(m, nn.ModuleList)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks to compile")
    return blocks


def optimize(model: nn.Module, spec: OptimizeSpec) -> nn.Module:
    model.attention = attention_backend(spec.attention)
    if spec.compile_blocks:
        for blocks in block_lists(model):
            for block in blocks:
                block.compile(mode=spec.compile_mode, dynamic=False)
    return model

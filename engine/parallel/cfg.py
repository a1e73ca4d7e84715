"""CFG parallelism: the two true-CFG branches run on the two halves of the mesh, one branch per half, and both
predictions are all-gathered every step, so every rank applies the guidance formula to the same two tensors.
Each branch is computed exactly as the serial executor computes it: only where it runs changes."""
from __future__ import annotations

import torch

from engine.parallel.comm import all_gather_stacked
from engine.parallel.mesh import Axis
from engine.pipeline import Branch


class ParallelCFG:
    """A pipeline `cfg_executor`: (cond, uncond) thunks -> (cond output, uncond output) on every rank."""

    def __init__(self, axis: Axis):
        if axis.size != 2:
            raise ValueError(f"CFG parallelism needs exactly 2 branch groups, got {axis.size}")
        self.axis = axis

    def __call__(self, cond: Branch, uncond: Branch) -> tuple[torch.Tensor, torch.Tensor]:
        mine = (cond if self.axis.index == 0 else uncond)()
        both = all_gather_stacked(mine, self.axis.group, 2)
        return both[0], both[1]

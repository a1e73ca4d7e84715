"""Collective helpers shared by the attention, sharding and CFG code."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_stacked(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(...) on each of `size` ranks -> (size, ...) on all of them, in group-rank order. The buffer is shaped as
    the concatenation along dim 0 (the only form gloo accepts; NCCL takes it too) and viewed as a stack."""
    x = x.contiguous()
    if x.dim() == 0:
        x = x[None]
        return all_gather_stacked(x, group, size)[:, 0]
    buf = x.new_empty((size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(buf, x, group=group)
    return buf.view(size, *x.shape)

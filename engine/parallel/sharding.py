"""How one sequence is cut across the ranks of a sequence-parallel group, and put back together.

Cuts are uneven when the length does not divide: the first n % parts shards get one token more. Attention then
moves exactly these sizes (all_to_all_single split sizes, ring buffers of the sender's size), so no padded token
ever reaches a softmax. Shards are contiguous and in rank order, which keeps every Ulysses group's union and every
ring block contiguous too (see mesh.py's rank layout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.parallel.comm import all_gather_stacked


@dataclass(frozen=True)
class ShardPlan:
    total: int
    sizes: tuple[int, ...]  # tokens per sequence-parallel rank, in rank order

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    def shard(self, x: torch.Tensor, dim: int, index: int) -> torch.Tensor:
        """This rank's contiguous slice of a full-length tensor (a view, no copy)."""
        return x.narrow(dim, self.offsets[index], self.sizes[index])

    def gather(self, local: torch.Tensor, dim: int, group) -> torch.Tensor:
        """Every rank's shard -> the full-length tensor, on every rank. Collectives need equal sizes, so shards
        are padded to the largest for transport only and the padding is cut off before concatenation."""
        longest = max(self.sizes)
        pad = longest - local.shape[dim]
        moved = local.movedim(dim, 0)
        if pad:
            moved = torch.cat([moved, moved.new_zeros((pad, *moved.shape[1:]))])
        buf = all_gather_stacked(moved, group, len(self.sizes))
        pieces = [buf[i, :s] for i, s in enumerate(self.sizes)]
        return torch.cat(pieces).movedim(0, dim)

    def group_sizes(self, group_size: int) -> tuple[int, ...]:
        """Sizes of consecutive runs of `group_size` shards (the ring blocks of a USP mesh)."""
        return tuple(sum(self.sizes[i:i + group_size]) for i in range(0, len(self.sizes), group_size))


def plan_shards(total: int, parts: int) -> ShardPlan:
    if total < parts:
        raise ValueError(f"cannot shard {total} tokens over {parts} ranks: every rank needs at least one token")
    base, extra = divmod(total, parts)
    return ShardPlan(total=total, sizes=tuple(base + (1 if i < extra else 0) for i in range(parts)))

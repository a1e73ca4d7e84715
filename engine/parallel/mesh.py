"""Process groups for a (cfg x ring x ulysses) mesh.

Global rank = c * (R * U) + r * U + u, ulysses innermost: the all-to-all partners are neighbours (same node, fastest
link), the ring hops across Ulysses groups, and each CFG branch owns one contiguous block of ranks. Every group's
ranks are listed in ascending order, so a group's local rank is the mesh coordinate along that axis and an
all-gather over the sequence group returns shards in sequence order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.parallel.config import ParallelSpec


class DistributedSetupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Axis:
    """One mesh axis as seen from this rank: its size, our index along it, the group and its global ranks."""

    size: int
    index: int
    ranks: tuple[int, ...]
    group: object = field(compare=False, repr=False)
    group_name: str = field(default="", compare=False, repr=False)  # what the functional collectives take

    def global_rank(self, index: int) -> int:
        return self.ranks[index % self.size]


@dataclass(frozen=True)
class Mesh:
    spec: ParallelSpec
    rank: int
    ulysses: Axis
    ring: Axis
    sp: Axis  # ulysses x ring together: the ranks that share one sequence
    cfg: Axis


def _coords(rank: int, spec: ParallelSpec) -> tuple[int, int, int]:
    c, rest = divmod(rank, spec.sp)
    r, u = divmod(rest, spec.ulysses)
    return c, r, u


def _axis(rank: int, all_groups: list[tuple[int, ...]], pgs: list) -> Axis:
    """Pick, among every group of one axis (all ranks must create all of them, in the same order), ours."""
    for ranks, pg in zip(all_groups, pgs):
        if rank in ranks:
            return Axis(size=len(ranks), index=ranks.index(rank), ranks=ranks, group=pg, group_name=pg.group_name)
    raise AssertionError(f"rank {rank} is in no group of {all_groups}")


def build_mesh(spec: ParallelSpec) -> Mesh:
    """Collective: every rank of the default process group must call it with the same spec."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != spec.world_size:
        raise DistributedSetupError(
            f"parallel config needs world_size = ulysses {spec.ulysses} x ring {spec.ring} x cfg {spec.cfg} "
            f"= {spec.world_size}, but {world} processes were launched")
    coords = [_coords(g, spec) for g in range(world)]

    def groups(key) -> list[tuple[int, ...]]:
        buckets: dict = {}
        for g, c in enumerate(coords):
            buckets.setdefault(key(c), []).append(g)
        return [tuple(sorted(b)) for _, b in sorted(buckets.items())]

    axes = {}
    for name, key in [("ulysses", lambda c: (c[0], c[1])), ("ring", lambda c: (c[0], c[2])),
                      ("sp", lambda c: c[0]), ("cfg", lambda c: (c[1], c[2]))]:
        all_groups = groups(key)
        # new_group is collective over the whole world even for groups this rank is not in.
        pgs = [dist.new_group(list(ranks)) for ranks in all_groups]
        axes[name] = _axis(rank, all_groups, pgs)
    return Mesh(spec=spec, rank=rank, **axes)


def init_distributed(spec: ParallelSpec, device: torch.device) -> None:
    """Join the default process group described by torchrun's environment (gloo on CPU, NCCL on CUDA), unless a
    caller (a test, a notebook) already did. Fails with the launch command when the environment is missing."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise DistributedSetupError(
            f"this parallel config needs {spec.world_size} processes but no torch.distributed environment is set: "
            f"launch with `python -m torch.distributed.run --standalone --nproc-per-node {spec.world_size} ...` "
            f"(harness.launch.run_engine_distributed does this per cell)")
    if int(os.environ["WORLD_SIZE"]) != spec.world_size:
        raise DistributedSetupError(
            f"parallel config needs world_size {spec.world_size} (ulysses {spec.ulysses} x ring {spec.ring} x "
            f"cfg {spec.cfg}), launched with WORLD_SIZE={os.environ['WORLD_SIZE']}")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        # Weights were loaded onto the current device before we get here: it must already be this rank's GPU.
        if torch.cuda.current_device() != local:
            raise DistributedSetupError(
                f"rank with LOCAL_RANK={local} built its model on cuda:{torch.cuda.current_device()}; call "
                f"torch.cuda.set_device(LOCAL_RANK) before loading (harness.worker does)")
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")


_MESHES: dict[tuple, Mesh] = {}


def get_mesh(spec: ParallelSpec) -> Mesh:
    """One mesh per spec per default group: creating groups is collective and not free, so reuse them; keyed by
    the default group too, so a re-initialised world never sees groups of a destroyed one."""
    key = (spec, dist.group.WORLD)
    if key not in _MESHES:
        _MESHES[key] = build_mesh(spec)
    return _MESHES[key]

"""Wrap a built transformer so that its forward runs sequence-parallel: shard the image tokens and their position
ids on entry (the text too where the family allows it, else the text stays replicated), run the unchanged model
with the SP attention backend swapped in, gather the image output on exit. Every rank passes full-length inputs
and gets the full-length output.

Family knowledge (which arguments are image tokens and ids, whether text comes before or after the image in the
joint sequence) lives in one small subclass per family, in the family's own pipeline file (Family.sequence_parallel).
"""
from __future__ import annotations

import torch
import torch._inductor.config  # noqa: F401 (torch._inductor.config.patch below)
import torch.distributed as dist
from torch import nn

from engine.parallel.attention import ULYSSES_CHUNKS, JointSequenceParallelAttention
from engine.parallel.mesh import Mesh
from engine.parallel.sharding import ShardPlan, plan_shards


class ReplicationError(RuntimeError):
    pass


# The replication check (a tiny all-reduce and a host sync) runs on forward 0 of a wrapped model and then on every
# REPLICATION_CHECK_EVERY-th forward. Ranks that drew different noise differ from their first forward, so forward 0
# catches them; the later samples catch ranks that drift apart mid-run, and with 16 every generate() of 16 steps or
# more (any later seed on the same model included) is checked at least once, while a sync that stalls the host
# before each forward's launches is paid on one forward in 16 instead of on every one.
REPLICATION_CHECK_EVERY = 16

# Inductor config for the blocks a sharded forward compiles (they compile at their first call, inside run_sharded).
# Its peak-memory reordering, on by default, moves the next head piece's all-to-all after the attention it should
# overlap and the inverse all-to-all after the following piece (seen in the generated code: in0, attention 0, in1,
# attention 1, out0, out1), which undoes the Ulysses pipeline; without it the compiled block keeps the traced order
# (in0, in1, attention 0, out0, attention 1, out1), eager's. tests/test_parallel_ulysses_chunks.py reads that order.
COMPILE_CONFIG = {"reorder_for_peak_memory": False}
# With overlap on (set_overlap) also without the post-grad pass that moves every producer right before its first
# consumer: it moved the MLP GEMMs handed to the attention as independent work from under the all-to-alls to after
# the last wait, where linear2 reads them (seen in the generated code), so nothing overlapped.
# tests/test_parallel_overlap.py reads that order. Only with overlap on: without it the pass is inductor's default.
OVERLAP_COMPILE_CONFIG = {**COMPILE_CONFIG, "reorder_for_locality": False}


def shard_tokens(plan: ShardPlan, x: torch.Tensor, dim: int, index: int) -> torch.Tensor:
    return plan.shard(x, dim, index)


def shard_positions(plan: ShardPlan, ids: torch.Tensor, dim: int, index: int) -> torch.Tensor:
    """Position ids (or the per-token RoPE rows a model computes from its own layout) go with their tokens: the same
    cut as shard_tokens, so each shard's RoPE angles are its own."""
    return plan.shard(ids, dim, index)


def assert_replicated(x: torch.Tensor, group, what: str) -> None:
    """Raise if `x` differs between the ranks of `group`. A float64 fingerprint (sum, sum of squares, a position-
    weighted sum) is reduced with MAX over (f, -f): equal on every rank iff max == -max(-f) == min. One tiny
    all-reduce and a host sync per call (the wrapper samples its forwards: REPLICATION_CHECK_EVERY); it catches
    ranks that drew different noise, which would otherwise only blur the result (CFG ranks on different latents
    still produce a plausible image)."""
    flat = x.detach().flatten().double()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder_(9973)
    f = torch.stack([flat.sum(), flat.square().sum(), (flat * weights).sum()])
    # NaN never equals itself: map non-finite fingerprints to fixed values, so ranks that agree on a NaN agree here
    # (the metrics report the NaN) and only a real divergence raises.
    f = torch.nan_to_num(f, nan=1e300, posinf=2e300, neginf=-2e300)
    both = torch.cat([f, -f])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:3], -both[3:]):
        raise ReplicationError(f"{what}: not the same on every rank (fingerprint max {both[:3].tolist()} vs min "
                               f"{(-both[3:]).tolist()}); every rank must start from the same seed and latents")


class SequenceParallelTransformer(nn.Module):
    """Base: holds the inner model, the mesh, the swapped-in attention; subclasses map their forward signature."""

    text_first: bool = True  # where the text sits in the model's joint sequence
    # Family opt-in: the model treats text tokens one by one outside attention and never masks text keys, so the
    # text can be cut across the ranks like the image (no rank recomputes the whole text's projections and MLPs).
    text_shardable: bool = False
    # A shardable family cuts its text on ring and USP meshes too: its text keys then travel with their block, and no
    # rank recomputes the whole text (4 x H100, FLUX.1 1024px: ring4 1.60x -> 2.08x, usp2x2 2.08x -> 2.47x over one
    # GPU). False keeps it whole on every rank of a ring (tools/sp_run.py --replicate-text-on-ring measures it).
    shard_text_with_ring: bool = True
    # Pieces each rank's heads are cut into so that Ulysses' all-to-alls overlap attention (engine.parallel.attention
    # ULYSSES_CHUNKS says why that default); any count gives the same bits. tools/sp_run.py --ulysses-chunks sets it.
    ulysses_chunks: int = ULYSSES_CHUNKS

    def __init__(self, inner: nn.Module, mesh: Mesh):
        super().__init__()
        if isinstance(inner, SequenceParallelTransformer):
            raise ValueError("transformer is already wrapped for parallelism; apply_parallel once per pipeline")
        self.inner = inner
        self.mesh = mesh
        # Forwards between replication checks (forward 0 is always checked); 0 turns the check off (e.g. under CUDA
        # graphs, which cannot capture a host sync).
        self.replication_check_every = REPLICATION_CHECK_EVERY
        self.forwards = 0
        # Shard the text too (a shardable family's forward passes `text` to run_sharded).
        self.shard_text = self.text_shardable and (mesh.ring.size == 1 or self.shard_text_with_ring)
        if mesh.sp.size > 1:
            self.sp_attention = JointSequenceParallelAttention(mesh, local_attention=inner.attention,
                                                               ulysses_chunks=self.ulysses_chunks)
            inner.attention = self.sp_attention

    def set_overlap(self, on: bool) -> None:
        """Let the model's independent work run under the Ulysses all-to-alls (OptimizeSpec.sp_overlap; the same
        bits, engine.parallel.attention.BesideWork says where it runs). Nothing to overlap without a sequence axis."""
        if self.mesh.sp.size > 1:
            self.sp_attention.overlap = on

    @property
    def attention(self):
        return self.inner.attention

    @attention.setter
    def attention(self, fn) -> None:
        # Whoever swaps the model's kernel after wrapping (engine.optimize sets `.attention`) chooses the kernel the
        # SP backend runs locally; replacing the SP backend itself would silently drop the sharded attention.
        if self.mesh.sp.size > 1:
            self.sp_attention.local_attention = fn
        else:
            self.inner.attention = fn

    def __getattr__(self, name: str):
        # Callers that read model attributes (config, dtype of a parameter...) see the inner model's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def run_sharded(self, image: torch.Tensor, image_ids: torch.Tensor, text_len: int, call, text=None):
        """call(image_shard, ids_shard) runs the inner model on this rank's shard; returns the gathered output.
        image_ids: one row per image token along dim 0 (position ids, or RoPE rows), cut exactly as the tokens.
        text: for a text-shardable family, (text tokens (B, T, ...), text ids (T, ...)); call then also takes
        (text, text_ids): this rank's cut of them when self.shard_text holds, the whole text otherwise."""
        every, n = self.replication_check_every, self.forwards
        self.forwards += 1
        if every > 0 and n % every == 0:
            assert_replicated(image, None, f"the image latents given to the transformer (forward {n})")
        sp = self.mesh.sp
        if sp.size == 1:
            return call(image, image_ids) if text is None else call(image, image_ids, *text)
        plan = plan_shards(image.shape[1], sp.size)
        shards = (shard_tokens(plan, image, 1, sp.index), shard_positions(plan, image_ids, 0, sp.index))
        if text is None:
            self.sp_attention.configure(text_len, self.text_first, plan)
            args = shards
        elif self.shard_text and text_len >= sp.size:
            text_plan = plan_shards(text_len, sp.size)
            self.sp_attention.configure(text_len, self.text_first, plan, text_plan)
            args = (*shards, shard_tokens(text_plan, text[0], 1, sp.index),
                    shard_positions(text_plan, text[1], 0, sp.index))
        else:
            self.sp_attention.configure(text_len, self.text_first, plan)
            args = (*shards, *text)
        with torch._inductor.config.patch(OVERLAP_COMPILE_CONFIG if self.sp_attention.hides_work else COMPILE_CONFIG):
            out = call(*args)
        return plan.gather(out, 1, sp.group)

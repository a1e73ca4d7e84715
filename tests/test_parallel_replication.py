"""The replication check of a sequence-parallel wrapper is sampled (forward 0, then every Nth), not run on every
forward: ranks given different latents must still fail on forward 0, ranks that diverge later fail at the next
sample, and the check costs one all-reduce per sampled forward only. 2 ranks, gloo, a trivial inner model."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel import transformer as sp_transformer
from engine.parallel.config import ParallelSpec
from engine.parallel.mesh import build_mesh


class _Scale(nn.Module):
    def forward(self, x):
        return 2 * x


class _Wrapped(sp_transformer.SequenceParallelTransformer):
    def forward(self, x):
        return self.run_sharded(x, torch.arange(x.shape[1]), 0, lambda img, _ids: self.inner(img))


def _drive(model, n: int, diverge_from: int | None) -> tuple[int | None, int]:
    """n forwards; from forward `diverge_from` on, rank 1 gets other latents. -> (forward that raised, checks)."""
    calls = []
    real = sp_transformer.assert_replicated

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    sp_transformer.assert_replicated = counted
    try:
        for i in range(n):
            x = torch.ones(1, 6, 4)
            if diverge_from is not None and i >= diverge_from and dist.get_rank() == 1:
                x = x + 1e-6
            try:
                model(x)
            except sp_transformer.ReplicationError:
                return i, len(calls)
    finally:
        sp_transformer.assert_replicated = real
    return None, len(calls)


def _worker(rank: int, store: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    mesh = build_mesh(ParallelSpec(cfg=2))  # sequence group of 1: the wrapper checks the latents, shards nothing
    results = {}
    for every, diverge_from in [(16, 0), (16, 5), (16, None), (1, 5), (0, 0)]:
        model = _Wrapped(_Scale(), mesh)
        if every != sp_transformer.REPLICATION_CHECK_EVERY:
            model.replication_check_every = every
        results[(every, diverge_from)] = _drive(model, 40, diverge_from)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_replication_check_is_sampled_and_still_catches_divergent_ranks(tmp_path, start_ranks):
    assert sp_transformer.REPLICATION_CHECK_EVERY == 16
    start_ranks(_worker, (str(tmp_path / "store"), str(tmp_path)), 2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # Different latents from the start (ranks on different seeds): refused on the very first forward.
        assert got[(16, 0)] == (0, 1), got
        # Diverging at forward 5: caught at the next sample, forward 16, after 2 checks (0 and 16).
        assert got[(16, 5)] == (16, 2), got
        # Healthy ranks over 40 forwards: checked on forwards 0, 16, 32 only.
        assert got[(16, None)] == (None, 3), got
        # Every forward, as before: caught where it happens.
        assert got[(1, 5)] == (5, 6), got
        # Off: never checked, never raises.
        assert got[(0, 0)] == (None, 0), got

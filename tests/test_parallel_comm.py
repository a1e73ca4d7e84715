"""Functional collectives and the overlapped ring against the in-place torch.distributed code they replaced, on
CPU/gloo with 2 and 4 ranks.

- Bitwise: Ulysses, ring and USP attention (text prefix and suffix, even and uneven image lengths, fp32 and bf16)
  give exactly the bits of the previous implementation (in-place all_to_all_single / all_gather_into_tensor, every
  head in one all-to-all each way where Ulysses now pipelines pieces of the heads, ring hops by batch_isend_irecv),
  kept below as the twin. Plants: a ring that walks the other way (the same keys,
  merged in another order) and a ring that never takes the received block (its own block counted every step)
  must both differ.
- Traceable: torch.compile (dynamo) traces every mesh's attention with no graph break, while the twin's ring
  breaks the graph at every hop; the compiled (aot_eager) output equals the eager output bitwise.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist

from engine.parallel import attention as sp_attention
from engine.parallel import comm
from engine.parallel.config import ParallelSpec
from engine.parallel.kernels import merge_partials
from engine.parallel.mesh import build_mesh
from engine.parallel.sharding import plan_shards

B, H, D, TEXT = 2, 4, 16, 5


# --- the twin: the in-place collectives as they were before this change ---------------------------------------
def inplace_heads_to_sequence(x, sizes, axis):
    n, b, s, h, d = x.shape
    u = axis.size
    send = x.view(n, b, s, u, h // u, d).permute(3, 2, 0, 1, 4, 5).reshape(u * s, n, b, h // u, d)
    recv = x.new_empty((sum(sizes), n, b, h // u, d))
    dist.all_to_all_single(recv, send, output_split_sizes=list(sizes), input_split_sizes=[s] * u, group=axis.group)
    return recv.permute(1, 2, 0, 3, 4)


def inplace_sequence_to_heads(x, sizes, axis):
    b, _, hu, d = x.shape
    u, s = axis.size, sizes[axis.index]
    send = x.permute(1, 0, 2, 3).contiguous()
    recv = x.new_empty((u * s, b, hu, d))
    dist.all_to_all_single(recv, send, output_split_sizes=[s] * u, input_split_sizes=list(sizes), group=axis.group)
    return recv.view(u, s, b, hu, d).permute(2, 1, 0, 3, 4).reshape(b, s, u * hu, d)


def inplace_all_gather_stacked(x, group, size):
    x = x.contiguous()
    buf = x.new_empty((size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(buf, x, group=group)
    return buf.view(size, *x.shape)


def p2p_ring_attention(q, k, v, axis, block_sizes, text_kv, text_first, lse_attention, text_mask=None,
                       direction=1, take_received=True):
    """The batch_isend_irecv ring; `direction=-1` and `take_received=False` are the plants."""
    r, size = axis.index, axis.size
    kv = torch.stack([k, v])
    out = lse = None
    for step in range(size):
        src = (r - direction * step) % size
        if step + 1 < size:
            incoming = kv.new_empty((2, kv.shape[1], block_sizes[(src - direction) % size], *kv.shape[3:]))
            requests = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, kv, axis.global_rank(r + direction), axis.group),
                dist.P2POp(dist.irecv, incoming, axis.global_rank(r - direction), axis.group),
            ])
        block_k, block_v = kv[0], kv[1]
        mask = None
        if step == 0 and text_kv is not None:
            mask = sp_attention.joint_key_mask(text_mask, block_k.shape[1], text_first)
            block_k = sp_attention.join_joint(text_kv[0], block_k, text_first)
            block_v = sp_attention.join_joint(text_kv[1], block_v, text_first)
        block_out, block_lse = (lse_attention(q, block_k, block_v) if mask is None
                                else lse_attention(q, block_k, block_v, mask))
        out, lse = (block_out, block_lse) if out is None else merge_partials(out, lse, block_out, block_lse)
        if step + 1 < size:
            for req in requests:
                req.wait()
            if take_received:
                kv = incoming
    return out, lse


def _inplace_all_gather_heads(x, axis):
    return inplace_all_gather_stacked(x, axis.group, axis.size).permute(1, 2, 0, 3, 4).flatten(2, 3)


def _inplace_ring_text(tq, tk, tv, image_k, image_v, axis, text_first, lse_attention, text_mask=None):
    owner = 0 if text_first else axis.size - 1
    if axis.index == owner:
        image_k, image_v = (sp_attention.join_joint(tk, image_k, text_first),
                            sp_attention.join_joint(tv, image_v, text_first))
    out, lse = lse_attention(tq, image_k, image_v)
    buf = inplace_all_gather_stacked(torch.cat([out, lse], dim=-1), axis.group, axis.size)
    out, _ = sp_attention.merge_ordered([(buf[i, ..., :-1], buf[i, ..., -1:]) for i in range(axis.size)])
    return out


def inplace_ulysses_attention(qkv, sizes, axis, chunks, attend, beside=None):
    """Ulysses as it was before the pipeline: every head in one in-place all-to-all each way (chunks ignored; no
    independent work is handed to these tests' calls, so `beside` is None)."""
    assert beside is None
    received = inplace_heads_to_sequence(torch.stack(qkv), sizes, axis)
    out, side = attend(0, received.shape[3], received)
    return inplace_sequence_to_heads(out, sizes, axis), None if side is None else _inplace_all_gather_heads(side, axis)


TWIN = {"ulysses_attention": inplace_ulysses_attention, "ring_attention": p2p_ring_attention,
        "ring_text_attention": _inplace_ring_text}


def _swap(replacements: dict) -> dict:
    old = {name: getattr(sp_attention, name) for name in replacements}
    for name, fn in replacements.items():
        setattr(sp_attention, name, fn)
    return old


# --- one case ---------------------------------------------------------------------------------------------------
def _local_inputs(mesh, n_image, text_first, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, TEXT + n_image, H, D, generator=g).to(dtype) for _ in range(3))
    plan = plan_shards(n_image, mesh.sp.size)

    def local(x):
        img = plan.shard(x[:, TEXT:], 1, mesh.sp.index)
        return torch.cat([x[:, :TEXT], img] if text_first else [img, x[:, :TEXT]], 1)
    return plan, (local(q), local(k), local(v))


def _attention(mesh, plan, text_first):
    from engine.attention import sdpa_attention

    attn = sp_attention.JointSequenceParallelAttention(mesh, local_attention=sdpa_attention)
    attn.configure(TEXT, text_first, plan)
    return attn


def _worker(rank: int, world: int, store: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    meshes = sorted({(world, 1), (1, world), (2, world // 2)})
    for (u, r), text_first, n_image, dtype in itertools.product(
            meshes, (True, False), (4 * world + 1, 4 * world), (torch.float32, torch.bfloat16)):
        mesh = build_mesh(ParallelSpec(ulysses=u, ring=r))
        plan, qkv = _local_inputs(mesh, n_image, text_first, dtype, seed=n_image + u)
        attn = _attention(mesh, plan, text_first)
        got = attn(*qkv)
        old = _swap(TWIN)
        try:
            want = attn(*qkv)
        finally:
            _swap(old)
        results[("bitwise", u, r, text_first, n_image, str(dtype))] = torch.equal(got, want)
    # Plants on the ring: walking the other way (even blocks, so the buffers fit), and never taking the received
    # block. Both run through the twin with the plant switched on, against the functional ring.
    for (u, r) in meshes:
        if r == 1:
            continue
        mesh = build_mesh(ParallelSpec(ulysses=u, ring=r))
        plan, qkv = _local_inputs(mesh, 4 * world, True, torch.float32, seed=3)
        attn = _attention(mesh, plan, True)
        got = attn(*qkv)
        plants = [("stale_block", {"take_received": False})]
        if r > 2:  # a ring of 2 is the same walked either way
            plants.append(("reversed", {"direction": -1}))
        for plant, kwargs in plants:
            def planted(*args, _kw=kwargs, **kw):
                return p2p_ring_attention(*args, **kw, **_kw)
            old = _swap({**TWIN, "ring_attention": planted})
            try:
                bad = attn(*qkv)
            finally:
                _swap(old)
            results[("plant", plant, u, r)] = ((bad - got).abs().max().item(), torch.equal(bad, got))
    # Traceability: graph breaks of the functional code, and of the twin's ring; compiled == eager bitwise. Traced
    # at world 2 only: the traced code does not branch on the world size, and four ranks compiling on a 2-core CI
    # machine cost half a minute of `make test`.
    import torch._dynamo as dynamo

    for (u, r) in meshes if world == 2 else ():
        mesh = build_mesh(ParallelSpec(ulysses=u, ring=r))
        plan, qkv = _local_inputs(mesh, 4 * world + 1, True, torch.float32, seed=7)
        attn = _attention(mesh, plan, True)

        def fn(q, k, v, _attn=attn):
            return _attn(q, k, v)
        eager = fn(*qkv)
        dynamo.reset()
        explained = dynamo.explain(fn)(*qkv)
        results[("breaks", u, r)] = explained.graph_break_count
        dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(*qkv)
        results[("compiled_bitwise", u, r)] = torch.equal(compiled, eager)
        if r > 1:
            old = _swap(TWIN)
            try:
                dynamo.reset()
                results[("twin_breaks", u, r)] = dynamo.explain(fn)(*qkv).graph_break_count
            finally:
                _swap(old)
    dynamo.reset()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def world_results(request, rank_results):
    return request.param, rank_results(_worker, request.param)


def test_functional_collectives_are_bitwise_equal_to_the_inplace_ones(world_results):
    world, results = world_results
    cases = results.entries("bitwise")
    assert len(cases) == world * len({(world, 1), (1, world), (2, world // 2)}) * 2 * 2 * 2
    assert all(cases.values()), [k for k, ok in cases.items() if not ok]


def test_planted_ring_order_and_stale_block_are_caught(world_results):
    world, results = world_results
    plants = results.entries("plant")
    assert {key[1] for key in plants} == ({"stale_block", "reversed"} if world > 2 else {"stale_block"})
    for key, (err, equal) in plants.items():
        print(f"\nplant {key}: max abs diff {err:.2e}")
        assert not equal, key
        if key[1] == "stale_block":  # its own block counted R times: far off, not just reordered
            assert err > 1e-2, (key, err)


def test_sp_attention_compiles_without_graph_breaks(world_results):
    world, results = world_results
    breaks, twin = results.entries("breaks"), results.entries("twin_breaks")
    if world > 2:  # traced at world 2 only (see _worker): nothing was traced here
        assert not breaks and not twin
        return
    assert breaks and all(n == 0 for n in breaks.values()), breaks
    # The control: the batch_isend_irecv ring it replaced broke the graph, so this check can fail.
    assert twin and all(n > 0 for n in twin.values()), twin
    assert all(results.entries("compiled_bitwise").values())


def test_ring_shift_moves_uneven_blocks(tmp_path, start_ranks):
    """start_ring_shift alone: each rank receives exactly its predecessor's (uneven) block."""
    start_ranks(_shift_worker, (str(tmp_path / "store"), str(tmp_path)), 3)
    for rank in range(3):
        got = torch.load(tmp_path / f"shift{rank}.pt")
        prev = (rank - 1) % 3
        assert torch.equal(got, torch.full((2, prev + 1, 3), float(prev)))


def _shift_worker(rank: int, store: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3)
    x = torch.full((2, rank + 1, 3), float(rank))
    prev = (rank - 1) % 3
    pending = comm.start_ring_shift(x, rank, 3, 2 * (prev + 1) * 3, None)
    torch.save(comm.wait(pending).view(2, prev + 1, 3), os.path.join(out_dir, f"shift{rank}.pt"))
    dist.destroy_process_group()

"""How fast one Ulysses all-to-all is on its own, at FLUX.1's shapes: the q/k/v exchange and the output exchange of
one block, whole and cut into the pipeline's pieces, timed with CUDA events over many repetitions, as algorithm
bandwidth (bytes this rank sends to others / time). A profile that shows the all-to-alls of a forward taking far
longer than these times says the forward's collectives wait for a late peer (rank skew), not for the link.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tools/sp_a2a_bench.py --height 1024
    python -m torch.distributed.run --standalone --nproc-per-node 4 tools/sp_a2a_bench.py --height 2048
    # CPU check of the script itself (gloo):
    python -m torch.distributed.run --standalone --nproc-per-node 2 tools/sp_a2a_bench.py --device cpu --height 128

Then, on the same ranks, whether the pipelined Ulysses attention gives the same bits as whole heads with this
device's kernels (`bitwise_vs_chunks1`, per attention backend and piece count): on CPU the tests prove it; on a GPU
a kernel that picks its tiling from the number of heads could break it, and this says so in seconds.
Rank 0 prints one JSON line per case."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--height", type=int, default=1024, help="image side in pixels (16 px per token: 1024 -> 4096)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)

    from engine.parallel.comm import start_all_to_all, wait

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    u, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    tokens = (args.height // 16) ** 2 + args.text_tokens
    s = tokens // u  # this rank's joint shard (the remainder does not change the rate)
    hu = args.heads // u
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for chunks in args.chunks:
        if hu % chunks:
            continue
        hc = hu // chunks
        for kind, shape in (("qkv", (u * s, 3, 1, hc, args.head_dim)), ("out", (u * s, 1, hc, args.head_dim))):
            x = torch.randn(shape, device=device, dtype=torch.bfloat16)
            splits = [s] * u

            def once():
                for _ in range(chunks):  # the pieces of one block, issued back to back
                    wait(start_all_to_all(x, splits, splits, dist.group.WORLD))
            for _ in range(5):
                once()
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                once()
            sync()
            ms = (time.perf_counter() - t0) / args.iters * 1e3
            sent = x.numel() * x.element_size() * (u - 1) / u * chunks  # bytes leaving this rank per block
            if rank == 0:
                print(json.dumps({"world": u, "tokens": tokens, "kind": kind, "chunks": chunks,
                                  "mb_sent_per_block": round(sent / 1e6, 2), "ms_per_block": round(ms, 4),
                                  "algbw_gb_s": round(sent / ms / 1e6, 1),
                                  "device": torch.cuda.get_device_name() if cuda else "cpu"}), flush=True)
    bitwise_check(u, device, tokens, args)
    dist.destroy_process_group()
    return 0


def bitwise_check(u: int, device, tokens: int, args) -> None:
    """Ulysses over the world with the text cut with the image, as FLUX.1 runs: every piece count against 1."""
    from engine.attention import BACKENDS
    from engine.parallel.attention import JointSequenceParallelAttention, usable_chunks
    from engine.parallel.config import ParallelSpec
    from engine.parallel.mesh import get_mesh
    from engine.parallel.sharding import plan_shards

    mesh = get_mesh(ParallelSpec(ulysses=u))
    plan, text_plan = plan_shards(tokens - args.text_tokens, u), plan_shards(args.text_tokens, u)
    n = plan.sizes[mesh.sp.index] + text_plan.sizes[mesh.sp.index]
    g = torch.Generator(device).manual_seed(mesh.sp.index)
    qkv = [torch.randn(1, n, args.heads, args.head_dim, generator=g, device=device).to(torch.bfloat16)
           for _ in range(3)]
    backends = ["sdpa", "sdpa-cudnn"] if device.type == "cuda" else ["sdpa"]
    for backend in backends:
        outs = {}
        for chunks in [1, *args.chunks]:
            attn = JointSequenceParallelAttention(mesh, local_attention=BACKENDS[backend], ulysses_chunks=chunks)
            attn.configure(args.text_tokens, True, plan, text_plan)
            outs[chunks] = attn(*qkv)
        for chunks in args.chunks:
            same = torch.tensor([float(torch.equal(outs[chunks], outs[1]))], device=device)
            dist.all_reduce(same, op=dist.ReduceOp.MIN)  # bitwise on every rank
            if dist.get_rank() == 0:
                print(json.dumps({"world": u, "tokens": tokens, "backend": backend, "chunks": chunks,
                                  "pieces_used": usable_chunks(args.heads // u, chunks),
                                  "bitwise_vs_chunks1": bool(same.item())}), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a sequence-parallel forward's time goes: kernel time by kind (GEMM, attention, communication, other),
communication hidden under compute vs exposed, idle gaps, host time per forward, and what the compiler did
(graphs, graph breaks, recompiles). The model is built as `parity bench` builds it (weights synthesized on the
device, the family's bench inputs), then also run on one device with the same weights to give the forward's
cosine against it.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tools/sp_profile.py --parallel ulysses2 \
        --out reports/sp-profile
    # CPU check of the script itself (gloo, tiny model):
    python -m torch.distributed.run --standalone --nproc-per-node 2 tools/sp_profile.py --parallel ulysses2 \
        --device cpu --size tiny --height 64 --width 64 --text-tokens 8 --out /tmp/sp-profile

Kinds are read from CUDA kernel names (NCCL, cuDNN/flash attention, cuBLAS GEMMs; inductor's fused Triton kernels are
"other"); on CPU the script only checks itself (leaf ops are rarely GEMMs by name).
Writes OUT/<parallel>/summary_rank<r>.json, kernels_rank<r>.txt (the profiler's table) and, for rank 0,
trace_rank0.json.gz (chrome://tracing, Perfetto)."""
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

KINDS = (  # first match wins; lower-case substrings of kernel (CUDA) or op (CPU) names
    ("comm", ("nccl", "c10d", "gloo", "all_to_all", "alltoall", "all_gather", "allgather", "allreduce")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::linear", "matmul")),
)


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(key in low for key in keys):
            return k
    return "other"


def union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def overlap_us(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of (union a) intersected with (union b)."""
    return union_us(a) + union_us(b) - union_us(a + b)


def analyse(prof, iters: int, device: str) -> dict:
    from torch.autograd import DeviceType

    events = prof.events()
    forwards = [e for e in events if e.name == "sp_forward" and e.device_type == DeviceType.CPU]
    host_ms = sum(e.time_range.elapsed_us() for e in forwards) / 1e3 / max(len(forwards), 1)
    if device == "cuda":
        # Kernels and copies only: the GPU-side copies of user ranges (the whole `sp_forward`, nccl:all_to_all) span
        # their kernels, and counted as "other" they covered every collective (comm read as fully hidden).
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                   and e.name != "sp_forward"]
    else:  # CPU: the leaf ops stand for kernels (their self time would double-count parents)
        kernels = [e for e in events if e.device_type == DeviceType.CPU and not e.cpu_children
                   and e.name != "sp_forward"]
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for e in kernels:
        by_kind.setdefault(kind(e.name), []).append((e.time_range.start, e.time_range.end))
    everything = [iv for ivs in by_kind.values() for iv in ivs]
    compute = [iv for k, ivs in by_kind.items() if k != "comm" for iv in ivs]
    comm = by_kind.get("comm", [])
    span = (max(e for _, e in everything) - min(s for s, _ in everything)) if everything else 0.0
    busy = union_us(everything)
    per = lambda us: round(us / 1e3 / iters, 3)  # noqa: E731  (ms per forward)
    return {
        "forwards_profiled": iters,
        "host_ms_per_forward": round(host_ms, 3),
        "span_ms_per_forward": per(span),
        "busy_ms_per_forward": per(busy),
        "gap_ms_per_forward": per(span - busy),
        "kernel_ms_per_forward": {k: per(union_us(ivs)) for k, ivs in sorted(by_kind.items())},
        "comm_hidden_ms_per_forward": per(overlap_us(comm, compute)),
        "comm_exposed_ms_per_forward": per(union_us(comm) - overlap_us(comm, compute)),
        "kernel_count_per_forward": {k: len(ivs) // iters for k, ivs in sorted(by_kind.items())},
    }


def lse_kernel_check(device: str, dtype: torch.dtype) -> dict:
    """The ring's partial-attention kernel on this device against the fp64 twin, at FLUX.1-like shapes with uneven
    lengths: which kernel runs and its worst errors (out, lse). The same check as tests/test_parallel_attention.py's
    CUDA test, for machines without pytest."""
    from engine.parallel.kernels import cudnn_lse_supported, fused_attention_lse, lse_kernel, math_attention_lse

    g = torch.Generator(device).manual_seed(0)
    report = {"lse_kernel": lse_kernel(torch.device(device).type, dtype, 128, False,
                                       torch.device(device).type == "cuda" and cudnn_lse_supported())}
    for n_q, n_k in [(1024, 1536), (512, 1025), (77, 300)]:
        q, k, v = (torch.randn(1, n, 24, 128, generator=g, device=device).to(dtype) for n in (n_q, n_k, n_k))
        out, lse = fused_attention_lse(q, k, v)
        want, want_lse = math_attention_lse(q.double(), k.double(), v.double())
        report[f"lse_check_{n_q}x{n_k}"] = {"out_max_abs_err": (out.double() - want).abs().max().item(),
                                             "lse_max_abs_err": (lse.double() - want_lse).abs().max().item()}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux1")
    parser.add_argument("--parallel", default="ulysses2")
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true", help="eager blocks (default: blocks compiled)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--cuda-graphs", action="store_true", help="capture the forward in a CUDA graph (as the bench's "
                        "default mode does)")
    parser.add_argument("--ulysses-chunks", type=int, default=None,
                        help="pieces of each rank's heads for the Ulysses pipeline (default: the wrapper's)")
    parser.add_argument("--sp-overlap", action="store_true", help="OptimizeSpec.sp_overlap: the model's work "
                        "independent of attention under the Ulysses all-to-alls (as the bench's +sp_overlap)")
    parser.add_argument("--replicate-text-on-ring", action="store_true",
                        help="keep the text whole on every ring rank (default: cut, where the family allows it)")
    parser.add_argument("--out", default="reports/sp-profile")
    args = parser.parse_args(argv)

    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile, record_function

    from engine.api import OptimizeSpec, bench_inputs, bench_shape, build_denoiser, denoiser_names
    from engine.families import FAMILIES
    from engine.parallel.transformer import SequenceParallelTransformer
    from harness.zoo import synthesize_transformer_state_dict, transformer_config

    SequenceParallelTransformer.shard_text_with_ring = not args.replicate_text_on_ring
    if args.ulysses_chunks is not None:
        SequenceParallelTransformer.ulysses_chunks = args.ulysses_chunks
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device, dtype = f"cuda:{local}", torch.bfloat16
    else:
        torch.set_num_threads(1)
        device, dtype = "cpu", torch.float32
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    denoiser = denoiser_names(args.family)[0]
    tcfg = transformer_config(args.family, args.size, denoiser)
    sd = synthesize_transformer_state_dict(args.family, args.size, seed=0, device=device, dtype=dtype,
                                           denoiser=denoiser)
    spec = OptimizeSpec(compile_blocks=not args.no_compile, cuda_graphs=args.cuda_graphs, sp_overlap=args.sp_overlap)
    t0 = time.perf_counter()
    model, fwd = build_denoiser(args.family, denoiser, tcfg, sd, "none", spec, args.parallel, dtype, device)
    shape = bench_shape(height=args.height, width=args.width, text_tokens=args.text_tokens, batch=1, seed=0)
    inputs = bench_inputs(args.family, denoiser, tcfg, shape, dtype, device)
    with torch.no_grad():
        for _ in range(args.warmup):
            out = fwd(inputs)
        sync()
        build_s = time.perf_counter() - t0
        compiled = {"unique_graphs": counters["stats"]["unique_graphs"],
                    "graph_breaks": sum(counters["graph_break"].values()),
                    "graph_break_reasons": sorted({k.splitlines()[0][:160] for k in counters["graph_break"]})[:10],
                    "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                with record_function("sp_forward"):
                    out = fwd(inputs)
            sync()
        unique_after = counters["stats"]["unique_graphs"]
        # The same weights on this one device: the inner model with the local kernel instead of the SP backend.
        cosine = None
        inner = getattr(model, "inner", None)
        if inner is not None and hasattr(model, "sp_attention"):
            inner.attention = model.sp_attention.local_attention
            # A captured CUDA graph would replay the SP kernels whatever the attention says: the plain forward.
            graphed = inner.__dict__.pop("forward", None)
            try:
                single = FAMILIES[args.family].denoiser_forward(inner, inputs)
            finally:
                inner.attention = model.sp_attention
                if graphed is not None:
                    inner.forward = graphed
            cosine = torch.nn.functional.cosine_similarity(out.double().flatten(), single.double().flatten(),
                                                           dim=0).item()
    kernel_check = lse_kernel_check(device, dtype)
    summary = {"parallel": args.parallel, "rank": rank, "family": args.family, "size": args.size,
               "height": args.height, "width": args.width, "text_tokens": args.text_tokens,
               "compiled_blocks": not args.no_compile, "cuda_graphs": args.cuda_graphs,
               "shard_text": getattr(model, "shard_text", None),
               "ulysses_chunks": getattr(getattr(model, "sp_attention", None), "ulysses_chunks", None),
               "sp_overlap": args.sp_overlap,
               "build_and_warmup_s": round(build_s, 1), **compiled,
               "new_graphs_while_profiled": unique_after - compiled["unique_graphs"],
               "output_cosine_vs_one_device": cosine, **analyse(prof, args.iters, args.device), **kernel_check,
               "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__}
    variant = ("+textrep" if args.replicate_text_on_ring else "") + \
        (f"+chunks{args.ulysses_chunks}" if args.ulysses_chunks is not None else "")
    out_dir = Path(args.out) / (args.parallel + variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"summary_rank{rank}.json").write_text(json.dumps(summary, indent=1))
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    # Every kernel, not the top 40: a cut table hid most of the small copies whose sum is the 'other' kind.
    (out_dir / f"kernels_rank{rank}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=-1))
    if rank == 0:
        prof.export_chrome_trace(str(out_dir / "trace_rank0.json.gz"))
        print(json.dumps(summary, indent=1), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

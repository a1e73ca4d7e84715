"""The W4A16 kernel (engine/quant/w4a16.py) against torch's bf16 matmul on FLUX.1's GEMM shapes at 1024px, on one GPU.

    python tools/w4a16_bench.py [--m 4608] [--formats nvfp4 mxfp4] [--shapes 9216x3072 ...]

Per format and (N, K): TFLOP/s of F.linear(x, W_bf16, bias) (cuBLAS, the bf16 engine's GEMM), of the eager FP4
weight-only linear (whole-weight dequantize + F.linear: what the kernel replaces) and of the kernel (autotuned on
its first call, outside the timing); then whether the kernel's output matches F.linear on the same dequantized
bf16 weight: `ulp_max` is the largest element difference in bf16 ulps of that element, `match` says it is within
the bound the CPU tests assert (1 ulp: both are float32 sums of the same exact products, rounded once) and
`rel_err` the kernel's relative error against a float32 matmul of the same operands. Prints one line per shape."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.quant import w4a16  # noqa: E402
from engine.quant.linear import LinearOptions, MXFP4Linear, NVFP4Linear  # noqa: E402

# FLUX.1-dev's linears at 1024px (4096 image + 512 text tokens): (N, K) of fused QKV, attention out, MLP up / down,
# single-stream linear1 (QKV + MLP up) and linear2 (attention out + MLP down).
FLUX_SHAPES = ((9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360))
ULP_BOUND = 1


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 ulps of the larger magnitude, per element."""
    mag = torch.maximum(a.float().abs(), b.float().abs()).clamp(min=2.0**-126)
    return (a.float() - b.float()).abs() / torch.exp2(torch.floor(torch.log2(mag)) - 7)


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def run_shape(fmt: str, m: int, n: int, k: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) * 0.1
    cls = NVFP4Linear if fmt == "nvfp4" else MXFP4Linear
    lin = cls.from_float(w, bias, (n,), torch.bfloat16, LinearOptions(act=False))
    del w
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w_bf16 = lin.dequantize_weight().to(torch.bfloat16)
    scale = lin.weight_scale.view(torch.uint8)
    g2 = lin._row_scale_2().contiguous() if fmt == "nvfp4" else None
    code = w4a16.NVFP4 if fmt == "nvfp4" else w4a16.MXFP4

    def kernel():
        return w4a16.w4a16_matmul(x, lin.qweight, scale, g2, lin.bias, code)

    start = time.perf_counter()
    got = kernel()  # autotunes
    torch.cuda.synchronize()
    tune_s = time.perf_counter() - start
    want = F.linear(x, w_bf16, lin.bias)
    exact = x.float() @ w_bf16.float().t() + lin.bias.float()
    diff = ulps(got, want)
    flop = 2.0 * m * n * k
    times = {"bf16": bench_ms(lambda: F.linear(x, w_bf16, lin.bias)), "eager_wo": bench_ms(lambda: lin(x)),
             "kernel": bench_ms(kernel)}
    return {"fmt": fmt, "n": n, "k": k, **{f"{name}_tflops": flop / t / 1e9 for name, t in times.items()},
            "kernel_vs_bf16": times["bf16"] / times["kernel"], "ulp_max": diff.max().item(),
            "differ_frac": (diff > 0).float().mean().item(),
            "rel_err": ((got.float() - exact).norm() / exact.norm()).item(), "match": diff.max().item() <= ULP_BOUND,
            "tune_s": tune_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=4608, help="rows (tokens); FLUX.1 at 1024px: 4096 + 512")
    parser.add_argument("--formats", nargs="+", default=["nvfp4", "mxfp4"], choices=["nvfp4", "mxfp4"])
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in FLUX_SHAPES], help="NxK ...")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("w4a16_bench needs a CUDA device", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  M={args.m}")
    print(f"{'fmt':6} {'N':>6} {'K':>6} {'bf16 TF/s':>10} {'eager-wo':>9} {'kernel':>8} {'k/bf16':>7} "
          f"{'ulp_max':>8} {'differ':>8} {'rel_err':>9} {'match':>6} {'tune_s':>7}")
    ok = True
    for fmt in args.formats:
        for n, k in shapes:
            r = run_shape(fmt, args.m, n, k)
            ok &= r["match"]
            print(f"{fmt:6} {n:>6} {k:>6} {r['bf16_tflops']:>10.0f} {r['eager_wo_tflops']:>9.0f} "
                  f"{r['kernel_tflops']:>8.0f} {r['kernel_vs_bf16']:>7.2f} {r['ulp_max']:>8.2f} "
                  f"{r['differ_frac']:>8.1e} {r['rel_err']:>9.2e} {str(r['match']):>6} {r['tune_s']:>7.1f}", flush=True)
            torch.cuda.empty_cache()
    print("all outputs within", ULP_BOUND, "bf16 ulp of F.linear" if ok else "SOME OUTPUTS OUTSIDE THE BOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""W4A16: out = x @ W^T + bias with W kept packed as FP4 (NVFP4 or MXFP4) and x in bf16 / fp16, in one Triton kernel.

Hopper has no FP4 tensor cores, so a weight-only FP4 linear either dequantizes its whole weight every call (the
eager path in engine/quant/linear.py: one float32 copy of W written and read per call) or, here, dequantizes each
[BLOCK_N, BLOCK_K] weight tile in registers right before the tensor-core dot. Each tile equals the eager
`dequantize_weight().to(x.dtype)` bit for bit (same two float32 products, in the same order, rounded once to the
activation dtype):
  NVFP4  w = (e2m1 * e4m3 block scale) * fp32 global scale of the row's segment; e2m1 * e4m3 is exact in float32
  MXFP4  w = e2m1 * 2^(e - 127)
The e2m1 decode is bit arithmetic, no table: the 3 magnitude bits shifted into an fp16's exponent/mantissa give
e2m1 / 2^14 exactly (codes 0 and 1 become fp16 subnormals, which fp16 -> fp32 conversion keeps), and the sign bit
moves to bit 15; the 2^14 is folded into the per-block scale (a power of two: exact). The E4M3 and E8M0 scales are
passed as uint8 and decoded the same way, so nothing depends on Triton's fp8 types (the Triton interpreter, which
runs these kernels on CPU for the tests, has none). Only tl APIs present since Triton 3.0 are used: the GPU image
runs torch 2.11 with an older Triton than the CPU virtualenv. Nor does the kernel call tl's own @jit helpers (tl.cdiv,
tl.zeros): decorated when triton was imported, before a test turned the interpreter on, they refuse to run in it.

The kernel is wrapped as the custom op `parity::w4a16_linear` with a fake implementation, so torch.compile traces
a block through it (the op is opaque to inductor) and a CUDA graph captures its launch. The kernel object is built
on first use, not at import: triton.jit chooses between the GPU compiler and the interpreter (TRITON_INTERPRET=1)
when it decorates, and importing this module must not fix that choice for the process.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

NVFP4, MXFP4 = 0, 1  # the FORMAT constexpr
SCALE_BLOCK = {NVFP4: 16, MXFP4: 32}
# Autotuned on CUDA (keyed on M, N, K): FLUX.1's GEMMs at 1024px are M = 4096-4608 rows, N, K in 3072..21504, so
# compute-bound. Each weight tile is dequantized once per BLOCK_M rows: the 256-row tiles halve that work per MAC.
# SWAP_AB (see the kernel): compiled for sm90 by Triton 3.8, the swapped kernel dequantizes straight into wgmma's
# register operand and keeps one wgmma in flight (wait pendings=1) while the next tile is decoded; the unswapped one
# stores each tile to shared memory and waits for every wgmma. Both are offered: older Tritons may differ. None of
# these spills registers on sm90 (ptxas via Triton 3.8; BLOCK_K 128 with BLOCK_N 256 swapped did: left out).
CUDA_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP_AB)
    (128, 256, 64, 8, 3, True), (128, 256, 64, 8, 4, True), (256, 128, 64, 8, 3, True), (128, 128, 64, 4, 4, True),
    (128, 256, 64, 8, 3, False), (256, 128, 64, 8, 3, False), (128, 128, 64, 4, 4, False),
]
# Without autotuning (the interpreter; CUDA with K not a multiple of 64): BLOCK_M and BLOCK_N are powers of two from
# 16 up to these caps, no larger than the problem (the interpreter runs each program's ops in numpy: few tiles are
# fast; tests pin small ones to get several); BLOCK_K from block_k().
PROBLEM_TILE_CAPS = (64, 1024)


def _pow2_tile(rows: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(rows)))


def block_k(k: int, cap: int = 512) -> int:
    """The largest BLOCK_K <= cap that divides K (K is a multiple of 16 for NVFP4, 32 for MXFP4)."""
    return next(b for b in (512, 256, 128, 64, 32, 16) if b <= cap and k % b == 0)


def _fits_k(configs, named_args, **kwargs):
    """Autotune candidates whose BLOCK_K divides K (the kernel has no K mask)."""
    return [c for c in configs if named_args["K"] % c.kwargs["BLOCK_K"] == 0]


def interpreting() -> bool:
    """Whether triton.jit builds interpreted kernels now (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones (the GPU image's) read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def w4a16_kernel(x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, out_ptr, M, N, K, g_stride, stride_xm, stride_om,
                 FORMAT: tl.constexpr, SB: tl.constexpr, HAS_BIAS: tl.constexpr, WIDEN_DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 SWAP_AB: tl.constexpr):
    # SB: elements per block scale (NVFP4 16, MXFP4 32). SWAP_AB: compute out^T = W x^T, so the dequantized tile is
    # the dot's first operand, which Hopper's wgmma reads from registers (the second must be in shared memory).
    # Grouped tile order: GROUP_M row tiles walk the same column tiles, so those weight tiles stay in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_safe = tl.where(rn < N, rn, 0)  # out-of-range weight rows read row 0; their columns are never stored
    rk = tl.arange(0, BLOCK_K)
    rk2 = tl.arange(0, BLOCK_K // 2)
    rks = tl.arange(0, BLOCK_K // SB)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_safe[:, None] * (K // 2) + rk2[None, :]
    s_ptrs = s_ptr + rn_safe[:, None] * (K // SB) + rks[None, :]
    g = tl.load(g_ptr + rn_safe * g_stride)  # NVFP4: the fp32 global scale of each row's segment
    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (the wrapper checks)
        x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        packed = tl.load(w_ptrs)
        sbits = tl.load(s_ptrs).to(tl.int32)
        # Element 2i is the low nibble of byte i (engine/quant/formats/e2m1.py).
        codes = tl.join(packed & 0xF, packed >> 4).reshape(BLOCK_N, BLOCK_K).to(tl.int16)
        half = (((codes & 8) << 12) | ((codes & 7) << 9)).to(tl.float16, bitcast=True)
        values = half.to(tl.float32)  # e2m1 / 2^14, exact
        if FORMAT == 0:
            # E4M3: exponent bias 7, 3 mantissa bits; exponent field 0 is subnormal man * 2^-9. Scales are
            # positive and never NaN (quantize clamps them to [tiny, 448]).
            exp, man = (sbits >> 3) & 0xF, sbits & 7
            normal = ((exp + 120) << 23 | man << 20).to(tl.float32, bitcast=True)
            scale = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
        else:
            # E8M0: 2^(e - 127), built from the exponent bits; e = 0 is the float32 subnormal 2^-127.
            scale = tl.where(sbits == 0, (sbits + (1 << 22)).to(tl.float32, bitcast=True),
                             (sbits << 23).to(tl.float32, bitcast=True))
        # 2^14: see the e2m1 decode above. Exact while the block scale stays a normal float32 times 2^14, i.e. for
        # MXFP4 block exponents in [2^-126, 2^114]: weights of any trained network.
        scale = scale * 16384.0
        w = values.reshape(BLOCK_N, BLOCK_K // SB, SB) * scale[:, :, None]
        w = w.reshape(BLOCK_N, BLOCK_K)
        if FORMAT == 0:
            w = w * g[:, None]
        if WIDEN_DOT:
            # The Triton interpreter (3.8 at least) multiplies bf16 operands as their raw uint16 bits, and its
            # float32 -> bf16 cast truncates. So there the tile is rounded to bf16 (nearest even, as torch's
            # .to(bfloat16) and the GPU cast do) in integer arithmetic and kept in float32, and both operands go to
            # the dot widened to float32: exact, and a bf16 MMA also forms exact products summed in float32.
            bits = w.to(tl.int32, bitcast=True)
            w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            if SWAP_AB:
                acc = tl.dot(w, tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        elif SWAP_AB:
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // SB
    if SWAP_AB:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn_safe).to(tl.float32)[None, :]
    if WIDEN_DOT:  # the interpreter's truncating cast, as above
        bits = acc.to(tl.int32, bitcast=True)
        acc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@functools.cache
def _kernel(interpret: bool):
    """The kernel, decorated once per mode: autotuned over CUDA_CONFIGS on a GPU, plain under the interpreter."""
    del interpret  # the cache key: knobs.runtime.interpret decides what triton.jit builds
    kernel = triton.jit(w4a16_kernel)
    if interpreting():
        return kernel
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SWAP_AB": swap},
                             num_warps=w, num_stages=s) for bm, bn, bk, w, s, swap in CUDA_CONFIGS]
    tune = triton.autotune(configs=configs, key=["M", "N", "K"], prune_configs_by={"early_config_prune": _fits_k})
    return tune(kernel)


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, fmt: int, tiles: tuple[int, int, int, bool] | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16, packed uint8 [N, K/2], scale uint8 [N, K/SB] (E4M3 or E8M0 bits), global_scale fp32 [1]
    or [N] (NVFP4; None for MXFP4), bias [N] or None -> [M, N] in x's dtype. tiles: (BLOCK_M, BLOCK_N, BLOCK_K,
    SWAP_AB) to pin them (tests); None autotunes on CUDA where a config fits K, else sizes tiles to the problem."""
    m, k = x.shape
    n = packed.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"w4a16 takes bf16 or fp16 activations, got {x.dtype}")
    if packed.shape != (n, k // 2) or scale.shape != (n, k // SCALE_BLOCK[fmt]) or scale.dtype != torch.uint8:
        raise ValueError(f"w4a16: packed {tuple(packed.shape)} / scale {tuple(scale.shape)} {scale.dtype} do not fit "
                         f"x {tuple(x.shape)} (expected uint8 [{n}, {k // 2}] and uint8 [{n}, {k // SCALE_BLOCK[fmt]}])")
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    g = global_scale if global_scale is not None else torch.ones(1, dtype=torch.float32, device=x.device)
    args = (x, packed.contiguous(), scale.contiguous(), g, bias if bias is not None else out, out, m, n, k,
            0 if g.numel() == 1 else 1, x.stride(0), out.stride(0))
    flags = {"FORMAT": fmt, "SB": SCALE_BLOCK[fmt], "HAS_BIAS": bias is not None,
             "WIDEN_DOT": interpreting() and x.dtype == torch.bfloat16}
    kernel = _kernel(interpreting())
    if tiles is None and not interpreting() and k % min(c[2] for c in CUDA_CONFIGS) == 0:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](*args, **flags)
        return out
    # Swapped on a GPU (see CUDA_CONFIGS); unswapped in the interpreter, where it measured 2x faster.
    bm, bn, bk, swap = tiles or (_pow2_tile(m, PROBLEM_TILE_CAPS[0]), _pow2_tile(n, PROBLEM_TILE_CAPS[1]), block_k(k),
                                 not interpreting())
    if k % bk:
        raise ValueError(f"w4a16 BLOCK_K {bk} does not divide K = {k}")
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # pinned tiles bypass the autotuner
    fn[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4,
                                                    SWAP_AB=swap)
    return out


@torch.library.custom_op("parity::w4a16_linear", mutates_args=())
def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, fmt: int) -> torch.Tensor:
    """x [..., K] -> [..., N]: the custom op torch.compile sees (see w4a16_matmul)."""
    out = w4a16_matmul(x.reshape(-1, x.shape[-1]), packed, scale, global_scale, bias, fmt)
    return out.reshape(*x.shape[:-1], packed.shape[0])


@w4a16_linear.register_fake
def _(x, packed, scale, global_scale, bias, fmt):
    return x.new_empty(*x.shape[:-1], packed.shape[0])

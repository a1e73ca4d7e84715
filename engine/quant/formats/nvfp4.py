"""NVFP4 as exported by NVIDIA ModelOpt: E2M1 elements, an E4M3 scale per 16 elements along K, and an fp32
global scale per tensor.

    weight_scale_2 = amax(W) / (6 * 448)                              (fp32 scalar)
    weight_scale   = e4m3(block_amax / 6 / weight_scale_2)            ([N, K/16], row-major)
    W             ~= e2m1 * weight_scale * weight_scale_2

Quantization multiplies by the reciprocal of the combined scale, x * ((1/scale_2) / scale), as torchao's
`nvfp4_quantize` (our bit-exact oracle) and the MSLK kernel do. ModelOpt divides, x / (scale * scale_2); the two
differ only when a value lands within one ulp of an E2M1 rounding boundary. Zero blocks get the smallest E4M3
subnormal as their scale (torchao); ModelOpt writes 1.0 there. Either way their codes and values are 0.
"""
from __future__ import annotations

import torch

from engine.quant.formats import e2m1, fp8

BLOCK = 16
GLOBAL_DENOM = e2m1.MAX * fp8.MAX  # 2688: a block holding the tensor's amax gets the largest E4M3 scale, 448
E4M3_TINY = torch.finfo(torch.float8_e4m3fn).tiny
MIN_GLOBAL = 1e-30  # an all-zero tensor: keeps 1/scale_2 finite


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax (any shape) -> fp32 global scale amax / (6 * 448); also the meaning of ModelOpt's input_scale."""
    return (amax.float() / GLOBAL_DENOM).clamp(min=MIN_GLOBAL)


def _scale_and_codes(x: torch.Tensor, scale_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float, scale_2 broadcastable to [..., 1] -> (E4M3 block scales [..., K/16], codes [..., K])."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))
    block_scale = blocks.abs().amax(dim=-1) / e2m1.MAX
    scale_2 = scale_2.float().unsqueeze(-1)
    scale = (block_scale / scale_2).clamp(min=E4M3_TINY, max=fp8.MAX).to(torch.float8_e4m3fn)
    scaled = blocks * ((1.0 / scale_2) / scale.float()).unsqueeze(-1)
    return scale, e2m1.encode(scaled.clamp(-e2m1.MAX, e2m1.MAX)).flatten(-2)


def quantize(w: torch.Tensor, scale_2: torch.Tensor | None = None):
    """One source tensor W [N, K] -> (packed uint8 [N, K/2], weight_scale e4m3 [N, K/16], weight_scale_2 fp32 [])."""
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"NVFP4 quantizes a 2-D weight with K divisible by {BLOCK}, got {tuple(w.shape)}")
    scale_2 = global_scale(w.abs().amax()) if scale_2 is None else scale_2.float().reshape(())
    scale, codes = _scale_and_codes(w, scale_2.expand(w.shape[0], 1).squeeze(-1))
    return e2m1.pack(codes), scale, scale_2


def block_scale_layout(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A weight_scale as stored (checkpoint, or quantize's output) -> [N, K/16] with rows along N. Called once,
    when a module is built; stored scales are row-major, so this is a reshape.
    Planted-bug point: `scale.reshape(k // BLOCK, n).t()` reads them as column-major."""
    return scale.reshape(n, k // BLOCK)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """packed [N, K/2], weight_scale [N, K/16], scale_2 (scalar, or [N] per-row for fused modules) -> fp32 [N, K].

    (codes * scale) is exact in fp32 (3 + 2 mantissa bits), so the result is rounded once, by the global scale.
    Planted-bug point for a dropped global scale: wrap this and pass ones for scale_2."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if scale.shape != (n, k // BLOCK):
        raise ValueError(f"NVFP4 weight_scale must be [{n}, {k // BLOCK}], got {tuple(scale.shape)}")
    values = e2m1.decode(e2m1.unpack(packed)).view(n, k // BLOCK, BLOCK) * scale.float().unsqueeze(-1)
    return (values * scale_2.float().reshape(-1, 1, 1)).reshape(n, k)


def quantize_dequantize(x: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """Activation fake-quant for emulated W4A4: x [..., K] through NVFP4 with global scale `scale_2` (a scalar
    tensor: ModelOpt's calibrated input_scale, or a dynamic amax(x)/(6*448)). Returns float32."""
    scale, codes = _scale_and_codes(x, scale_2.float().reshape(()).expand(x.shape[:-1]))
    values = e2m1.decode(codes).unflatten(-1, (-1, BLOCK)) * scale.float().unsqueeze(-1)
    return (values * scale_2.float().reshape(())).flatten(-2)

"""MXFP4 (OCP Microscaling v1.0): 32 E2M1 elements share one E8M0 scale 2^(e - 127).

Scale rule, pinned: e = floor(log2(block_amax)) - 2, the spec's section 6.3 rule and torchao's
ScaleCalculationMode.FLOOR (2 = floor(log2(6)), the largest power of two E2M1 holds). With X = 2^e a block's
amax / X lies in [4, 8): values between 6X and 8X clip to 6X. Other implementations round the scale up (ceil,
rceil) or round amax first (even); they are not interchangeable with this one.
"""
from __future__ import annotations

import torch

from engine.quant.formats import e2m1

BLOCK = 32
BIAS = 127
E2M1_MAX_POW2 = 2
F32_MIN_NORMAL = 2.0**-126  # a zero block's 2^-127 scale is a float32 subnormal: divide by this instead (torchao)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) of positive float32 read from the exponent bits (exact; 0 and subnormals give -127)."""
    return ((x.float().view(torch.int32) >> 23) & 0xFF) - BIAS


def shared_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Unbiased block exponent e, int32. Planted-bug point: an off-by-one here doubles or halves every scale."""
    return floor_log2(amax) - E2M1_MAX_POW2


def _scale_and_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (biased E8M0 exponents uint8 [..., K/32], codes uint8 [..., K])."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))
    exp = shared_exponent(blocks.abs().amax(dim=-1)).clamp(-BIAS, BIAS)
    biased = (exp + BIAS).to(torch.uint8)
    divisor = torch.exp2(exp.float()).clamp(min=F32_MIN_NORMAL).unsqueeze(-1)
    return biased, e2m1.encode((blocks / divisor).clamp(-e2m1.MAX, e2m1.MAX)).flatten(-2)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (packed uint8 [N, K/2], scale uint8 [N, K/32] holding biased E8M0 exponents)."""
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"MXFP4 quantizes a 2-D weight with K divisible by {BLOCK}, got {tuple(w.shape)}")
    scale, codes = _scale_and_codes(w)
    return e2m1.pack(codes), scale


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponents (uint8, or float8_e8m0fnu viewed as uint8) -> float32 2^(e - 127)."""
    return torch.exp2(scale.view(torch.uint8).float() - BIAS)


def dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """packed [N, K/2], scale [N, K/32] -> float32 [N, K]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    values = e2m1.decode(e2m1.unpack(packed)).view(n, k // BLOCK, BLOCK)
    return (values * scale_values(scale).view(n, k // BLOCK, 1)).reshape(n, k)


def quantize_dequantize(x: torch.Tensor) -> torch.Tensor:
    """Activation fake-quant for emulated W4A4: x [..., K] through MXFP4, returned as float32."""
    scale, codes = _scale_and_codes(x)
    values = e2m1.decode(codes).unflatten(-1, (-1, BLOCK)) * scale_values(scale).unsqueeze(-1)
    return values.flatten(-2)

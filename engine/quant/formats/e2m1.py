"""FP4 E2M1 elements, shared by NVFP4 and MXFP4: 1 sign bit (bit 3), 2 exponent bits, 1 mantissa bit.

Magnitude codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6; there is no inf or NaN, so encoding saturates at 6.
Two codes are packed per byte with element 2i in the LOW nibble (ModelOpt's and torchao's layout).
"""
from __future__ import annotations

import torch

MAX = 6.0
VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7
# Midpoints between neighbouring magnitudes. Round-to-nearest-even: a value exactly on a midpoint goes to the
# neighbour whose code is even (its mantissa bit is 0), so midpoints after an even code round down (strict >)
# and midpoints after an odd code round up (>=).
_MID_AFTER_EVEN = (0.25, 1.25, 2.5, 5.0)
_MID_AFTER_ODD = (0.75, 1.75, 3.5)


def encode(x: torch.Tensor) -> torch.Tensor:
    """float32 values already divided by their scale -> uint8 codes 0..15 (saturating, RNE, sign of -0 kept)."""
    mag = x.abs().clamp(max=MAX)
    even = torch.tensor(_MID_AFTER_EVEN, dtype=mag.dtype, device=mag.device)
    odd = torch.tensor(_MID_AFTER_ODD, dtype=mag.dtype, device=mag.device)
    # bucketize(right=False) counts boundaries strictly below the value, right=True those at or below it.
    code = torch.bucketize(mag, even, right=False) + torch.bucketize(mag, odd, right=True)
    return (code | (torch.signbit(x).to(code.dtype) << 3)).to(torch.uint8)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> float32 values. Arithmetic rather than a lookup table, so no per-call host tensor."""
    c = codes.to(torch.int32)
    exp, man = (c >> 1) & 3, (c & 1).to(torch.float32)
    # exp 0 is the subnormal 0 / 0.5; otherwise 2^(exp-1) * (1 + man/2).
    mag = torch.where(exp == 0, 0.5 * man, torch.exp2((exp - 1).to(torch.float32)) * (1.0 + 0.5 * man))
    return torch.where((c & 8) != 0, -mag, mag)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> bytes [..., K/2], element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing FP4 needs an even last dim, got {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., K/2] -> codes [..., K]. Planted-bug point: swapping the two nibbles here swaps neighbours."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Convert an export that stores element 2i in the HIGH nibble to the canonical layout (and back)."""
    return (packed >> 4) | (packed << 4)

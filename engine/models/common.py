"""Layers shared by the DiT families, as plain functions where they hold no weights.

Numerics follow the reference implementations operation by operation (which dtype each step runs in), because
a bf16 parity gate sees every reordering. Where we deliberately differ, the comment says so.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of (already scaled) timesteps, [cos | sin] order, float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-axis RoPE tables for position ids (S, n_axes): cos and sin of shape (S, sum(axes_dims)), float32.

    Frequencies are computed in float64 (on devices that have it) and each pair of channels shares one angle
    (interleaved layout), as the original rotary DiT code pairs them."""
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(f"position ids have {ids.shape[-1]} axes but axes_dims has {len(axes_dims)}")
    freq_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    pos = ids.float()
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dims):
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freq_dtype, device=ids.device) / dim))
        angles = torch.outer(pos[:, axis], inv)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, S, H, D) by tables (S, D); math in float32, result in x.dtype."""
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _hooked(module: nn.Module) -> bool:
    from torch.nn.modules import module as M

    return bool(module._forward_pre_hooks or module._forward_hooks or M._global_forward_pre_hooks
                or M._global_forward_hooks)


def linear_rows(linear: nn.Module, lo: int, hi: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x -> linear(x)[..., lo:hi], computed as its own GEMM over weight rows lo:hi (a fused projection cut so that
    one part can run while another part's consumer waits). Each output element is the same dot product as in the
    whole GEMM: the same bits on CPU (tests/test_parallel_overlap.py); a GPU library may pick another kernel for the
    narrower GEMM, so there the last bits may differ. None for anything but a plain nn.Linear (a quantized linear
    keeps its packed weight whole), and for a linear with forward hooks, its own or global ones (calibration, the
    quant oracle and sensitivity probes watch linears' inputs with them; a cut GEMM never calls the module): the
    caller then runs the linear whole."""
    if type(linear) is not nn.Linear or _hooked(linear):
        return None
    weight, bias = linear.weight[lo:hi], None if linear.bias is None else linear.bias[lo:hi]
    return lambda x: F.linear(x, weight, bias)


def linear_pieces(linear: nn.Module, x: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """A fused projection's output cut into pieces of `sizes` along the last dim (q, k, v; SwiGLU's two halves).
    Eager on a plain nn.Linear: one GEMM per piece over its weight rows (linear_rows), so every piece is contiguous.
    Pieces split off one GEMM are strided views, and CUDA's elementwise kernels read them in their slow
    non-vectorized form: on an H200 that made the eager engine 3.5-4.5% slower than eager diffusers, whose projections
    are separate linears (at 1024 px a single-stream block's GELU took 6.4 ms against 2.6, a SwiGLU's SiLU 4.0 against
    1.5; README "On a GPU"). Compiled, on a quantized linear (its packed weight stays whole) or a hooked one
    (linear_rows): one GEMM, split; inductor fuses the strided reads into the kernels that consume them. The same
    bits either way on CPU."""
    if not torch.compiler.is_compiling():
        bounds = [0, *itertools.accumulate(sizes)]
        rows = [linear_rows(linear, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        if None not in rows:
            return [f(x) for f in rows]
    return list(linear(x).split(list(sizes), dim=-1))


def qkv_heads(linear: nn.Module, x: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """q, k, v of a fused QKV projection (linear_pieces), each (..., heads, head_dim)."""
    d = linear.out_features // 3
    return [t.unflatten(-1, (heads, -1)) for t in linear_pieces(linear, x, (d, d, d))]


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale (torch.nn.RMSNorm numerics)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: timestep, guidance and pooled-text embedders."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GeluMLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class RoundedRMSNorm(nn.Module):
    """RMS norm with the diffusers reference's roundings: normalized in float32, cast to a half-precision weight's
    dtype, then scaled. torch's fused F.rms_norm rounds once at the end and differs in bf16 (measured: 0.0156 max),
    so the families that are bitwise equal to their reference in bf16 use this one."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight

"""Attention that also returns its log-sum-exp, and the rule that merges two partial attentions. Pure functions on
(B, S, H, D) tensors, no communication: the ring algorithm is built from these, and they are tested alone.

A partial attention over a key block is (out, lse): out = softmax(scores over the block) @ V and lse the log of the
block's softmax denominator, per (batch, query, head). Two partials over disjoint key blocks combine exactly into the
attention over their union; `merge_partials` does it in the stable form (no exp of an lse, so blocks whose lse differ
by hundreds neither overflow nor lose the smaller block to 0 * inf)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# (q, k, v[, key_mask]) (B, S, H, D) -> (out (B, Sq, H, D) float32, lse (B, Sq, H, 1) float32). key_mask: an
# optional boolean (B, Sk), False = a key no query may attend to (padded text).
LseAttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def key_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, Sk) key mask -> additive (B, 1, 1, Sk) bias: 0 where attended, -inf where masked (the form the
    fused CPU kernel takes; a boolean mask it refuses)."""
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill(~key_mask.bool(), float("-inf"))[:, None, None, :]


def math_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The obviously-right twin: explicit scores in float32 (float64 stays float64, for references)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * q.shape[-1] ** -0.5
    if key_mask is not None:
        scores = scores + key_bias(key_mask, acc)
    lse = scores.logsumexp(dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (scores - lse[..., None]).exp(), v.to(acc))
    return out, lse.transpose(1, 2)[..., None]


@torch.compiler.assume_constant_result
def cudnn_lse_supported() -> bool:
    """Whether this process's torch can run cuDNN's fused attention (cuDNN 9 or later). A constant for the
    compiler: it is asked while tracing and never changes within a process."""
    return bool(torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000)


def lse_kernel(device_type: str, dtype: torch.dtype, head_dim: int, masked: bool, cudnn_ok: bool) -> str:
    """Which kernel fused_attention_lse runs. On CUDA, 16-bit and unmasked: cuDNN's fused attention (~560 TFLOP/s
    on H100 against ~300 for FlashAttention-2, the kernel compiled SDPA already picks on one device), where cuDNN 9
    and the head size (a multiple of 8, at most 128) allow it, else flash. fp32 on CUDA: the memory-efficient
    kernel (neither has fp32). CPU: its flash kernel, masked or not (the mask as an additive bias). A masked call
    on CUDA, and any other device: the explicit twin."""
    if masked:
        return "cpu-flash" if device_type == "cpu" else "math"
    if device_type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            return "cudnn" if cudnn_ok and head_dim % 8 == 0 and head_dim <= 128 else "flash"
        return "efficient"
    return "cpu-flash" if device_type == "cpu" else "math"


def fused_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused kernels, which return the lse alongside the output; `lse_kernel` says which one runs."""
    on_cuda_16bit = q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
    kernel = lse_kernel(q.device.type, q.dtype, q.shape[-1], key_mask is not None,
                        cudnn_lse_supported() if on_cuda_16bit else False)
    if kernel == "math":
        return math_attention_lse(q, k, v, key_mask)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kernel == "cudnn":
        # cuDNN through the aten op needs contiguous (B, H, S, D) inputs (other strides give wrong results).
        qt, kt, vt = qt.contiguous(), kt.contiguous(), vt.contiguous()
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)[:2]
        lse = lse.reshape(lse.shape[:3])  # (B, H, S, 1) from torch 2.9 on, (B, H, S) before
    elif kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    elif kernel == "efficient":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        # The memory-efficient kernel pads lse's query dim to a multiple of 32: keep the real queries only.
        lse = lse[..., : q.shape[1]]
    else:
        bias = None if key_mask is None else key_bias(key_mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, attn_mask=bias)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.transpose(1, 2).to(acc), lse.transpose(1, 2)[..., None].to(acc)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """(out, lse) of keys A and (block_out, block_lse) of disjoint keys B -> (out, lse) of A u B.

    lse' = log(e^lse + e^blse) = lse - logsigmoid(lse - blse);  out' = out - sigmoid(blse - lse) * (out - bout),
    i.e. the convex combination weighted by each block's share of the softmax mass, without forming e^lse."""
    block_out, block_lse = block_out.to(out.dtype), block_lse.to(lse.dtype)
    new_out = out - torch.sigmoid(block_lse - lse) * (out - block_out)
    new_lse = lse - F.logsigmoid(lse - block_lse)
    return new_out, new_lse


def merge_ordered(partials: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold partials left to right; every rank folding the same list in the same order gets the same bits."""
    out, lse = partials[0]
    for block_out, block_lse in partials[1:]:
        out, lse = merge_partials(out, lse, block_out, block_lse)
    return out, lse

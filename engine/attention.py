"""Attention backends, chosen by name. Models call `self.attention(q, k, v)` on (B, S, H, D) tensors; the
backend is an attribute of the model, so sequence parallelism (or a faster kernel) is swapped in after the
model is built without touching model code."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (q, k, v, key_mask) -> out: attention with a boolean (B, S_k) key mask (False = never attended, e.g. padded text).
MaskedAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Work a model hands to one attention call: callables that neither feed the attention nor read its output (FLUX.1's
# single-stream block: the MLP input projection). A backend that moves data (sequence-parallel all-to-alls) runs
# them while its transfers are in flight; any other backend after the attention (attend_beside).
IndependentWork = Sequence[Callable[[], torch.Tensor]]


def hides_work(attention) -> bool:
    """Whether `attention` runs independent work under its own communication (a backend says so with a true
    `hides_work` attribute). A model asks before cutting a fused projection into the pieces it hands over: where
    nothing is in flight, one larger GEMM is at least as fast, so the projection stays whole."""
    return bool(getattr(attention, "hides_work", False))


def attend_beside(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  work: IndependentWork) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """attention(q, k, v), and every callable of `work` called once, in order: (attention output, their results).
    The same bits as calling them one after the other: the work reads nothing the attention writes. A backend that
    hides work does it in its `attend_beside(q, k, v, work)`, with the same contract."""
    if hides_work(attention):
        return attention.attend_beside(q, k, v, work)
    return attention(q, k, v), [w() for w in work]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fused scaled-dot-product attention; (B, S, H, D) in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def masked_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """SDPA over (B, S, H, D) with a boolean key mask (B, S_k): masked keys are never attended to."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=key_mask.bool()[:, None, None, :])
    return out.transpose(1, 2)


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA restricted to cuDNN's fused attention (faster than FlashAttention-2 on Hopper), flash as fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(QK^T/sqrt(d))V with the softmax in float32: the slow, obviously-right twin."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float())
    return out.to(q.dtype)


BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention, "sdpa-cudnn": cudnn_attention, "math": math_attention}


def attention_backend(name: str) -> AttentionFn:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(BACKENDS)}") from None

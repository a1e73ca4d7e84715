"""Qwen-Image (and Qwen-Image-Edit) MMDiT: 60 dual-stream blocks over a joint [text | image] sequence.

Written from the published architecture (diffusers' QwenImageTransformer2DModel was read for the math, nothing
imported). What sets it apart from FLUX.1:
  - the text stream is RMS-normed (txt_norm) before its input projection, and may carry a padding mask;
  - the timestep embedding takes t in [0, 1] (rounded to the model dtype) and multiplies by 1000 in float32 after
    the product with the frequencies: a different rounding from FLUX's `t * 1000` in the model dtype;
  - RoPE is 3-axis (frame, row, column) with rows and columns centred on 0 (positions -h/2 .. h/2-1), text
    positions start after the largest image half-extent, and several images (Edit's condition image) sit on
    successive frame indices. The tables are complex64 and are always computed in float32: in bf16 the angles
    of far positions drift (sglang saw it on Qwen-Image-Edit).
Layout differences only: QKV fused into one linear per stream. `diffusers_key_map` maps the checkpoint names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionFn, MaskedAttentionFn, masked_sdpa_attention, sdpa_attention
from engine.models.common import GeluMLP, MLPEmbedder, RoundedRMSNorm, layer_norm, modulate, qkv_heads

TIMESTEP_CHANNELS = 256
TIMESTEP_SCALE = 1000.0
ImageShape = tuple[int, int, int]  # (frames, rows, columns) of one image in 2x2-patch tokens


@dataclass(frozen=True)
class QwenImageConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    eps: float = 1e-6

    # Variants of later checkpoints that this engine does not implement; refused rather than silently ignored.
    UNSUPPORTED = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")

    @classmethod
    def from_diffusers(cls, config: dict) -> "QwenImageConfig":
        on = [k for k in cls.UNSUPPORTED if config.get(k)]
        if on:
            raise ValueError(f"QwenImage transformer options not supported by the engine: {on}")
        fields = {k: v for k, v in config.items() if k in cls.__dataclass_fields__ and k not in ("theta", "eps")}
        if "axes_dims_rope" in fields:
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        cfg = cls(**fields)
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim or len(cfg.axes_dims_rope) != 3:
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must be 3 axes summing to attention_head_dim "
                             f"{cfg.attention_head_dim}")
        return cfg

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size**2 * (self.out_channels or self.in_channels)


SIZES: dict[str, QwenImageConfig] = {
    "qwen-image": QwenImageConfig(),  # Qwen/Qwen-Image and Qwen/Qwen-Image-Edit: 20.4B parameters
}


# --- conditioning ------------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] embedding of t in [0, 1], float32. The scale 1000 is applied after the product with the
    frequencies, in float32: the reference's order of roundings (FLUX scales t first, in the model dtype)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = TIMESTEP_SCALE * (t[:, None].float() * torch.exp(exponent)[None, :])
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def axis_frequencies(positions: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """exp(i * position * theta^(-2j/dim)) for integer positions (S,) -> complex64 (S, dim/2), always in float32."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=positions.device).to(torch.float32).div(dim))
    angles = torch.outer(positions, inv)
    return torch.polar(torch.ones_like(angles), angles)


def centred(n: int, device) -> torch.Tensor:
    """Positions -ceil(n/2) .. floor(n/2)-1: rows and columns are centred on the image middle (scale_rope)."""
    return torch.arange(-(n - n // 2), n // 2, device=device)


def rope_tables(img_shapes: Sequence[ImageShape], txt_len: int, axes_dims: tuple[int, ...], theta: int,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex RoPE tables for the image tokens of every image in `img_shapes` (concatenated in that order; image k
    sits on frame index k) and for `txt_len` text tokens, whose positions on all three axes start after the largest
    image half-extent. Returns (image (sum f*h*w, D/2), text (txt_len, D/2)), complex64."""
    parts, extent = [], 0
    for index, (f, h, w) in enumerate(img_shapes):
        frame = axis_frequencies(torch.arange(index, index + f, device=device), axes_dims[0], theta)
        rows = axis_frequencies(centred(h, device), axes_dims[1], theta)
        cols = axis_frequencies(centred(w, device), axes_dims[2], theta)
        table = torch.cat([frame[:, None, None].expand(f, h, w, -1), rows[None, :, None].expand(f, h, w, -1),
                           cols[None, None, :].expand(f, h, w, -1)], dim=-1)
        parts.append(table.reshape(f * h * w, -1))
        extent = max(extent, h // 2, w // 2)
    txt_pos = torch.arange(extent, extent + txt_len, device=device)
    txt = torch.cat([axis_frequencies(txt_pos, d, theta) for d in axes_dims], dim=-1)
    return torch.cat(parts, dim=0), txt


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, S, H, D) by complex freqs (S, D/2); float32 math, x's dtype out."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs[:, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)




class QKNorm(nn.Module):
    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.query_norm = RoundedRMSNorm(head_dim, eps)
        self.key_norm = RoundedRMSNorm(head_dim, eps)


class DualStreamBlock(nn.Module):
    """Image and text keep separate weights (modulation, QKV, output, MLP) and attend jointly over [text | image]."""

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        dim = cfg.dim
        self.heads = cfg.num_attention_heads
        self.eps = cfg.eps
        self.img_mod = nn.Linear(dim, 6 * dim)
        self.txt_mod = nn.Linear(dim, 6 * dim)
        self.img_qkv = nn.Linear(dim, 3 * dim)
        self.txt_qkv = nn.Linear(dim, 3 * dim)
        self.img_norm = QKNorm(cfg.attention_head_dim, cfg.eps)
        self.txt_norm = QKNorm(cfg.attention_head_dim, cfg.eps)
        self.img_out = nn.Linear(dim, dim)
        self.txt_out = nn.Linear(dim, dim)
        self.img_mlp = GeluMLP(dim, 4 * dim)
        self.txt_mlp = GeluMLP(dim, 4 * dim)

    def _qkv(self, x, linear: nn.Linear, norm: QKNorm, freqs):
        q, k, v = qkv_heads(linear, x, self.heads)
        return apply_rope(norm.query_norm(q), freqs), apply_rope(norm.key_norm(k), freqs), v

    def forward(self, img, txt, temb, rope, key_mask, attention: AttentionFn, masked_attention: MaskedAttentionFn):
        img_freqs, txt_freqs = rope
        silu = F.silu(temb)
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(silu).chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(silu).chunk(6, dim=-1)

        img_q, img_k, img_v = self._qkv(modulate(layer_norm(img, self.eps), img_shift1, img_scale1), self.img_qkv,
                                        self.img_norm, img_freqs)
        txt_q, txt_k, txt_v = self._qkv(modulate(layer_norm(txt, self.eps), txt_shift1, txt_scale1), self.txt_qkv,
                                        self.txt_norm, txt_freqs)
        q, k, v = (torch.cat(pair, dim=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v) if key_mask is None else masked_attention(q, k, v, key_mask)
        attn = attn.flatten(2).to(q.dtype)
        txt_attn, img_attn = attn.split([txt.shape[1], img.shape[1]], dim=1)

        img = img + img_gate1[:, None] * self.img_out(img_attn.contiguous())
        txt = txt + txt_gate1[:, None] * self.txt_out(txt_attn.contiguous())
        img = img + img_gate2[:, None] * self.img_mlp(modulate(layer_norm(img, self.eps), img_shift2, img_scale2))
        txt = txt + txt_gate2[:, None] * self.txt_mlp(modulate(layer_norm(txt, self.eps), txt_shift2, txt_scale2))
        if img.dtype == torch.float16:
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class QwenImageTransformer(nn.Module):
    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_norm = RoundedRMSNorm(cfg.joint_attention_dim, cfg.eps)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.time_in = MLPEmbedder(TIMESTEP_CHANNELS, dim)
        self.blocks = nn.ModuleList(DualStreamBlock(cfg) for _ in range(cfg.num_layers))
        self.final_mod = nn.Linear(dim, 2 * dim)
        self.final_proj = nn.Linear(dim, cfg.out_dim)
        # Swappable after build (sequence parallelism, other kernels); not parameters, not in the state dict.
        # A padded text batch (key mask) takes `masked_attention`, every other call `attention`.
        self.attention: AttentionFn = sdpa_attention
        self.masked_attention: MaskedAttentionFn = masked_sdpa_attention

    def rope(self, img_shapes: Sequence[ImageShape], txt_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image table (sum f*h*w, D/2), text table (txt_len, D/2)), complex64: the rows `forward` rotates by."""
        cfg = self.config
        return rope_tables(img_shapes, txt_len, cfg.axes_dims_rope, cfg.theta, device)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, timestep: torch.Tensor,
                img_shapes: Sequence[ImageShape], txt_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """img (B, N, in_channels): packed latents, the generated image first, then any condition images, as listed
        in img_shapes (the same for every sample); txt (B, L, joint_attention_dim); timestep t/1000 in [0, 1] (B,);
        txt_mask (B, L), nonzero = a real token, or None. Returns (B, N, out_dim) for every image token.
        rope: the (image, text) tables of `self.rope(img_shapes, L)` with only the image rows of the tokens in `img`
        (a caller that passes a window of the image sequence passes that window's rows); None computes them all."""
        img = self.img_in(img)
        timestep = timestep.to(img.dtype)
        txt = self.txt_in(self.txt_norm(txt))
        temb = self.time_in(timestep_embedding(timestep).to(img.dtype))
        cfg = self.config
        if rope is None:
            if sum(f * h * w for f, h, w in img_shapes) != img.shape[1]:
                raise ValueError(f"img_shapes {list(img_shapes)} describe a different number of tokens than "
                                 f"{img.shape[1]}")
            rope = self.rope(img_shapes, txt.shape[1], img.device)
        elif rope[0].shape[0] != img.shape[1] or rope[1].shape[0] != txt.shape[1]:
            raise ValueError(f"RoPE tables of {rope[0].shape[0]} image / {rope[1].shape[0]} text rows for "
                             f"{img.shape[1]} image / {txt.shape[1]} text tokens")
        key_mask = None
        if txt_mask is not None:
            image_keys = torch.ones(img.shape[0], img.shape[1], dtype=torch.bool, device=img.device)
            key_mask = torch.cat([txt_mask.to(torch.bool), image_keys], dim=1)
        for block in self.blocks:
            img, txt = block(img, txt, temb, rope, key_mask, self.attention, self.masked_attention)
        scale, shift = self.final_mod(F.silu(temb).to(img.dtype)).chunk(2, dim=-1)
        return self.final_proj(modulate(layer_norm(img, cfg.eps), shift, scale))


def diffusers_key_map(cfg: QwenImageConfig) -> dict[str, tuple[str, ...]]:
    """Engine parameter name -> the diffusers QwenImageTransformer2DModel tensors it is made of (concatenated)."""
    out: dict[str, tuple[str, ...]] = {}

    def linear(dst: str, *srcs: str) -> None:
        out[f"{dst}.weight"] = tuple(f"{s}.weight" for s in srcs)
        out[f"{dst}.bias"] = tuple(f"{s}.bias" for s in srcs)

    linear("img_in", "img_in")
    linear("txt_in", "txt_in")
    out["txt_norm.weight"] = ("txt_norm.weight",)
    linear("time_in.linear_1", "time_text_embed.timestep_embedder.linear_1")
    linear("time_in.linear_2", "time_text_embed.timestep_embedder.linear_2")
    for i in range(cfg.num_layers):
        d, s = f"blocks.{i}", f"transformer_blocks.{i}"
        linear(f"{d}.img_mod", f"{s}.img_mod.1")
        linear(f"{d}.txt_mod", f"{s}.txt_mod.1")
        linear(f"{d}.img_qkv", f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v")
        linear(f"{d}.txt_qkv", f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj")
        out[f"{d}.img_norm.query_norm.weight"] = (f"{s}.attn.norm_q.weight",)
        out[f"{d}.img_norm.key_norm.weight"] = (f"{s}.attn.norm_k.weight",)
        out[f"{d}.txt_norm.query_norm.weight"] = (f"{s}.attn.norm_added_q.weight",)
        out[f"{d}.txt_norm.key_norm.weight"] = (f"{s}.attn.norm_added_k.weight",)
        linear(f"{d}.img_out", f"{s}.attn.to_out.0")
        linear(f"{d}.txt_out", f"{s}.attn.to_add_out")
        linear(f"{d}.img_mlp.fc1", f"{s}.img_mlp.net.0.proj")
        linear(f"{d}.img_mlp.fc2", f"{s}.img_mlp.net.2")
        linear(f"{d}.txt_mlp.fc1", f"{s}.txt_mlp.net.0.proj")
        linear(f"{d}.txt_mlp.fc2", f"{s}.txt_mlp.net.2")
    linear("final_mod", "norm_out.linear")
    linear("final_proj", "proj_out")
    return out

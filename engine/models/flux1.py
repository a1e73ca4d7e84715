"""FLUX.1 (dev / schnell) rectified-flow DiT: 19 double-stream blocks, then 38 single-stream blocks.

Written from the published architecture (Black Forest Labs' reference and diffusers' port were read for the
math, nothing imported). Differences in layout, not in numerics: QKV are fused into one linear per stream, and
the single block's QKV and MLP input projections are fused into one `linear1`, so each block runs fewer, larger
matmuls. `FLUX1_KEY_MAP` in engine/loading.py maps diffusers checkpoint names onto this layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import AttentionFn, attend_beside, hides_work, sdpa_attention
from engine.models.common import (
    GeluMLP, MLPEmbedder, RMSNorm, apply_rope, layer_norm, linear_pieces, linear_rows, modulate, qkv_heads,
    rope_frequencies, timestep_embedding,
)

TIMESTEP_SCALE = 1000.0  # the model is trained on t in [0, 1000]; pipelines pass sigma in [0, 1]


@dataclass(frozen=True)
class Flux1Config:
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    patch_size: int = 1
    theta: float = 10000.0
    mlp_ratio: float = 4.0

    @classmethod
    def from_diffusers(cls, config: dict) -> "Flux1Config":
        fields = {k: v for k, v in config.items() if k in cls.__dataclass_fields__}
        if "axes_dims_rope" in fields:
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        cfg = cls(**fields)
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to attention_head_dim {cfg.attention_head_dim}")
        if cfg.patch_size != 1:
            raise ValueError(f"FLUX.1 packs 2x2 latent patches outside the model; patch_size must be 1, got {cfg.patch_size}")
        return cfg

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class DoubleStreamBlock(nn.Module):
    """Image and text keep separate weights but attend jointly over [text | image]."""

    def __init__(self, cfg: Flux1Config):
        super().__init__()
        dim, heads = cfg.dim, cfg.num_attention_heads
        self.heads = heads
        self.img_mod = nn.Linear(dim, 6 * dim)
        self.txt_mod = nn.Linear(dim, 6 * dim)
        self.img_qkv = nn.Linear(dim, 3 * dim)
        self.txt_qkv = nn.Linear(dim, 3 * dim)
        self.img_norm = QKNorm(cfg.attention_head_dim)
        self.txt_norm = QKNorm(cfg.attention_head_dim)
        self.img_out = nn.Linear(dim, dim)
        self.txt_out = nn.Linear(dim, dim)
        self.img_mlp = GeluMLP(dim, cfg.mlp_hidden)
        self.txt_mlp = GeluMLP(dim, cfg.mlp_hidden)

    def _qkv(self, x: torch.Tensor, linear: nn.Linear, norm: QKNorm):
        q, k, v = qkv_heads(linear, x, self.heads)
        return norm.query_norm(q), norm.key_norm(k), v

    def forward(self, img, txt, vec, rope, attention: AttentionFn):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(nn.functional.silu(vec)).chunk(6, dim=-1)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(nn.functional.silu(vec)).chunk(6, dim=-1)

        img_q, img_k, img_v = self._qkv(modulate(layer_norm(img), img_shift1, img_scale1), self.img_qkv, self.img_norm)
        txt_q, txt_k, txt_v = self._qkv(modulate(layer_norm(txt), txt_shift1, txt_scale1), self.txt_qkv, self.txt_norm)
        q = apply_rope(torch.cat([txt_q, img_q], dim=1), *rope)
        k = apply_rope(torch.cat([txt_k, img_k], dim=1), *rope)
        v = torch.cat([txt_v, img_v], dim=1)
        attn = attention(q, k, v).flatten(2).to(q.dtype)
        txt_attn, img_attn = attn.split([txt.shape[1], img.shape[1]], dim=1)

        img = img + img_gate1[:, None] * self.img_out(img_attn.contiguous())
        img = img + img_gate2[:, None] * self.img_mlp(modulate(layer_norm(img), img_shift2, img_scale2))
        txt = txt + txt_gate1[:, None] * self.txt_out(txt_attn.contiguous())
        txt = txt + txt_gate2[:, None] * self.txt_mlp(modulate(layer_norm(txt), txt_shift2, txt_scale2))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text | image]: attention and MLP in parallel from one fused input projection."""

    def __init__(self, cfg: Flux1Config):
        super().__init__()
        dim = cfg.dim
        self.heads, self.dim, self.mlp_hidden = cfg.num_attention_heads, dim, cfg.mlp_hidden
        self.mod = nn.Linear(dim, 3 * dim)
        self.linear1 = nn.Linear(dim, 3 * dim + cfg.mlp_hidden)
        self.norm = QKNorm(cfg.attention_head_dim)
        self.linear2 = nn.Linear(dim + cfg.mlp_hidden, dim)

    # Pieces the MLP rows of linear1 are cut into when the attention hides work under its communication: a backend
    # runs the first part while the attention's inputs travel and the rest while its output travels back.
    MLP_PIECES = 2

    def forward(self, x, vec, rope, attention: AttentionFn):
        shift, scale, gate = self.mod(nn.functional.silu(vec)).chunk(3, dim=-1)
        qkv, mlp_work = self._projections(modulate(layer_norm(x), shift, scale), hides_work(attention))
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = apply_rope(self.norm.query_norm(q), *rope), apply_rope(self.norm.key_norm(k), *rope)
        # The MLP half of the block does not depend on attention: handed to the call as independent work.
        attn, mlp = attend_beside(attention, q, k, v, mlp_work)
        out = self.linear2(torch.cat([attn.flatten(2).to(q.dtype), *mlp], dim=-1))
        x = x + gate[:, None] * out
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x

    def _projections(self, h: torch.Tensor, cut: bool):
        """linear1's QKV rows, and its MLP rows with their GELU as a list of callables. With `cut` (the attention
        hides work) QKV is its own GEMM and the MLP rows MLP_PIECES more, computed when the attention calls them;
        else one GEMM as the checkpoint fuses it. The same bits either way (engine.models.common.linear_rows)."""
        d = 3 * self.dim
        bounds = [d + self.mlp_hidden * i // self.MLP_PIECES for i in range(self.MLP_PIECES + 1)]
        rows = [linear_rows(self.linear1, lo, hi) for lo, hi in zip([0] + bounds[:-1], bounds)] if cut else [None]
        if None in rows:
            qkv, mlp = linear_pieces(self.linear1, h, (d, self.mlp_hidden))
            return qkv, [lambda: nn.functional.gelu(mlp, approximate="tanh")]
        return rows[0](h), [lambda f=f: nn.functional.gelu(f(h), approximate="tanh") for f in rows[1:]]


class Flux1Transformer(nn.Module):
    def __init__(self, cfg: Flux1Config):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.guidance_in = MLPEmbedder(256, dim) if cfg.guidance_embeds else None
        self.vector_in = MLPEmbedder(cfg.pooled_projection_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.num_layers))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers))
        self.final_mod = nn.Linear(dim, 2 * dim)
        self.final_proj = nn.Linear(dim, cfg.patch_size**2 * (cfg.out_channels or cfg.in_channels))
        # Swappable after build (sequence parallelism, other kernels); not a parameter, not in the state dict.
        self.attention: AttentionFn = sdpa_attention

    def conditioning(self, timestep, guidance, pooled):
        """The modulation vector: embed(t) + embed(guidance) + embed(pooled text).

        The timestep is cast to the model dtype *before* scaling, as the reference does: in bf16 that rounding
        is part of the numerics a parity gate compares."""
        dtype = pooled.dtype
        vec = self.time_in(timestep_embedding(timestep.to(dtype) * TIMESTEP_SCALE, 256).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this FLUX.1 checkpoint is guidance-distilled: pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype) * TIMESTEP_SCALE, 256).to(dtype))
        return vec + self.vector_in(pooled)

    def forward(self, img, txt, timestep, pooled, img_ids, txt_ids, guidance=None):
        """img (B, N, in_channels) packed latents, txt (B, L, joint_attention_dim), timestep = sigma in [0, 1] (B,),
        pooled (B, pooled_projection_dim), ids (N, 3) and (L, 3). Returns the velocity (B, N, out_channels)."""
        img = self.img_in(img)
        vec = self.conditioning(timestep, guidance, pooled)
        txt = self.txt_in(txt)
        rope = rope_frequencies(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope, self.config.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rope, self.attention)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, rope, self.attention)
        img = x[:, txt.shape[1]:]
        scale, shift = self.final_mod(nn.functional.silu(vec).to(img.dtype)).chunk(2, dim=-1)
        return self.final_proj(modulate(layer_norm(img), shift, scale))


def diffusers_key_map(cfg: Flux1Config) -> dict[str, tuple[str, ...]]:
    """Engine parameter name -> the diffusers FluxTransformer2DModel tensors it is made of (concatenated)."""
    out: dict[str, tuple[str, ...]] = {}

    def linear(dst: str, *srcs: str) -> None:
        out[f"{dst}.weight"] = tuple(f"{s}.weight" for s in srcs)
        out[f"{dst}.bias"] = tuple(f"{s}.bias" for s in srcs)

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    for dst, src in [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")] + (
        [("guidance_in", "guidance_embedder")] if cfg.guidance_embeds else []
    ):
        linear(f"{dst}.linear_1", f"time_text_embed.{src}.linear_1")
        linear(f"{dst}.linear_2", f"time_text_embed.{src}.linear_2")
    for i in range(cfg.num_layers):
        d, s = f"double_blocks.{i}", f"transformer_blocks.{i}"
        linear(f"{d}.img_mod", f"{s}.norm1.linear")
        linear(f"{d}.txt_mod", f"{s}.norm1_context.linear")
        linear(f"{d}.img_qkv", f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v")
        linear(f"{d}.txt_qkv", f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj")
        out[f"{d}.img_norm.query_norm.weight"] = (f"{s}.attn.norm_q.weight",)
        out[f"{d}.img_norm.key_norm.weight"] = (f"{s}.attn.norm_k.weight",)
        out[f"{d}.txt_norm.query_norm.weight"] = (f"{s}.attn.norm_added_q.weight",)
        out[f"{d}.txt_norm.key_norm.weight"] = (f"{s}.attn.norm_added_k.weight",)
        linear(f"{d}.img_out", f"{s}.attn.to_out.0")
        linear(f"{d}.txt_out", f"{s}.attn.to_add_out")
        linear(f"{d}.img_mlp.fc1", f"{s}.ff.net.0.proj")
        linear(f"{d}.img_mlp.fc2", f"{s}.ff.net.2")
        linear(f"{d}.txt_mlp.fc1", f"{s}.ff_context.net.0.proj")
        linear(f"{d}.txt_mlp.fc2", f"{s}.ff_context.net.2")
    for i in range(cfg.num_single_layers):
        d, s = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(f"{d}.mod", f"{s}.norm.linear")
        linear(f"{d}.linear1", f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp")
        out[f"{d}.norm.query_norm.weight"] = (f"{s}.attn.norm_q.weight",)
        out[f"{d}.norm.key_norm.weight"] = (f"{s}.attn.norm_k.weight",)
        linear(f"{d}.linear2", f"{s}.proj_out")
    linear("final_mod", "norm_out.linear")
    linear("final_proj", "proj_out")
    return out

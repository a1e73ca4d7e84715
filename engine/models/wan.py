"""Wan 2.1 / 2.2 video DiT (text-to-video A14B experts, TI2V-5B): written from the published architecture
(diffusers' WanTransformer3DModel was read for the math, nothing imported). What sets it apart from the image DiTs:
  - 3-D patches (1, 2, 2) of a (B, C, F, H, W) latent, embedded by a strided Conv3d; tokens in (f, h, w) order;
  - 3-axis RoPE in the real (cos, sin) form with interleaved channel pairs: the head dim splits into
    t = D - 2 * 2(D // 6), h = w = 2(D // 6) channels, angles computed in float64 over rope_max_seq_len positions;
    token (f, h, w) takes row f of the t table, h of the h table, w of the w table;
  - self-attention with q/k RMS norm across all heads (over the whole inner dim, before the head split), then
    cross-attention to the projected UMT5 text (no RoPE, the whole text on every token), then a GELU(tanh) MLP;
  - modulation: a per-block learned table (6, dim) added to the projected timestep embedding, in float32; the
    residual adds run in float32 and are stored in the activation dtype;
  - expand_timesteps (TI2V-5B): the timestep is (B, N), one per token, so every modulation is per token too
    (the image-conditioned first frame's tokens carry t = 0).
Layout differences only: self-attention Q, K, V fused into one linear; cross-attention K, V fused (the key map packs
them, so a --quant-ignored-layers pattern naming to_k reaches the fused linear). `diffusers_key_map` maps the names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionFn, sdpa_attention
from engine.models.common import linear_pieces, timestep_embedding


@dataclass(frozen=True)
class WanConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024

    @classmethod
    def from_diffusers(cls, config: dict) -> "WanConfig":
        for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            if config.get(key) is not None:
                raise ValueError(f"Wan with {key}={config[key]} (Wan 2.1 image-to-video's image branch) is not "
                                 "supported by the engine")
        if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"Wan qk_norm {config['qk_norm']!r} is not supported; valid: 'rms_norm_across_heads'")
        fields = {k: v for k, v in config.items() if k in cls.__dataclass_fields__}
        if "patch_size" in fields:
            fields["patch_size"] = tuple(fields["patch_size"])
        if fields.get("out_channels") is None:
            fields["out_channels"] = fields.get("in_channels", cls.in_channels)
        return cls(**fields)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw


SIZES: dict[str, WanConfig] = {
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: each of the two experts (transformer, transformer_2), 14.3B parameters.
    "a14b": WanConfig(),
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers: 48 latent channels, 30 layers of 24 heads, 5.0B parameters.
    "ti2v-5b": WanConfig(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30),
}


# --- layout ---------------------------------------------------------------------------------------------------------
def rope_tables(cfg: WanConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (rope_max_seq_len, head_dim) float32: the t, h and w tables side by side, every angle
    repeated for its channel pair; angles in float64 as the reference computes them."""
    cos, sin = [], []
    for dim in cfg.rope_dims:
        inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(torch.arange(cfg.rope_max_seq_len, dtype=torch.float64), inv)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def token_rope(tables: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int, int], dims: tuple[int, int, int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) rows (F*H*W, head_dim) of the tokens of a (F, H, W) patch grid, (f, h, w) order."""
    f, h, w = grid
    out = []
    for table in tables:
        tt, th, tw = table.split(dims, dim=1)
        parts = (tt[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                 th[:h].view(1, h, 1, -1).expand(f, h, w, -1), tw[:w].view(1, 1, w, -1).expand(f, h, w, -1))
        out.append(torch.cat(parts, dim=-1).reshape(f * h * w, -1))
    return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, S, H, D) by (S, D) tables, as the reference: float32 products where
    the tables promote, stored in x's dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
    # Each float32 half stored straight into x's dtype, as the reference does. Stacking the halves in float32 and
    # converting after wrote and read the whole tensor twice more: eager on an H200 (480 x 832, 81 frames) the engine
    # ran 160 strided copies and 80 conversions a forward more than diffusers, ~37 ms of a 49 ms gap (2026-11-28;
    # the forward after this change not yet timed on a GPU).
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def fp32_layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in float32 (the reference's FP32LayerNorm), returned in x's dtype."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


# --- layers ---------------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.to_qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.norm_q = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.to_out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, cos, sin, attention: AttentionFn):
        q, k, v = linear_pieces(self.to_qkv, x, (self.to_out.in_features,) * 3)
        q, k = self.norm_q(q).unflatten(2, (self.heads, -1)), self.norm_k(k).unflatten(2, (self.heads, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v.unflatten(2, (self.heads, -1)))
        return self.to_out(out.flatten(2).type_as(q))


class CrossAttention(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.to_q = nn.Linear(cfg.dim, cfg.dim)
        self.to_kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.norm_q = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.to_out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, text, attention: AttentionFn):
        k, v = linear_pieces(self.to_kv, text, (self.to_out.in_features,) * 2)
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))
        out = attention(q, self.norm_k(k).unflatten(2, (self.heads, -1)), v.unflatten(2, (self.heads, -1)))
        return self.to_out(out.flatten(2).type_as(q))


class Block(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn1 = SelfAttention(cfg)
        self.attn2 = CrossAttention(cfg)
        # cross_attn_norm: an affine float32 LayerNorm before cross-attention; without it, none.
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.ffn_in = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.ffn_out = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, cfg.dim))

    def forward(self, x, text, proj, cos, sin, attention: AttentionFn, cross_attention: AttentionFn):
        """proj: (B, 6, dim) per sample, or (B, N, 6, dim) per token (expand_timesteps)."""
        if proj.ndim == 4:
            mods = [m.squeeze(2) for m in (self.scale_shift_table[None] + proj.float()).chunk(6, dim=2)]
        else:
            mods = list((self.scale_shift_table + proj.float()).chunk(6, dim=1))
        shift, scale, gate, c_shift, c_scale, c_gate = mods
        h = (fp32_layer_norm(x.float(), self.eps) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, cos, sin, attention) * gate).type_as(x)
        h = x if self.norm2 is None else fp32_layer_norm(x.float(), self.eps, self.norm2.weight,
                                                         self.norm2.bias).type_as(x)
        x = x + self.attn2(h, text, cross_attention)
        h = (fp32_layer_norm(x.float(), self.eps) * (1 + c_scale) + c_shift).type_as(x)
        ff = self.ffn_out(F.gelu(self.ffn_in(h), approximate="tanh"))
        return (x.float() + ff.float() * c_gate).type_as(x)


class WanTransformer(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.time_1 = nn.Linear(cfg.freq_dim, cfg.dim)
        self.time_2 = nn.Linear(cfg.dim, cfg.dim)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_1 = nn.Linear(cfg.text_dim, cfg.dim)
        self.text_2 = nn.Linear(cfg.dim, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.proj_out = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        # Swappable after build (sequence parallelism, other kernels); not parameters, not in the state dict.
        # Self-attention over video tokens is what sequence parallelism replaces; cross-attention keys are the
        # whole text on every rank, so it stays local.
        self.attention: AttentionFn = sdpa_attention
        self.cross_attention: AttentionFn = sdpa_attention
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def grid(self, latent_size: tuple[int, int, int]) -> tuple[int, int, int]:
        pt, ph, pw = self.config.patch_size
        f, h, w = latent_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size {latent_size} is not a multiple of the patch {self.config.patch_size}")
        grid = (f // pt, h // ph, w // pw)
        if max(grid) > self.config.rope_max_seq_len:
            raise ValueError(f"patch grid {grid} is beyond rope_max_seq_len {self.config.rope_max_seq_len}")
        return grid

    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != torch.device(device):
            self._rope = tuple(t.to(device) for t in rope_tables(self.config))
        return token_rope(self._rope, grid, self.config.rope_dims)

    def embed_time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) or (B, N) in [0, 1000] -> (temb (B[, N], dim), proj (B[, N], 6, dim)); temb in `dtype`
        (the text's, as the reference casts it)."""
        freq = timestep_embedding(timestep.flatten(), self.config.freq_dim).unflatten(0, timestep.shape)
        freq = freq.to(self.time_1.weight.dtype)
        temb = self.time_2(F.silu(self.time_1(freq))).to(dtype)
        proj = self.time_proj(F.silu(temb))
        return temb, proj.unflatten(-1, (6, -1))

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_2(F.gelu(self.text_1(text), approximate="tanh"))

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> embedded tokens (B, N, dim) in (f, h, w) order."""
        return self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()

    def core(self, x, text, temb, proj, cos, sin) -> torch.Tensor:
        """Embedded tokens (B, N, dim) with their RoPE rows (N, D) and, per token, temb (B, N, dim) / proj
        (B, N, 6, dim) or per sample (B, dim) / (B, 6, dim); the whole video or a sequence-parallel window of it.
        Returns the tokens' output patches (B, N, prod(patch) * out_channels)."""
        for block in self.blocks:
            x = block(x, text, proj, cos, sin, self.attention, self.cross_attention)
        if temb.ndim == 3:
            shift, scale = [m.squeeze(2) for m in (self.scale_shift_table[None] + temb[:, :, None]).chunk(2, dim=2)]
        else:
            shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)
        x = (fp32_layer_norm(x.float(), self.config.eps) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, pt*ph*pw*C) -> (B, C, F, H, W)."""
        (pt, ph, pw), (f, h, w) = self.config.patch_size, grid
        out = out.reshape(out.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def prepare(self, hidden_states: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor):
        """(tokens, projected text, temb, proj, cos, sin, grid) of one call."""
        grid = self.grid(tuple(hidden_states.shape[2:]))
        if timestep.ndim == 2 and timestep.shape[1] != math.prod(grid):
            raise ValueError(f"per-token timesteps have {timestep.shape[1]} entries for {math.prod(grid)} tokens")
        cos, sin = self.rope(grid, hidden_states.device)
        temb, proj = self.embed_time(timestep, text.dtype)
        return self.patchify(hidden_states), self.embed_text(text), temb, proj, cos, sin, grid

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> torch.Tensor:
        """hidden_states (B, C, F, H, W) in the model dtype; timestep (B,) or (B, N) (expand_timesteps), 1000 =
        noise; encoder_hidden_states (B, L, text_dim). Returns (B, out_channels, F, H, W)."""
        x, text, temb, proj, cos, sin, grid = self.prepare(hidden_states, timestep, encoder_hidden_states)
        return self.unpatchify(self.core(x, text, temb, proj, cos, sin), grid)


def diffusers_key_map(cfg: WanConfig) -> dict[str, tuple[str, ...]]:
    """Engine parameter name -> the diffusers WanTransformer3DModel tensors it is made of (concatenated)."""
    out: dict[str, tuple[str, ...]] = {}

    def linear(dst: str, *srcs: str) -> None:
        out[f"{dst}.weight"] = tuple(f"{s}.weight" for s in srcs)
        out[f"{dst}.bias"] = tuple(f"{s}.bias" for s in srcs)

    linear("patch_embedding", "patch_embedding")
    linear("time_1", "condition_embedder.time_embedder.linear_1")
    linear("time_2", "condition_embedder.time_embedder.linear_2")
    linear("time_proj", "condition_embedder.time_proj")
    linear("text_1", "condition_embedder.text_embedder.linear_1")
    linear("text_2", "condition_embedder.text_embedder.linear_2")
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        linear(f"{b}.attn1.to_qkv", f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v")
        linear(f"{b}.attn2.to_q", f"{b}.attn2.to_q")
        linear(f"{b}.attn2.to_kv", f"{b}.attn2.to_k", f"{b}.attn2.to_v")
        for a in ("attn1", "attn2"):
            linear(f"{b}.{a}.to_out", f"{b}.{a}.to_out.0")
            out[f"{b}.{a}.norm_q.weight"] = (f"{b}.{a}.norm_q.weight",)
            out[f"{b}.{a}.norm_k.weight"] = (f"{b}.{a}.norm_k.weight",)
        if cfg.cross_attn_norm:
            linear(f"{b}.norm2", f"{b}.norm2")
        linear(f"{b}.ffn_in", f"{b}.ffn.net.0.proj")
        linear(f"{b}.ffn_out", f"{b}.ffn.net.2")
        out[f"{b}.scale_shift_table"] = (f"{b}.scale_shift_table",)
    linear("proj_out", "proj_out")
    out["scale_shift_table"] = ("scale_shift_table",)
    return out

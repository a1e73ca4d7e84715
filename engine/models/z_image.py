"""Z-Image (and Z-Image-Turbo) single-stream DiT: image and caption tokens are first refined apart (noise refiner,
with timestep modulation; context refiner, without), then joined as one sequence [image | caption] for the main
layers. Written from the published architecture (diffusers' ZImageTransformer2DModel was read for the math,
nothing imported). What sets it apart from FLUX.1 / Qwen-Image:
  - per-sample lists in and out: every sample is its own (C, F, H, W) latent and its own caption of any length;
    the batch is padded with a key mask where caption lengths differ (image sizes must agree within a batch);
  - both segments are padded to a multiple of 32 tokens with learned pad embeddings (x_pad_token, cap_pad_token)
    that take part in attention like real tokens;
  - 3-axis RoPE looked up in tables of `axes_lens` positions per axis (angles in float64, then float32, complex64):
    caption token j sits at (1 + j, 0, 0), image token (f, h, w) at (cap_len + 1 + f, h, w) with cap_len the
    caption's padded length, image pad tokens at (0, 0, 0);
  - the timestep t is 0 at noise, 1 at clean ((1000 - t) / 1000, done by the pipeline), scaled by t_scale here;
  - adaLN takes the timestep embedding without SiLU and gates through tanh; every sub-layer output is RMS-normed
    again before its residual (sandwich norms); the feed-forward is SwiGLU.
Layout differences only: Q, K, V fused into one linear; the feed-forward's w1 and w3 fused into w13 (the key map
packs them, so a --quant-ignored-layers pattern naming w1 or w3 reaches w13). `diffusers_key_map` maps the names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionFn, MaskedAttentionFn, masked_sdpa_attention, sdpa_attention
from engine.models.common import RoundedRMSNorm, layer_norm, linear_pieces, qkv_heads

SEQ_MULTI_OF = 32  # both segments are padded to a multiple of this many tokens
ADALN_EMBED_DIM = 256
TIMESTEP_CHANNELS = 256
TIMESTEP_HIDDEN = 1024


@dataclass(frozen=True)
class ZImageConfig:
    patch_size: int = 2
    f_patch_size: int = 1
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    @classmethod
    def from_diffusers(cls, config: dict) -> "ZImageConfig":
        if config.get("siglip_feat_dim") is not None:
            raise ValueError("Z-Image Omni (siglip_feat_dim) is not supported by the engine")
        patches, f_patches = list(config.get("all_patch_size", [2])), list(config.get("all_f_patch_size", [1]))
        if len(patches) != 1 or len(f_patches) != 1:
            raise ValueError(f"the engine supports one patch size, got all_patch_size {patches}, "
                             f"all_f_patch_size {f_patches}")
        if not config.get("qk_norm", True):
            raise ValueError("Z-Image without qk_norm is not supported by the engine")
        fields = {k: v for k, v in config.items() if k in cls.__dataclass_fields__}
        for key in ("axes_dims", "axes_lens"):
            if key in fields:
                fields[key] = tuple(fields[key])
        cfg = cls(patch_size=patches[0], f_patch_size=f_patches[0], **fields)
        if cfg.dim % cfg.n_heads or sum(cfg.axes_dims) != cfg.head_dim or len(cfg.axes_dims) != len(cfg.axes_lens):
            raise ValueError(f"axes_dims {cfg.axes_dims} must sum to the head dim {cfg.dim} / {cfg.n_heads} and "
                             f"match axes_lens {cfg.axes_lens}")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.f_patch_size * self.patch_size ** 2 * self.in_channels

    @property
    def hidden_dim(self) -> int:
        return int(self.dim / 3 * 8)


SIZES: dict[str, ZImageConfig] = {
    "z-image": ZImageConfig(),  # Tongyi-MAI/Z-Image-Turbo (and Z-Image): 6.2B parameters
}


# --- layout: patches, padding, positions --------------------------------------------------------------------------
def padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def patchify(x: torch.Tensor, p: int, pf: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F/pf * H/p * W/p, pf*p*p*C): token order (f, h, w), features (pf, ph, pw, C)."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f // pf, pf, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (f // pf) * (h // p) * (w // p), pf * p * p * c)


def unpatchify(tokens: torch.Tensor, size: tuple[int, int, int], p: int, pf: int, channels: int) -> torch.Tensor:
    """(B, >= n, pf*p*p*C) -> (B, C, F, H, W) from the first n = F/pf * H/p * W/p tokens."""
    f, h, w = size
    n = (f // pf) * (h // p) * (w // p)
    x = tokens[:, :n].reshape(tokens.shape[0], f // pf, h // p, w // p, pf, p, p, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], channels, f, h, w)


def caption_positions(cap_len: int, device=None) -> torch.Tensor:
    """(cap_len, 3) positions (1 + j, 0, 0) of a caption padded to cap_len tokens."""
    ids = torch.zeros(cap_len, 3, dtype=torch.long, device=device)
    ids[:, 0] = torch.arange(1, cap_len + 1, device=device)
    return ids


def image_positions(grid: tuple[int, int, int], cap_len: int, device=None) -> torch.Tensor:
    """(padded(F*H*W), 3): token (f, h, w) at (cap_len + 1 + f, h, w), then the pad tokens at (0, 0, 0)."""
    f, h, w = grid
    axes = torch.meshgrid(torch.arange(cap_len + 1, cap_len + 1 + f, device=device),
                          torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.stack(axes, dim=-1).reshape(-1, 3)
    return torch.cat([ids, ids.new_zeros(padded(len(ids)) - len(ids), 3)])


def rope_tables(axes_dims: tuple[int, ...], axes_lens: tuple[int, ...], theta: float) -> list[torch.Tensor]:
    """One complex64 table (axes_len, dim/2) per axis; angles computed in float64, then rounded to float32."""
    tables = []
    for dim, length in zip(axes_dims, axes_lens):
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float64), inv).float()
        tables.append(torch.polar(torch.ones_like(angles), angles))
    return tables


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, S, H, D) by complex freqs (B, S, D/2); float32 math, x's dtype."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs[:, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


# --- layers -------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.heads = cfg.n_heads
        self.to_qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.norm_q = RoundedRMSNorm(cfg.head_dim, 1e-5)  # the reference's qk norms use eps 1e-5 whatever norm_eps is
        self.norm_k = RoundedRMSNorm(cfg.head_dim, 1e-5)
        self.to_out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, freqs, key_mask, attention: AttentionFn, masked_attention: MaskedAttentionFn):
        q, k, v = qkv_heads(self.to_qkv, x, self.heads)
        q, k = apply_rope(self.norm_q(q), freqs), apply_rope(self.norm_k(k), freqs)
        out = attention(q, k, v) if key_mask is None else masked_attention(q, k, v, key_mask)
        return self.to_out(out.flatten(2).to(q.dtype))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 stacked into one linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x3 = linear_pieces(self.w13, x, (self.w2.in_features,) * 2)
        return self.w2(F.silu(x1) * x3)


class Block(nn.Module):
    """One layer; `modulated` layers (noise refiner, main) take the timestep embedding, the context refiner not."""

    def __init__(self, cfg: ZImageConfig, modulated: bool):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)
        self.attention_norm1 = RoundedRMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RoundedRMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RoundedRMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RoundedRMSNorm(cfg.dim, cfg.norm_eps)
        self.adaLN_modulation = nn.Linear(min(cfg.dim, ADALN_EMBED_DIM), 4 * cfg.dim) if modulated else None

    def forward(self, x, freqs, key_mask, temb, attention: AttentionFn, masked_attention: MaskedAttentionFn):
        if self.adaLN_modulation is None:
            attn = self.attention(self.attention_norm1(x), freqs, key_mask, attention, masked_attention)
            x = x + self.attention_norm2(attn)
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(temb).unsqueeze(1).chunk(4, dim=2)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        attn = self.attention(self.attention_norm1(x) * scale_msa, freqs, key_mask, attention, masked_attention)
        x = x + gate_msa * self.attention_norm2(attn)
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@dataclass
class Layout:
    """One batch's token layout (what `ZImageTransformer.layout` computes from the latents' size and the caption
    lengths): the image segment is the part a sequence-parallel run shards; the caption segment stays whole."""

    grid: tuple[int, int, int]  # image tokens per axis (F/pf, H/p, W/p)
    size: tuple[int, int, int]  # latent (F, H, W)
    image_pad: torch.Tensor  # (N,) bool: True on the x_pad_token slots (the same for every sample)
    image_freqs: torch.Tensor  # (B, N, D/2) complex64
    cap_pad: torch.Tensor  # (B, L) bool: True on the cap_pad_token slots
    cap_keys: torch.Tensor | None  # (B, L) bool key mask (False = batch padding), None when no sample is padded
    cap_freqs: torch.Tensor  # (B, L, D/2) complex64, zero on batch padding


class ZImageTransformer(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.config = cfg
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)
        self.noise_refiner = nn.ModuleList(Block(cfg, modulated=True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(Block(cfg, modulated=False) for _ in range(cfg.n_refiner_layers))
        self.t_embedder_1 = nn.Linear(TIMESTEP_CHANNELS, TIMESTEP_HIDDEN)
        self.t_embedder_2 = nn.Linear(TIMESTEP_HIDDEN, min(cfg.dim, ADALN_EMBED_DIM))
        self.cap_norm = RoundedRMSNorm(cfg.cap_feat_dim, cfg.norm_eps)
        self.cap_embedder = nn.Linear(cfg.cap_feat_dim, cfg.dim)
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg, modulated=True) for _ in range(cfg.n_layers))
        self.final_mod = nn.Linear(min(cfg.dim, ADALN_EMBED_DIM), cfg.dim)
        self.final_proj = nn.Linear(cfg.dim, cfg.patch_dim)
        # Swappable after build (sequence parallelism, other kernels); not parameters, not in the state dict.
        # Three attention sites: the main layers' joint [image | caption] sequence, the noise refiner's image-only
        # sequence and the context refiner's caption-only one. Setting `attention` sets all three (a kernel
        # choice); sequence parallelism then replaces the first two with its own (engine/pipelines/z_image.py).
        self.joint_attention: AttentionFn = sdpa_attention
        self.image_attention: AttentionFn = sdpa_attention
        self.caption_attention: AttentionFn = sdpa_attention
        self.masked_attention: MaskedAttentionFn = masked_sdpa_attention  # joint sequence, caption keys masked
        self.caption_masked_attention: MaskedAttentionFn = masked_sdpa_attention
        self._rope: list[torch.Tensor] | None = None
        self._layouts: dict[tuple, Layout] = {}  # layout() per (latent size, caption lengths, device)

    @property
    def attention(self) -> AttentionFn:
        return self.joint_attention

    @attention.setter
    def attention(self, fn: AttentionFn) -> None:
        self.joint_attention = self.image_attention = self.caption_attention = fn

    def rope(self, ids: torch.Tensor) -> torch.Tensor:
        """Complex RoPE rows for position ids (..., 3), looked up in the per-axis tables."""
        cfg = self.config
        for axis, length in enumerate(cfg.axes_lens):
            if ids.numel() and int(ids[..., axis].max()) >= length:
                raise ValueError(f"RoPE position {int(ids[..., axis].max())} on axis {axis} is beyond axes_lens "
                                 f"{cfg.axes_lens}: the caption or image is too long for this model")
        if self._rope is None or self._rope[0].device != ids.device:
            self._rope = [t.to(ids.device) for t in rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)]
        return torch.cat([table[ids[..., axis]] for axis, table in enumerate(self._rope)], dim=-1)

    def layout(self, latent_size: tuple[int, int, int], cap_lens: list[int], device=None) -> Layout:
        """The token layout of a batch whose latents are (C, *latent_size) and whose captions have cap_lens tokens.
        Built once per (size, caption lengths, device) and reused: every step of a run has the same layout, and
        building it checks RoPE ranges on the host (a device sync that must not sit in the hot loop, and must not
        happen inside a CUDA-graph capture; the graph wrapper warms up before capturing, which fills this cache)."""
        key = (tuple(latent_size), tuple(cap_lens), str(device))
        if key not in self._layouts:
            if len(self._layouts) >= 8:  # a long-lived model sees a few sizes; do not grow without bound
                self._layouts.clear()
            self._layouts[key] = self._build_layout(latent_size, cap_lens, device)
        # A copy per call (the tensors are shared, never written in place): a caller that rebinds a field for its
        # own forward (a planted bug in harness/selftest/z_image.py does) must not change the next forward's layout.
        return replace(self._layouts[key])

    def _build_layout(self, latent_size: tuple[int, int, int], cap_lens: list[int], device=None) -> Layout:
        cfg = self.config
        f, h, w = latent_size
        p, pf = cfg.patch_size, cfg.f_patch_size
        if f % pf or h % p or w % p:
            raise ValueError(f"latent size {latent_size} is not a multiple of the patch ({pf}, {p}, {p})")
        grid = (f // pf, h // p, w // p)
        n = math.prod(grid)
        image_pad = torch.arange(padded(n), device=device) >= n
        padded_caps = [padded(c) for c in cap_lens]
        longest = max(padded_caps)
        image_freqs = torch.stack([self.rope(image_positions(grid, c, device)) for c in padded_caps])
        cap_ids = caption_positions(longest, device)
        cap_freqs = self.rope(cap_ids)[None].repeat(len(cap_lens), 1, 1)
        cap_pad = torch.zeros(len(cap_lens), longest, dtype=torch.bool, device=device)
        cap_keys = torch.ones_like(cap_pad)
        for i, (real, total) in enumerate(zip(cap_lens, padded_caps)):
            cap_pad[i, real:total] = True
            cap_keys[i, total:] = False
            cap_freqs[i, total:] = 0  # batch padding rotates to zero, as the reference pads its tables
        return Layout(grid, latent_size, image_pad, image_freqs, cap_pad, None if bool(cap_keys.all()) else cap_keys,
                      cap_freqs)

    def embed_time(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t in [0, 1] (1 = clean), scaled by t_scale in its own dtype, embedded in float32, MLP in the weights'
        dtype, returned in the latents' dtype."""
        freq = timestep_embedding(t * self.config.t_scale).to(self.t_embedder_1.weight.dtype)
        return self.t_embedder_2(F.silu(self.t_embedder_1(freq))).to(dtype)

    def embed_caption(self, caps: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Batch-padded caption features (B, L, cap_feat_dim) -> refined caption tokens (B, L, dim)."""
        x = self.cap_embedder(self.cap_norm(caps))
        x = torch.where(layout.cap_pad[..., None], self.cap_pad_token, x)
        for block in self.context_refiner:
            x = block(x, layout.cap_freqs, layout.cap_keys, None, self.caption_attention,
                      self.caption_masked_attention)
        return x

    def core(self, tokens: torch.Tensor, image_pad: torch.Tensor, image_freqs: torch.Tensor, cap: torch.Tensor,
             layout: Layout, temb: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, N, patch_dim) with their pad flags (N,) and RoPE rows (B, N, D/2), a whole segment or a
        sequence-parallel window of it; refined caption tokens (B, L, dim). Returns the image tokens' output."""
        x = self.x_embedder(tokens)
        x = torch.where(image_pad[None, :, None], self.x_pad_token, x)
        for block in self.noise_refiner:
            x = block(x, image_freqs, None, temb, self.image_attention, self.masked_attention)
        n = x.shape[1]
        joint = torch.cat([x, cap], dim=1)
        freqs = torch.cat([image_freqs, layout.cap_freqs], dim=1)
        key_mask = None
        if layout.cap_keys is not None:
            key_mask = torch.cat([torch.ones(x.shape[0], n, dtype=torch.bool, device=x.device), layout.cap_keys], 1)
        for block in self.layers:
            joint = block(joint, freqs, key_mask, temb, self.joint_attention, self.masked_attention)
        scale = 1.0 + self.final_mod(F.silu(temb))
        return self.final_proj(layer_norm(joint[:, :n], 1e-6) * scale[:, None])

    def forward(self, x: list[torch.Tensor], t: torch.Tensor, cap_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """x: one (C, F, H, W) latent per sample, all of one size, in the model dtype; t (B,) in [0, 1], 1 = clean;
        cap_feats: one (L_i, cap_feat_dim) caption per sample. Returns one (C, F, H, W) prediction per sample."""
        latents, caps, layout, temb = self.prepare(x, t, cap_feats)
        out = self.core(self.image_tokens(latents), layout.image_pad, layout.image_freqs,
                        self.embed_caption(caps, layout), layout, temb)
        return self.unpack(out, layout)

    def image_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, padded(N), patch_dim): the patches, then copies of the last one in the pad slots
        (as the reference fills them; the pad embedding replaces them after x_embedder)."""
        tokens = patchify(latents, self.config.patch_size, self.config.f_patch_size)
        n = tokens.shape[1]
        return torch.cat([tokens, tokens[:, -1:].expand(-1, padded(n) - n, -1)], dim=1)

    def prepare(self, x: list[torch.Tensor], t: torch.Tensor, cap_feats: list[torch.Tensor]):
        """(stacked latents (B, C, F, H, W), batch-padded captions (B, L, cap_feat_dim), the layout, the timestep
        embedding in the latents' dtype)."""
        if len(x) != len(cap_feats) or len(x) != t.shape[0]:
            raise ValueError(f"{len(x)} latents, {len(cap_feats)} captions and {t.shape[0]} timesteps: one each")
        sizes = {tuple(xi.shape) for xi in x}
        if len(sizes) != 1:
            raise ValueError(f"latents of different sizes in one batch: {sorted(sizes)}; the engine batches one size")
        latents = torch.stack(x)
        cap_lens = [len(c) for c in cap_feats]
        layout = self.layout(tuple(latents.shape[2:]), cap_lens, latents.device)
        longest = layout.cap_pad.shape[1]
        # Caption pad slots hold a copy of the last real token until the pad embedding replaces them (the reference
        # repeats it too); batch padding is zeros.
        caps = torch.stack([torch.cat([c, c[-1:].expand(padded(len(c)) - len(c), -1),
                                       c.new_zeros(longest - padded(len(c)), c.shape[1])]) for c in cap_feats])
        return latents, caps, layout, self.embed_time(t, latents.dtype)

    def unpack(self, out: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
        cfg = self.config
        return list(unpatchify(out, layout.size, cfg.patch_size, cfg.f_patch_size, cfg.in_channels).unbind(0))


def diffusers_key_map(cfg: ZImageConfig) -> dict[str, tuple[str, ...]]:
    """Engine parameter name -> the diffusers ZImageTransformer2DModel tensors it is made of (concatenated)."""
    out: dict[str, tuple[str, ...]] = {}
    key = f"{cfg.patch_size}-{cfg.f_patch_size}"

    def linear(dst: str, *srcs: str, bias: bool = True) -> None:
        out[f"{dst}.weight"] = tuple(f"{s}.weight" for s in srcs)
        if bias:
            out[f"{dst}.bias"] = tuple(f"{s}.bias" for s in srcs)

    def block(dst: str, modulated: bool) -> None:
        a = f"{dst}.attention"
        linear(f"{a}.to_qkv", f"{a}.to_q", f"{a}.to_k", f"{a}.to_v", bias=False)
        linear(f"{a}.to_out", f"{a}.to_out.0", bias=False)
        out[f"{a}.norm_q.weight"] = (f"{a}.norm_q.weight",)
        out[f"{a}.norm_k.weight"] = (f"{a}.norm_k.weight",)
        # w1 then w3: the packed-modules mapping (engine.quant.names) reads these sources in this order.
        linear(f"{dst}.feed_forward.w13", f"{dst}.feed_forward.w1", f"{dst}.feed_forward.w3", bias=False)
        linear(f"{dst}.feed_forward.w2", f"{dst}.feed_forward.w2", bias=False)
        for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            out[f"{dst}.{norm}.weight"] = (f"{dst}.{norm}.weight",)
        if modulated:
            linear(f"{dst}.adaLN_modulation", f"{dst}.adaLN_modulation.0")

    linear("x_embedder", f"all_x_embedder.{key}")
    for i in range(cfg.n_refiner_layers):
        block(f"noise_refiner.{i}", True)
        block(f"context_refiner.{i}", False)
    linear("t_embedder_1", "t_embedder.mlp.0")
    linear("t_embedder_2", "t_embedder.mlp.2")
    out["cap_norm.weight"] = ("cap_embedder.0.weight",)
    linear("cap_embedder", "cap_embedder.1")
    out["x_pad_token"] = ("x_pad_token",)
    out["cap_pad_token"] = ("cap_pad_token",)
    for i in range(cfg.n_layers):
        block(f"layers.{i}", True)
    linear("final_mod", f"all_final_layer.{key}.adaLN_modulation.1")
    linear("final_proj", f"all_final_layer.{key}.linear")
    return out

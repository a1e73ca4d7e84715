"""Ideogram 4's flow-matching DiT (the same architecture serves the conditional `transformer` and the
`unconditional_transformer`). Written from the published architecture (diffusers' Ideogram4Transformer2DModel was read
for the math, nothing imported). What sets it apart:
  - one packed sequence [left-pad | text | image] per sample: every token carries both an image slot (noisy patch
    tokens, in_channels wide) and a text slot (the Qwen3-VL features, llm_features_dim wide); an indicator says which
    one is real (3 = text, 2 = image, anything else: padding) and the other is zeroed; segment ids say which tokens
    attend to which (-1 = padding);
  - interleaved 3-axis MRoPE (t, h, w) with the rotate-half pairing: text token j sits at (j, j, j), image token
    (h, w) at (65536, 65536 + h, 65536 + w). Those positions are not representable in bf16 (above 65536 bf16 steps by
    512), so the angles are computed in float32 with autocast off whatever the model dtype, then cast;
  - the time t runs from 0 (noise) to 1 (clean), embedded at 1e4 * t (sin | cos order) and fed to a small MLP; one
    adaLN vector per sample drives every block (scale and tanh gate, no shift) and the final layer;
  - sandwich RMS norms around attention and the SwiGLU feed-forward, q/k RMS norms per head.
Layout differences only: Q, K, V fused into one linear; the feed-forward's w1 and w3 fused into w13 (the key map
packs them, so a --quant-ignored-layers pattern naming w1 or w3 reaches w13). Segment ids become a key mask: the
engine takes one sample per batch row (one real segment), so a token attends to every non-padding token; padding
tokens' own outputs are not meaningful (the reference lets them attend to each other; nothing reads them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionFn, MaskedAttentionFn, masked_sdpa_attention, sdpa_attention
from engine.models.common import RoundedRMSNorm, linear_pieces, qkv_heads

PADDING_INDICATOR = -1
IMAGE_INDICATOR = 2
TEXT_INDICATOR = 3
IMAGE_POSITION_OFFSET = 65536  # image grid coordinates start here, disjoint from text positions
TIME_SCALE = 1e4  # t in [0, 1] is embedded at TIME_SCALE * t


@dataclass(frozen=True)
class Ideogram4Config:
    in_channels: int = 128
    num_layers: int = 34
    attention_head_dim: int = 256
    num_attention_heads: int = 18
    intermediate_size: int = 12288
    adaln_dim: int = 512
    llm_features_dim: int = 53248
    rope_theta: float = 5_000_000
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    norm_eps: float = 1e-5

    @classmethod
    def from_diffusers(cls, config: dict) -> "Ideogram4Config":
        fields = {k: v for k, v in config.items() if k in cls.__dataclass_fields__}
        if "mrope_section" in fields:
            fields["mrope_section"] = tuple(fields["mrope_section"])
        cfg = cls(**fields)
        # The h and w sections take frequencies 1, 4, 7, ... and 2, 5, 8, ...: they must fit in head_dim / 2 (the
        # release's (24, 20, 20) reaches frequency 59 of 128; the rest stay on the t axis).
        half = cfg.attention_head_dim // 2
        if len(cfg.mrope_section) != 3 or any(3 * n - 3 + a >= half for a, n in ((1, cfg.mrope_section[1]),
                                                                               (2, cfg.mrope_section[2])) if n):
            raise ValueError(f"mrope_section {cfg.mrope_section} must be three sections whose h and w frequencies "
                             f"(3 n of them, interleaved) fit in half the head dim {cfg.attention_head_dim}")
        return cfg

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads


SIZES: dict[str, Ideogram4Config] = {
    "ideogram4": Ideogram4Config(),  # ideogram-ai/ideogram-v4: 9.3B parameters per transformer
}


# --- positions ------------------------------------------------------------------------------------------------------
def mrope_angles(position_ids: torch.Tensor, head_dim: int, theta: float, section: tuple[int, int, int]
                 ) -> torch.Tensor:
    """(B, L, 3) integer positions -> (B, L, head_dim / 2) float32 angles, interleaved: frequency i takes the h axis
    where i % 3 == 1 (i < 3 section[1]), the w axis where i % 3 == 2 (i < 3 section[2]), else t. Always float32 with
    autocast off: positions above 65536 collapse in bf16 (a planted-bug catalogue entry checks the gate sees it)."""
    if position_ids.ndim != 3 or position_ids.shape[-1] != 3:
        raise ValueError(f"position_ids must be (B, L, 3), got {tuple(position_ids.shape)}")
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
                               / head_dim))
        angles = position_ids.float()[..., None] * inv  # (B, L, 3, D/2): one product each, as exact as a matmul
    # Which axis each frequency takes, by arithmetic: an indexed write of a Python number copies that number to the
    # device, which a CUDA graph capture refuses (measured on an H100: "Cannot copy between CPU and CUDA tensors").
    i = torch.arange(head_dim // 2, device=position_ids.device)
    axis = ((i % 3 == 1) & (i < 3 * section[1])).long() + 2 * ((i % 3 == 2) & (i < 3 * section[2])).long()
    return angles.gather(2, axis.view(1, 1, 1, -1).expand(*angles.shape[:2], 1, -1)).squeeze(2)


def rope_tables(position_ids: torch.Tensor, cfg: Ideogram4Config, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, L, head_dim) in `dtype` (the reference rounds them to the model dtype)."""
    angles = mrope_angles(position_ids, cfg.attention_head_dim, cfg.rope_theta, cfg.mrope_section)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, D) rotated in its own dtype by tables (B, L, D)."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) t in [0, 1] -> (B, dim) float32 [sin | cos] of TIME_SCALE * t over dim/2 frequencies from 1 to 1e-4."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(1e4) / (half - 1)))
    args = (TIME_SCALE * t.float())[..., None] * freq
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# --- layers ---------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: Ideogram4Config):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.to_qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.norm_q = RoundedRMSNorm(cfg.attention_head_dim, 1e-5)  # eps 1e-5 whatever norm_eps is, as the reference
        self.norm_k = RoundedRMSNorm(cfg.attention_head_dim, 1e-5)
        self.to_out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, key_mask, attention: AttentionFn, masked_attention: MaskedAttentionFn):
        q, k, v = qkv_heads(self.to_qkv, x, self.heads)
        q, k = apply_rope(self.norm_q(q), cos, sin), apply_rope(self.norm_k(k), cos, sin)
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
    def __init__(self, cfg: Ideogram4Config):
        super().__init__()
        d = cfg.hidden_size
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(d, cfg.intermediate_size)
        self.attention_norm1 = RoundedRMSNorm(d, cfg.norm_eps)
        self.attention_norm2 = RoundedRMSNorm(d, cfg.norm_eps)
        self.ffn_norm1 = RoundedRMSNorm(d, cfg.norm_eps)
        self.ffn_norm2 = RoundedRMSNorm(d, cfg.norm_eps)
        self.adaln_modulation = nn.Linear(cfg.adaln_dim, 4 * d)

    def forward(self, x, cos, sin, key_mask, adaln, attention: AttentionFn, masked_attention: MaskedAttentionFn):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaln_modulation(adaln).chunk(4, dim=-1)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        attn = self.attention(self.attention_norm1(x) * scale_msa, cos, sin, key_mask, attention, masked_attention)
        x = x + gate_msa * self.attention_norm2(attn)
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class Ideogram4Transformer(nn.Module):
    # The method a CUDA graph wraps (engine/optimize.py): forward reads the batch's layout on the host, which a
    # capture cannot contain (cudaErrorStreamCaptureUnsupported on the H200 gpu suite run).
    GRAPH_ENTRY = "packed_forward"

    def __init__(self, cfg: Ideogram4Config):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.input_proj = nn.Linear(cfg.in_channels, d)
        self.llm_cond_norm = RoundedRMSNorm(cfg.llm_features_dim, 1e-6)
        self.llm_cond_proj = nn.Linear(cfg.llm_features_dim, d)
        self.t_mlp_in = nn.Linear(d, d)
        self.t_mlp_out = nn.Linear(d, d)
        self.adaln_proj = nn.Linear(d, cfg.adaln_dim)
        self.image_indicator = nn.Parameter(torch.zeros(2, d))  # row 0: not an image token, row 1: an image token
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_mod = nn.Linear(cfg.adaln_dim, d)
        self.final_proj = nn.Linear(d, cfg.in_channels)
        # Swappable after build (sequence parallelism, other kernels); not parameters, not in the state dict.
        self.attention: AttentionFn = sdpa_attention
        self.masked_attention: MaskedAttentionFn = masked_sdpa_attention

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) t (1 = clean) -> the (B, 1, adaln_dim) adaLN input, silu applied; the embedding is rounded to t's
        dtype before the MLP, as the reference rounds it."""
        emb = time_embedding(t, self.config.hidden_size).to(t.dtype)
        return F.silu(self.adaln_proj(self.t_mlp_out(F.silu(self.t_mlp_in(emb)))))[:, None]

    def embed(self, hidden_states, encoder_hidden_states, indicator, text: bool | None = None) -> torch.Tensor:
        """The packed input tokens: each token's image slot or text slot, whichever its indicator names, plus the
        image-indicator embedding. A sequence without text tokens (the unconditional model's) skips the text path:
        there it is multiplied by zero everywhere."""
        image = (indicator == IMAGE_INDICATOR).to(hidden_states.dtype)[..., None]
        x = self.input_proj(hidden_states * image) * image
        if text is None:  # read on the host: a caller that knows the layout passes it (see packed_forward)
            text = bool((indicator == TEXT_INDICATOR).any())
        if text:
            is_text = (indicator == TEXT_INDICATOR).to(hidden_states.dtype)[..., None]
            x = x + self.llm_cond_proj(self.llm_cond_norm(encoder_hidden_states * is_text)) * is_text
        return x + self.image_indicator[(indicator == IMAGE_INDICATOR).long()]

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                position_ids: torch.Tensor, segment_ids: torch.Tensor, indicator: torch.Tensor,
                layout: PackedLayout | None = None) -> torch.Tensor:
        """hidden_states (B, L, in_channels) and encoder_hidden_states (B, L, llm_features_dim) in the model dtype,
        timestep (B,) in [0, 1] (1 = clean), position_ids (B, L, 3), segment_ids and indicator (B, L). Returns
        (B, L, in_channels); only image positions carry a prediction. `layout`: what the batch holds, when the caller
        already knows it (the pipeline reads it from its host-side ids); else it is read here, a host
        synchronisation."""
        layout = layout or packed_layout(segment_ids, indicator)
        return self.packed_forward(hidden_states, timestep, encoder_hidden_states, position_ids, segment_ids,
                                   indicator, layout.text, layout.padded)

    def packed_forward(self, hidden_states, timestep, encoder_hidden_states, position_ids, segment_ids, indicator,
                       text: bool, padded: bool) -> torch.Tensor:
        """forward with the layout's two choices as arguments: no value is read back to the host, so this is what a
        CUDA graph captures (GRAPH_ENTRY), once per (text, padded) pair, and a batch whose layout differs from the
        captured one gets its own graph instead of replaying the wrong mask."""
        key_mask = (segment_ids != PADDING_INDICATOR) if padded else None
        x = self.embed(hidden_states, encoder_hidden_states, indicator, text)
        adaln = self.embed_time(timestep)
        cos, sin = rope_tables(position_ids, self.config, x.dtype)
        return self.core(x, cos, sin, key_mask, adaln)

    def core(self, x, cos, sin, key_mask, adaln) -> torch.Tensor:
        """The blocks and the final layer on embedded tokens (a whole sequence or a sequence-parallel window)."""
        for block in self.layers:
            x = block(x, cos, sin, key_mask, adaln, self.attention, self.masked_attention)
        scale = 1.0 + self.final_mod(F.silu(adaln))
        return self.final_proj(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * scale)


@dataclass(frozen=True)
class PackedLayout:
    """What a packed batch holds, read once on the host: whether any token is text (the conditional sequence; the
    unconditional one is image tokens only), whether any key is padding, and how many tokens precede the image
    (text and left padding, the most over the batch: the region a sequence-parallel forward keeps whole on every
    rank). The forward branches on all three."""
    text: bool
    padded: bool
    text_len: int


def packed_layout(segment_ids: torch.Tensor, indicator: torch.Tensor) -> PackedLayout:
    """Read (and check) a batch's layout; on a CUDA tensor this waits for the device, so the pipeline calls it once per
    generation on its host-side ids, not once per step."""
    image = indicator == IMAGE_INDICATOR
    text_len = int((~image).sum(1).max())
    if not bool(image[:, text_len:].all()):
        raise ValueError("a packed sequence must hold its image tokens last, after every text and pad token "
                         "([left-pad | text | image]); the sequence-parallel forward cuts it there")
    return PackedLayout(text=bool((indicator == TEXT_INDICATOR).any()),
                        padded=segment_key_mask(segment_ids) is not None,  # which also checks one sample per row
                        text_len=text_len)


def segment_key_mask(segment_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, L) segment ids -> a (B, L) key mask (False on padding), or None when nothing is padding. The reference's
    block-diagonal mask reduces to this for one real segment per row, which is all the engine takes."""
    real = segment_ids != PADDING_INDICATOR
    info = torch.iinfo(segment_ids.dtype)
    hi = torch.where(real, segment_ids, info.min).amax(1)
    lo = torch.where(real, segment_ids, info.max).amin(1)
    if bool(((hi != lo) & real.any(1)).any()):
        raise ValueError("segment_ids pack several samples into one row; the engine takes one sample per row")
    return None if bool(real.all()) else real


def diffusers_key_map(cfg: Ideogram4Config) -> dict[str, tuple[str, ...]]:
    """Engine parameter name -> the diffusers Ideogram4Transformer2DModel tensors it is made of (concatenated)."""
    out: dict[str, tuple[str, ...]] = {}

    def linear(dst: str, *srcs: str, bias: bool = True) -> None:
        out[f"{dst}.weight"] = tuple(f"{s}.weight" for s in srcs)
        if bias:
            out[f"{dst}.bias"] = tuple(f"{s}.bias" for s in srcs)

    linear("input_proj", "input_proj")
    out["llm_cond_norm.weight"] = ("llm_cond_norm.weight",)
    linear("llm_cond_proj", "llm_cond_proj")
    linear("t_mlp_in", "t_embedding.mlp_in")
    linear("t_mlp_out", "t_embedding.mlp_out")
    linear("adaln_proj", "adaln_proj")
    out["image_indicator"] = ("embed_image_indicator.weight",)
    for i in range(cfg.num_layers):
        b, a = f"layers.{i}", f"layers.{i}.attention"
        linear(f"{a}.to_qkv", f"{a}.to_q", f"{a}.to_k", f"{a}.to_v", bias=False)
        linear(f"{a}.to_out", f"{a}.to_out.0", bias=False)
        out[f"{a}.norm_q.weight"] = (f"{a}.norm_q.weight",)
        out[f"{a}.norm_k.weight"] = (f"{a}.norm_k.weight",)
        # w1 then w3: the packed-modules mapping (engine.quant.names) reads these sources in this order.
        linear(f"{b}.feed_forward.w13", f"{b}.feed_forward.w1", f"{b}.feed_forward.w3", bias=False)
        linear(f"{b}.feed_forward.w2", f"{b}.feed_forward.w2", bias=False)
        for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            out[f"{b}.{norm}.weight"] = (f"{b}.{norm}.weight",)
        linear(f"{b}.adaln_modulation", f"{b}.adaln_modulation")
    linear("final_mod", "final_layer.adaln_modulation")
    linear("final_proj", "final_layer.linear")
    return out

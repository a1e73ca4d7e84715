"""Gemma 4 unified: the encoder-free vision and audio embedders, their placement in the token stream, and the
language model around them.

Gemma 4 unified has no vision tower and no audio conformer. Raw pixel patches and raw waveform frames are projected
straight into the language model's embedding space:
  vision: merged patch (model_patch_size^2 * 3 pixels) -> LN -> Dense -> LN -> + factorized 2-D position embedding
          (one table row per axis, rows of padding patches, position -1, contribute nothing) -> LN -> projection
  audio:  waveform, zero-padded to a multiple of samples_per_token, cut into frames of samples_per_token samples ->
          projection
  projection (shared shape, own weights per modality): RMSNorm WITHOUT a learned scale -> Linear (no bias)
The embeddings replace the placeholder tokens (<|image|>, <|audio|>) of the prompt, in order.

The embedders are ours. The decoder is transformers' Gemma 4 text model used as a component (as the other families
use transformers text encoders), with its attention masks (sliding window, bidirectional within each image's block of
tokens, the blocks found here) built by transformers' mask helper; the engine's quantization walk replaces its block
linears from outside. No quantization or parallel code lives here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# --- the embedders --------------------------------------------------------------------------------------------------


def rms_norm_no_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) in float32, cast back: Gemma's RMSNorm with its scale switched off. Computed as
    x * pow(ms + eps, -0.5), the reference's own order of operations, so fp32 stays bitwise comparable."""
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)


class Projection(nn.Module):
    """The multimodal projection into the language model: RMSNorm without a scale, then Linear without a bias."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(rms_norm_no_scale(x.to(self.linear.weight.dtype), self.eps))


def factorized_position_embedding(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """table (P, 2, D), positions (..., 2) integer (x, y), -1 = padding -> (..., D): table[x, 0] + table[y, 1], with
    each axis's term zeroed where that coordinate is -1 (a padding patch adds no position at all)."""
    valid = (positions >= 0).to(table.dtype).unsqueeze(-1)  # (..., 2, 1)
    idx = positions.clamp(min=0).long()
    per_axis = torch.stack([table[idx[..., 0], 0], table[idx[..., 1], 1]], dim=-2)  # (..., 2, D)
    return (per_axis * valid).sum(-2)


class VisionEmbedder(nn.Module):
    def __init__(self, patch_dim: int, embed_dim: int, posemb_size: int, out_dim: int, eps: float):
        super().__init__()
        self.norm_in = nn.LayerNorm(patch_dim)
        self.dense = nn.Linear(patch_dim, embed_dim)
        self.norm_dense = nn.LayerNorm(embed_dim)
        self.pos_table = nn.Parameter(torch.zeros(posemb_size, 2, embed_dim))
        self.norm_pos = nn.LayerNorm(embed_dim)
        self.projection = Projection(embed_dim, out_dim, eps)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """patches (B, N, patch_dim), positions (B, N, 2) -> (B, N, out_dim) for every row, padding rows included
        (the caller keeps the valid ones: `valid_patches`)."""
        h = self.norm_dense(self.dense(self.norm_in(patches.to(self.dense.weight.dtype))))
        h = self.norm_pos(h + factorized_position_embedding(self.pos_table, positions))
        return self.projection(h)


def valid_patches(embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, N, D) embeddings -> (n_valid, D): the rows whose position is not padding, image after image."""
    return embeddings[(positions >= 0).all(-1)]


def audio_frames(waveform: torch.Tensor, samples_per_token: int) -> torch.Tensor:
    """1-D waveform -> (ceil(len / samples_per_token), samples_per_token) frames; the last frame is zero-padded.
    Each frame is one audio soft token (40 ms at 16 kHz for the full model's 640 samples)."""
    if waveform.dim() != 1:
        raise ValueError(f"audio_frames takes one 1-D waveform, got shape {tuple(waveform.shape)}")
    pad = (-waveform.shape[0]) % samples_per_token
    return F.pad(waveform, (0, pad)).reshape(-1, samples_per_token)


def place(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor) -> torch.Tensor:
    """Put `features` (n, D) at the positions of `token_id` in (B, S) input_ids, in reading order; their count must
    match the placeholders'."""
    mask = input_ids == token_id
    n = int(mask.sum())
    if n != features.shape[0]:
        raise ValueError(f"{n} placeholder tokens (id {token_id}) but {features.shape[0]} embeddings to place")
    out = embeds.clone()
    out[mask] = features.to(out.dtype)
    return out


def vision_blocks(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) token types -> (B, S) block ids: each contiguous run of image/video tokens (types 1, 2) gets its own id
    (0, 1, ...), other tokens -1. Tokens of one block attend to each other both ways (in the masks' sliding and
    full layers alike, as transformers' forward builds them); the rest is causal."""
    vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    starts = vision & ~F.pad(vision, (1, 0))[:, :-1]
    return torch.where(vision, starts.long().cumsum(-1) - 1, -1)


# --- the model ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """The special token ids the model places embeddings at (from the checkpoint's config.json)."""
    image: int
    audio: int
    video: int
    pad: int


@dataclass
class Prompt:
    """One prompt's model inputs: token ids from the tokenizer/processor, merged pixel patches with their positions
    from the image processor, raw waveforms (the engine frames them itself)."""
    input_ids: torch.Tensor  # (1, S)
    mm_token_type_ids: torch.Tensor  # (1, S): 0 text, 1 image, (2 video), 3 audio, as the processor marks them
    pixel_values: torch.Tensor | None = None  # (n_images, N, patch_dim)
    image_position_ids: torch.Tensor | None = None  # (n_images, N, 2)
    waveforms: tuple[torch.Tensor, ...] = ()  # 1-D each
    # Tokens appended by greedy decoding at the end of input_ids. One that happens to be a placeholder id is embedded
    # as PAD and receives no media embedding, as transformers' decoding steps do.
    generated: int = 0

    @classmethod
    def of(cls, inputs) -> "Prompt":
        """From the named tensors the harness passes (a Prompt passes through)."""
        return inputs if isinstance(inputs, Prompt) else cls(**inputs)


class Gemma4Unified(nn.Module):
    def __init__(self, config):
        """`config`: a transformers Gemma4UnifiedConfig (what the folder's config.json holds)."""
        from transformers import Gemma4UnifiedTextModel

        super().__init__()
        text, vision, audio = config.text_config, config.vision_config, config.audio_config
        self.config = config
        self.tokens = Tokens(config.image_token_id, config.audio_token_id, config.video_token_id, text.pad_token_id)
        self.language_model = Gemma4UnifiedTextModel(text)
        self.vision = None if vision is None else VisionEmbedder(
            vision.model_patch_size ** 2 * 3, vision.mm_embed_dim, vision.mm_posemb_size, text.hidden_size,
            vision.rms_norm_eps)
        self.audio = None if audio is None else Projection(audio.audio_embed_dim, text.hidden_size, audio.rms_norm_eps)
        self.samples_per_token = None if audio is None else audio.audio_embed_dim
        self.softcap = text.final_logit_softcapping
        self.bidirectional_vision = text.use_bidirectional_attention == "vision"
        if not config.tie_word_embeddings:
            raise ValueError("this Gemma 4 unified checkpoint has an untied LM head; the engine supports tied only")

    # The pieces, each callable on its own so the harness can compare them with the reference's.
    def image_embeddings(self, prompt: Prompt) -> torch.Tensor:
        """Every row of the vision embedder's output, (n_images, N, D), padding rows included."""
        return self.vision(prompt.pixel_values, prompt.image_position_ids)

    def audio_embeddings(self, prompt: Prompt) -> torch.Tensor:
        """(n_frames, D): every waveform's frames projected, waveform after waveform."""
        frames = torch.cat([audio_frames(w.float(), self.samples_per_token) for w in prompt.waveforms])
        return self.audio(frames)

    def input_embeddings(self, prompt: Prompt) -> torch.Tensor:
        ids = prompt.input_ids
        placeholders = (ids == self.tokens.image) | (ids == self.tokens.audio) | (ids == self.tokens.video)
        # Placeholder ids may lie outside the token table (the real ones do not, but checkpoints vary): embed PAD.
        embeds = self.language_model.embed_tokens(torch.where(placeholders, self.tokens.pad, ids))
        n = ids.shape[1] - prompt.generated
        head, tail = embeds[:, :n], embeds[:, n:]
        if prompt.pixel_values is not None:
            features = valid_patches(self.image_embeddings(prompt), prompt.image_position_ids)
            head = place(head, ids[:, :n], self.tokens.image, features)
        if prompt.waveforms:
            head = place(head, ids[:, :n], self.tokens.audio, self.audio_embeddings(prompt))
        return torch.cat([head, tail], dim=1)

    def embedders(self, inputs) -> dict[str, torch.Tensor]:
        """Each embedder's full output for this prompt: image_embedder (n_images, N, D), audio_embedder (n, D)."""
        prompt = Prompt.of(inputs)
        out = {}
        if prompt.pixel_values is not None:
            out["image_embedder"] = self.image_embeddings(prompt)
        if prompt.waveforms:
            out["audio_embedder"] = self.audio_embeddings(prompt)
        return out

    def logits(self, inputs) -> torch.Tensor:
        """(1, S, vocab) float32 logits of every position, soft-capped as the checkpoint says."""
        prompt = Prompt.of(inputs)
        from transformers.masking_utils import create_masks_for_generate

        embeds = self.input_embeddings(prompt)
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        masks = create_masks_for_generate(
            config=self.config.get_text_config(), inputs_embeds=embeds, cache=None, position_ids=positions,
            attention_mask=torch.ones_like(prompt.input_ids),
            block_sequence_ids=vision_blocks(prompt.mm_token_type_ids) if self.bidirectional_vision else None)
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=masks, position_ids=positions,
                                     use_cache=False).last_hidden_state
        # The LM head is the token table (tied), without the input's sqrt(hidden) scale.
        logits = F.linear(hidden, self.language_model.embed_tokens.weight).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def greedy(self, inputs, n_tokens: int) -> torch.Tensor:
        """n_tokens greedy continuation tokens (1-D), recomputing the whole sequence each step (no KV cache: the
        tiny models this runs on are cheap, and it keeps the decode path free of a second implementation)."""
        prompt = Prompt.of(inputs)
        ids, types = prompt.input_ids, prompt.mm_token_type_ids
        out = []
        for _ in range(n_tokens):
            step = Prompt(ids, types, prompt.pixel_values, prompt.image_position_ids, prompt.waveforms, len(out))
            nxt = self.logits(step)[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            ids = torch.cat([ids, nxt], dim=1)
            types = torch.cat([types, torch.zeros_like(nxt)], dim=1)
        return torch.cat(out, dim=1)[0]


# --- loading a transformers folder ----------------------------------------------------------------------------------

# Engine name prefix -> checkpoint prefix (transformers' Gemma4UnifiedForConditionalGeneration state dict).
_PREFIXES = {
    "language_model.": "model.language_model.",
    "vision.norm_in.": "model.embed_vision.patch_ln1.",
    "vision.dense.": "model.embed_vision.patch_dense.",
    "vision.norm_dense.": "model.embed_vision.patch_ln2.",
    "vision.pos_table": "model.embed_vision.pos_embedding",
    "vision.norm_pos.": "model.embed_vision.pos_norm.",
    "vision.projection.linear.": "model.embed_vision.multimodal_embedder.embedding_projection.",
    "audio.linear.": "model.embed_audio.embedding_projection.",
}


def checkpoint_name(engine_name: str) -> str:
    for ours, theirs in _PREFIXES.items():
        if engine_name.startswith(ours):
            return theirs + engine_name[len(ours):]
    raise KeyError(f"no checkpoint name for engine tensor {engine_name!r}")


def key_map(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Engine state-dict name -> (checkpoint name,), for engine.loading.remap."""
    return {name: (checkpoint_name(name),) for name in model.state_dict()}


def load(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Gemma4Unified:
    """Build the model from a transformers Gemma 4 unified folder (config.json + safetensors). Built on the device,
    not the meta device: the decoder's rotary tables and embedding scale are non-persistent buffers that a meta
    build would leave empty."""
    from transformers import AutoConfig

    from engine.loading import read_checkpoint, remap

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "gemma4_unified":
        raise ValueError(f"{folder} holds a {config.model_type!r} model, not gemma4_unified")
    with torch.device(device):
        model = Gemma4Unified(config)
    checkpoint = read_checkpoint(Path(folder))
    checkpoint.pop("lm_head.weight", None)  # tied to the token table; some exports write it anyway
    model.load_state_dict(remap(checkpoint, key_map(model)), strict=True)
    return model.to(dtype).eval().requires_grad_(False)

"""Gemma 4 unified's planted bugs (issue 13), run against harness/suites/gemma.toml's fp32 cell by
`python -m harness.token_sweep --suite gemma --selftest` (the token-logits suite's own selftest: harness/token_sweep.py
selftest()). The mechanism is the other families' (harness/selftest/plants.py): each plant patches one product name
from TARGETS, from outside; the product never knows."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.selftest.plants import Patcher, Plant, catalogue

TARGETS = {
    "gemma_posemb": "engine.models.gemma4_unified:factorized_position_embedding",
    "gemma_rms_norm_no_scale": "engine.models.gemma4_unified:rms_norm_no_scale",
    "gemma_audio_frames": "engine.models.gemma4_unified:audio_frames",
    "gemma_place": "engine.models.gemma4_unified:place",
}

FP32 = ("/fp32/none/sp1/",)


def _axes_swapped(p: Patcher):
    """(x, y) read as (y, x): the row axis' table looked up with the column index and vice versa."""
    p.wrap("gemma_posemb", lambda f: lambda table, positions: f(table, positions.flip(-1)))


def _padding_unmasked(p: Patcher):
    """-1 positions clamped to 0 and looked up like any other: padding rows get row 0 of both axes' tables."""
    def unmasked(table, positions):
        idx = positions.clamp(min=0).long()
        return table[idx[..., 0], 0] + table[idx[..., 1], 1]
    p.set("gemma_posemb", unmasked)


def _norm_scaled(p: Patcher):
    """The projection's RMSNorm with a learned per-channel scale, as Gemma's other RMSNorms have (drawn like synth
    draws a norm weight, 1 + N(0, 0.1^2)), where the checkpoint has none."""
    def make(f):
        def scaled(x, eps):
            scale = 1.0 + 0.1 * torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0))
            return f(x, eps) * scale.to(x.dtype)
        return scaled
    p.wrap("gemma_rms_norm_no_scale", make)


def _audio_multiple(p: Patcher):
    """The waveform padded to a multiple of twice the samples per token: an extra silent frame whenever the length
    lands in the first half of a double frame."""
    def frames(waveform, samples_per_token):
        pad = (-waveform.shape[0]) % (2 * samples_per_token)
        return F.pad(waveform, (0, pad)).reshape(-1, samples_per_token)
    p.set("gemma_audio_frames", frames)


def _image_late(p: Patcher):
    """Image embeddings placed one token after their placeholders (the first lands on the next placeholder, the last
    on <|eoi|>)."""
    from harness.zoo.gemma4_unified import token_ids

    image = token_ids()["<|image|>"]

    def make(f):
        def late(embeds, input_ids, token_id, features):
            if token_id != image:
                return f(embeds, input_ids, token_id, features)
            shifted = torch.cat([torch.full_like(input_ids[:, :1], -1), input_ids[:, :-1]], dim=1)
            return f(embeds, shifted, token_id, features)
        return late
    p.wrap("gemma_place", make)


CATALOGUE = catalogue(
    "gemma4-unified",
    Plant("gemma_position_axes_swapped", "dit", "the factorized 2-D position embedding reads (x, y) as (y, x)", FP32,
          _axes_swapped),
    Plant("gemma_padding_positions_unmasked", "dit", "padding patches (position -1) get a position embedding", FP32,
          _padding_unmasked),
    Plant("gemma_projection_norm_scaled", "dit", "the projection's RMSNorm applies a learned scale it does not have",
          FP32, _norm_scaled),
    Plant("gemma_audio_padding_multiple", "pipeline", "the waveform is padded to the wrong multiple of samples",
          FP32, _audio_multiple),
    Plant("gemma_image_one_token_late", "pipeline", "image embeddings are placed one token late", FP32,
          _image_late),
)

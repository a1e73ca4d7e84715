"""Wan 2.2's planted bugs (issue 11), run against harness/suites/wan.toml's cells by `parity selftest --suite wan`.
The same mechanism as the other catalogues (harness/selftest/plants.py): each plant patches one product name from
TARGETS, from outside; product code never knows."""
from __future__ import annotations

import torch

from harness.selftest.plants import Patcher, Plant, catalogue

TARGETS = {
    "wan_expert_schedule": "engine.pipelines.wan:expert_schedule",
    "wan_guidance_scales": "engine.pipelines.wan:guidance_scales",
    "wan_token_timesteps": "engine.pipelines.wan:token_timesteps",
    "wan_token_rope": "engine.models.wan:token_rope",
    "wan_to_uint8": "engine.pipelines.wan:to_uint8_images",
}

A14B = ("wan/tiny/fp32/none/sp1+truecfg/",)
TI2V_IMAGE = ("wan-ti2v/tiny/fp32/none/sp1+truecfg+image/",)


def _switch_late(p: Patcher):
    """The switch to transformer_2 one step late (as a `t > previous boundary step` slip would make it)."""
    def make(schedule):
        def late(timesteps, boundary):
            experts = schedule(timesteps, boundary)
            return experts[:1] + experts[:-1]
        return late
    p.wrap("wan_expert_schedule", make)


def _scale_2_ignored(p: Patcher):
    def make(scales):
        def ignored(s):
            first, _ = scales(s)
            return first, first
        return ignored
    p.wrap("wan_guidance_scales", make)


def _first_frame_not_zeroed(p: Patcher):
    def make(timesteps):
        def everywhere(mask, t, batch):
            return timesteps(torch.ones_like(mask), t, batch)
        return everywhere
    p.wrap("wan_token_timesteps", make)


def _rope_frame_offset(p: Patcher):
    """Latent frames after the first one temporal RoPE position late (a uniform shift would cancel in q.k)."""
    def make(rope):
        def shifted(tables, grid, dims):
            f, h, w = grid
            cos, sin = rope(tables, (f + 1, h, w), dims)
            keep = torch.cat([torch.arange(h * w), torch.arange(2 * h * w, (f + 1) * h * w)])
            return cos[keep], sin[keep]
        return shifted
    p.wrap("wan_token_rope", make)


def _frames_swapped(p: Patcher):
    """Decoded frames 1 and 2 swapped (a frame-order slip in the video writer)."""
    def make(to_uint8):
        def swapped(decoded):
            out = to_uint8(decoded)
            if out.shape[1] > 2:
                out = out.copy()
                out[:, [1, 2]] = out[:, [2, 1]]
            return out
        return swapped
    p.wrap("wan_to_uint8", make)


CATALOGUE_A14B: dict[str, Plant] = catalogue(
    "wan",
    Plant("wan_expert_switch_late", "pipeline", "the switch to the low-noise expert one step late", A14B,
          _switch_late),
    Plant("wan_guidance_scale_2_ignored", "pipeline", "the second expert guided with guidance_scale, not "
          "guidance_scale_2", A14B, _scale_2_ignored),
    Plant("wan_rope_frame_offset", "dit", "latent frames after the first one temporal RoPE position late", A14B,
          _rope_frame_offset),
    Plant("wan_frames_swapped", "pipeline", "decoded video frames 1 and 2 swapped", A14B, _frames_swapped),
)
CATALOGUE_TI2V: dict[str, Plant] = catalogue(
    "wan-ti2v",
    Plant("wan_ti2v_first_frame_timestep_not_zeroed", "pipeline",
          "TI2V image-conditioned: the first frame's tokens get the step's timestep instead of 0", TI2V_IMAGE,
          _first_frame_not_zeroed),
)
CATALOGUE = {**CATALOGUE_A14B, **CATALOGUE_TI2V}

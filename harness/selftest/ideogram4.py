"""Ideogram 4's planted bugs (issue 12), run against harness/suites/ideogram4.toml's cells by `parity selftest --suite
ideogram4`. The same mechanism as FLUX.1's catalogue (harness/selftest/plants.py): each plant patches one product name
from TARGETS, from outside; product code never knows. The reference keeps its own copies of the schedule math
(diffusers'), the presets and the tap rule, so no plant reaches it."""
from __future__ import annotations

import math

import torch

from harness.selftest.plants import Patcher, Plant, catalogue

TARGETS = {
    "ideogram4_sigmas64": "engine.sampling.logit_normal:logit_normal_sigmas64",
    "ideogram4_guidance": "engine.pipelines.ideogram4:Ideogram4Sampling.guidance",
    "ideogram4_branches": "engine.pipelines.ideogram4:Ideogram4Pipeline.branches",
    "ideogram4_tapped_layers": "engine.pipelines.ideogram4:tapped_layers",
    "ideogram4_mrope_angles": "engine.models.ideogram4:mrope_angles",
    "ideogram4_fp8_from_checkpoint": "engine.quant.linear:Fp8Linear.from_checkpoint",
    "ideogram4_component_linear": "engine.quant.component:quantized_linear",
}

FP32 = ("/fp32/none/sp1+truecfg/",)
FP8_CKPT = ("/bf16/fp8-wo-ckpt/sp1+truecfg/",)


def sigmas_in_float32(steps: int, mu: float, std: float, logsnr_range=(-15.0, 18.0)) -> torch.Tensor:
    """The schedule evaluated in float32 (then widened): every level moves by float32 rounding."""
    lo, hi = logsnr_range
    s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
    t = 1.0 - torch.special.expit(mu + std * torch.special.ndtri(s))
    t = t.clamp(1.0 / (1.0 + math.exp(0.5 * hi)), 1.0 / (1.0 + math.exp(0.5 * lo)))
    return (1.0 - t).flip(0)[:-1].double()


def sigmas_unclamped(steps: int, mu: float, std: float, logsnr_range=(-15.0, 18.0)) -> torch.Tensor:
    """The schedule without the logSNR clamp: the first level is exactly 1 (model time 0) instead of 1 - 1/(1+e^9)."""
    s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    t = 1.0 - torch.special.expit(mu + std * torch.special.ndtri(s))
    return (1.0 - t).flip(0)[:-1]


def _guidance_one_step_late(p: Patcher):
    def make(guidance):
        def late(self):
            weights = guidance(self)
            return weights[:1] + weights[:-1]  # every weight one step later: the switch to polish comes late
        return late
    p.wrap("ideogram4_guidance", make)


def _text_to_unconditional(p: Patcher):
    """The unconditional transformer given the conditional packed sequence (text tokens and features included); its
    image tokens' output taken as v_neg."""
    keys = ("hidden_states", "timestep", "encoder_hidden_states", "position_ids", "segment_ids", "indicator")

    def branches(self, cond, max_text, layouts=None):
        del layouts  # the conditional layout would be the right one for both: let each model read its own
        args = [cond[k] for k in keys]  # the denoisers' positional inputs (engine.pipelines.ideogram4)
        return self.cfg_executor(lambda: self.transformer(*args)[:, max_text:].float(),
                                 lambda: self.unconditional_transformer(*args)[:, max_text:].float())
    p.set("ideogram4_branches", branches)


def _taps_off_by_one(p: Patcher):
    def make(taps):
        def shifted(num_layers):
            return tuple(min(i + 1, num_layers - 1) for i in taps(num_layers))
        return shifted
    p.wrap("ideogram4_tapped_layers", make)


def _mrope_in_bf16(p: Patcher):
    def make(angles):
        def bf16(position_ids, head_dim, theta, section):
            return angles(position_ids.to(torch.bfloat16).long(), head_dim, theta, section)
        return bf16
    p.wrap("ideogram4_mrope_angles", make)


def _fp8_scale_per_column(p: Patcher):
    """The checkpoint's per-row fp32 weight_scale applied along the input columns (scale[j mod N] on column j)."""
    def make(from_checkpoint):
        def per_column(cls, parts, bias, dtype, options):
            return _per_column(from_checkpoint.__func__(cls, parts, bias, dtype, options), cls, bias, dtype, options)
        return classmethod(per_column)
    p.wrap("ideogram4_fp8_from_checkpoint", make)


def _per_column(module, cls, bias, dtype, options):
    q, s = module.qweight.float(), module.weight_scale.float().reshape(-1)
    wrong = q * s[torch.arange(q.shape[1]) % q.shape[0]][None, :]
    return cls.from_float(wrong, bias, (wrong.shape[0],), dtype, options)


def _text_encoder_fp8_scale_per_column(p: Patcher):
    """The text encoder's checkpoint weight_scale applied along the input columns; the transformers load correctly."""
    def make(quantized_linear):
        def per_column(cls, part, bias, dtype, options):
            return _per_column(quantized_linear(cls, part, bias, dtype, options), cls, bias, dtype, options)
        return per_column
    p.wrap("ideogram4_component_linear", make)


CATALOGUE: dict[str, Plant] = catalogue(
    "ideogram4",
    Plant("ideogram4_schedule_float32", "pipeline", "the logit-normal schedule computed in float32, not float64", FP32,
          lambda p: p.set("ideogram4_sigmas64", sigmas_in_float32)),
    Plant("ideogram4_logsnr_clamp_dropped", "pipeline", "the logSNR clamp [-15, 18] dropped from the schedule", FP32,
          lambda p: p.set("ideogram4_sigmas64", sigmas_unclamped)),
    Plant("ideogram4_text_to_unconditional", "pipeline", "the unconditional transformer given the text tokens", FP32,
          _text_to_unconditional),
    Plant("ideogram4_guidance_switch_late", "pipeline", "the guidance schedule's switch to the polish weight one step "
          "late", FP32, _guidance_one_step_late),
    Plant("ideogram4_fp8_scale_per_column", "quant", "the fp8 checkpoint's per-row weight_scale applied per column",
          FP8_CKPT, _fp8_scale_per_column),
    Plant("ideogram4_text_encoder_fp8_scale_per_column", "quant", "the FP8 text encoder's per-row weight_scale applied "
          "per column (its decoder linears only)", FP8_CKPT, _text_encoder_fp8_scale_per_column),
    Plant("ideogram4_mrope_bf16", "dit", "MRoPE positions rounded to bf16 (above 65536 bf16 steps by 512)", FP32,
          _mrope_in_bf16),
    Plant("ideogram4_tap_off_by_one", "pipeline", "each tapped Qwen3-VL layer index one too high", FP32,
          _taps_off_by_one),
)

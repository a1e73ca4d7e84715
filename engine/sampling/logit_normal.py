"""The logit-normal flow-matching schedule and the two-model guidance blend, as pure functions (a family's presets
of mean, spread and per-step guidance live in its pipeline file).

Model time t runs from 0 (noise) to 1 (clean). The N-step schedule places its N + 1 levels at the logit-normal
quantiles s = linspace(0, 1, N + 1): t(s) = 1 - expit(mu_eff + std * ndtri(s)), clamped to the logSNR range
[-15, 18] (t in [1 / (1 + e^9), 1 / (1 + e^-7.5)]: the infinite quantiles at s = 0 and 1 land on the clamp), with
mu_eff = mu + 0.5 ln(H W / 512^2) (larger images spend more steps at high noise). Everything is float64 until the
sampler's float32 sigmas (1 - t, descending); a float32 evaluation moves the levels by ~1e-7 and the gates see it.
"""
from __future__ import annotations

import math

import torch

LOGSNR_RANGE = (-15.0, 18.0)
BASE_PIXELS = 512 * 512


def resolution_mu(mu: float, height: int, width: int) -> float:
    """The schedule mean shifted for the image size: mu + 0.5 ln(H W / 512^2)."""
    return mu + 0.5 * math.log(height * width / BASE_PIXELS)


def logit_normal_sigmas64(steps: int, mu: float, std: float, logsnr_range: tuple[float, float] = LOGSNR_RANGE
                          ) -> torch.Tensor:
    """`steps` float64 noise levels sigma = 1 - t, descending from ~1; `mu` is the resolution-shifted mean. The
    sampler appends the terminal 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lo, hi = logsnr_range
    s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    t = 1.0 - torch.special.expit(mu + std * torch.special.ndtri(s))
    t = t.clamp(1.0 / (1.0 + math.exp(0.5 * hi)), 1.0 / (1.0 + math.exp(0.5 * lo)))
    return (1.0 - t).flip(0)[:-1]


def logit_normal_sigmas(steps: int, mu: float, std: float, height: int, width: int) -> torch.Tensor:
    """steps + 1 float32 sigmas (the last one 0) for an image of height x width."""
    sigmas = logit_normal_sigmas64(steps, resolution_mu(mu, height, width), std).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def guide(pos: torch.Tensor, neg: torch.Tensor, weight: float) -> torch.Tensor:
    """v = g v_pos + (1 - g) v_neg in float32, g a float32 scalar as the reference holds it."""
    g = torch.tensor(weight, dtype=torch.float32)
    return g * pos.float() + (1.0 - g) * neg.float()

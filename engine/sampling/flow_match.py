"""Rectified-flow Euler sampling with a resolution-dependent (dynamic) shift of the schedule.

Pure functions of the scheduler config found in a model folder, so the schedule of a real checkpoint is the
one it was trained with. The shift runs on float32 sigmas (numpy keeps float32 against Python scalars), as the
reference computes it: a float64 schedule differs in the last bit and the gates see it.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def shift_mu(image_seq_len: int, config: dict) -> float:
    """Linear interpolation of the shift exponent between base and max sequence lengths."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def dynamic_shift_sigmas(steps: int, image_seq_len: int, config: dict, base: np.ndarray | None = None) -> torch.Tensor:
    """steps + 1 noise levels from 1 (pure noise) down to 0, float32. base: the unshifted float32 levels when a
    pipeline draws them itself (default: numpy's float32 linspace(1, 1/steps))."""
    unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                               "stochastic_sampling") if config.get(k)]
    if unsupported:
        raise ValueError(f"scheduler options not supported by the engine's flow-match sampler: {unsupported}")
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32) if base is None else base
    if config.get("use_dynamic_shifting", False):
        mu = shift_mu(image_seq_len, config)
        if config.get("time_shift_type", "exponential") == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
        else:
            sigmas = mu / (mu + (1.0 / sigmas - 1.0))
    else:
        shift = config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if config.get("shift_terminal"):
        # Stretch the shifted schedule so that its last sigma is shift_terminal (Qwen-Image: 0.02), in float32.
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - config["shift_terminal"]))
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x_{next} = x + (sigma_next - sigma) * v. The update is accumulated in float32 and stored in the model
    dtype; the product dt * v stays in v's dtype (a 0-d float32 tensor does not promote a bf16 tensor)."""
    dt = (sigma_next - sigma).to(velocity.device)
    return (x.to(torch.float32) + dt * velocity).to(velocity.dtype)

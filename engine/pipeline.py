"""The family-independent part of generation: the denoising loop and the artifact record.

A family supplies `predict(latents, step_index, timestep) -> guided velocity`; the loop owns the schedule,
the Euler update and the capture of every step, so no family re-implements them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.sampling.flow_match import euler_step

Predict = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
Branch = Callable[[], torch.Tensor]


def serial_cfg(cond: Branch, uncond: Branch) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both guidance branches here, cond first. CFG parallelism replaces this with one branch per rank."""
    return cond(), uncond()


@dataclass
class Trajectory:
    latents: torch.Tensor  # (steps, B, N, C)
    outputs: torch.Tensor  # (steps, B, N, C)
    final: torch.Tensor


def denoise_loop(predict: Predict, latents: torch.Tensor, sigmas: torch.Tensor, num_train_timesteps: int) -> Trajectory:
    """Run len(sigmas) - 1 Euler steps. The model sees t = (sigma * T) cast to the latent dtype, divided by T:
    the reference's exact rounding, which matters in bf16."""
    timesteps = sigmas[:-1] * num_train_timesteps
    step_latents, step_outputs = [], []
    for i in range(len(timesteps)):
        t = timesteps[i].expand(latents.shape[0]).to(device=latents.device, dtype=latents.dtype) / num_train_timesteps
        velocity = predict(latents, i, t)
        latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
        step_outputs.append(velocity.detach().float().cpu())
        step_latents.append(latents.detach().float().cpu())
    return Trajectory(torch.stack(step_latents), torch.stack(step_outputs), latents)


def to_uint8_images(decoded: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1], (B, 3, H, W) for images or (B, 3, F, H, W) for video -> uint8 media (B, F, H, W, 3),
    rounded as diffusers rounds for PIL."""
    if decoded.ndim == 4:
        decoded = decoded[:, :, None]
    images = (decoded * 0.5 + 0.5).clamp(0, 1)
    images = images.cpu().permute(0, 2, 3, 4, 1).float().numpy()
    return (images * 255).round().astype(np.uint8)

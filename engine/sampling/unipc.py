"""UniPC multistep sampling (Zhao et al. 2023, the B(h) variants) in flow-prediction mode: the model predicts a flow
velocity v, the data estimate is x0 = x - sigma v, and the noise levels are flow sigmas (alpha = 1 - sigma) with a
static shift. Each step is a UniC corrector of the current sample (from the previous step's prediction and this
step's model output), then a UniP predictor to the next noise level; orders ramp up from 1 over the first steps and
drop back to 1 on the last (lower_order_final).

Written from the published algorithm with diffusers' UniPCMultistepScheduler read for its exact arithmetic (which
operations run on 0-d float32 tensors, where the schedule is float64): the engine's sampler then equals the
reference's step for step. `UniPCConfig.from_scheduler_config` refuses the scheduler options it does not implement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_dynamic_shifting",
               "thresholding", "shift_terminal", "solver_p")


@dataclass(frozen=True)
class UniPCConfig:
    num_train_timesteps: int = 1000
    solver_order: int = 2
    flow_shift: float = 1.0
    solver_type: str = "bh2"  # B(h) = e^h - 1 ("bh2") or h ("bh1")
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"  # the last noise level: 0, or the last schedule sigma ("sigma_min")
    disable_corrector: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"UniPC solver_type {self.solver_type!r}; valid: 'bh1', 'bh2'")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"UniPC final_sigmas_type {self.final_sigmas_type!r}; valid: 'zero', 'sigma_min'")
        if self.solver_order < 1:
            raise ValueError(f"UniPC solver_order must be >= 1, got {self.solver_order}")

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "UniPCConfig":
        """From a UniPCMultistepScheduler scheduler_config.json; only flow prediction on flow sigmas."""
        if config.get("prediction_type") != "flow_prediction" or not config.get("use_flow_sigmas"):
            raise ValueError("the engine's UniPC runs flow_prediction on flow sigmas only; got prediction_type "
                             f"{config.get('prediction_type')!r}, use_flow_sigmas {config.get('use_flow_sigmas')!r}")
        if not config.get("predict_x0", True):
            raise ValueError("the engine's UniPC implements predict_x0=True only")
        if bad := [k for k in UNSUPPORTED if config.get(k)]:
            raise ValueError(f"UniPC scheduler options not supported by the engine: {bad}")
        fields = {k: config[k] for k in cls.__dataclass_fields__ if k in config and config[k] is not None}
        fields["disable_corrector"] = tuple(fields.get("disable_corrector", ()))
        return cls(**fields)


def flow_schedule(steps: int, cfg: UniPCConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (steps + 1,) float32 ending at the final level, timesteps (steps,) int64): linspace(1, 1/T) in
    float64, shifted, the first level nudged below 1, timesteps = sigma * T truncated to integers."""
    if steps < 1:
        raise ValueError(f"UniPC needs >= 1 step, got {steps}")
    sigmas = np.linspace(1, 1 / cfg.num_train_timesteps, steps + 1)[:-1]
    sigmas = cfg.flow_shift * sigmas / (1 + (cfg.flow_shift - 1) * sigmas)
    if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = torch.from_numpy(sigmas * cfg.num_train_timesteps).to(torch.int64)
    last = 0 if cfg.final_sigmas_type == "zero" else sigmas[-1]
    return torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32)), timesteps


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log(alpha / sigma) of a flow noise level, as log(1 - sigma) - log(sigma)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class UniPCSampler:
    """One sampling run's state. step(v, x) takes the model's velocity at the current level and returns the sample
    at the next one; call it once per entry of `timesteps`, in order."""

    def __init__(self, steps: int, cfg: UniPCConfig):
        self.cfg = cfg
        self.sigmas, self.timesteps = flow_schedule(steps, cfg)
        self.steps = steps
        self.index = 0
        self.x0s: list[torch.Tensor] = []  # the data estimates of the last solver_order steps, oldest first
        self.last_sample: torch.Tensor | None = None
        self.order = 0  # the order of the last predictor step, which the next corrector reuses
        self.warm = 0  # how many steps have run, capped at solver_order (the multistep warm-up)

    def _coefficients(self, sigma_t, sigma_s0, previous: list[torch.Tensor], order: int, device):
        """(h-dependent terms, rks, D1s, R, b) shared by predictor and corrector: sigma_t the target level, sigma_s0
        the level of the newest estimate m0 = x0s[-1], `previous` the older levels' sigmas, newest first."""
        m0 = self.x0s[-1]
        lambda_t, lambda_s0 = _lambda(sigma_t), _lambda(sigma_s0)
        h = lambda_t - lambda_s0
        rks, d1s = [], []
        for k in range(1, order):
            rk = (_lambda(previous[k - 1].to(device)) - lambda_s0) / h
            rks.append(rk)
            d1s.append((self.x0s[-(k + 1)] - m0) / rk)
        rks.append(torch.ones((), device=device))
        rks = torch.stack(rks)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.cfg.solver_type == "bh1" else torch.expm1(hh)
        R, b, factorial = [], [], 1
        for k in range(1, order + 1):
            R.append(torch.pow(rks, k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        d1s = torch.stack(d1s, dim=1) if d1s else None
        return h_phi_1, b_h, d1s, torch.stack(R), torch.stack(b)

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP: from the level of x0s[-1] to the next one."""
        i, device = self.index, x.device
        sigma_t, sigma_s0 = self.sigmas[i + 1].to(device), self.sigmas[i].to(device)
        previous = [self.sigmas[i - k] for k in range(1, order)]
        h_phi_1, b_h, d1s, R, b = self._coefficients(sigma_t, sigma_s0, previous, order, device)
        alpha_t = 1 - sigma_t
        x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * self.x0s[-1]
        if d1s is None:
            return x_t_.to(x.dtype)
        rhos = (torch.ones(1, dtype=x.dtype, device=device) * 0.5 if order == 2
                else torch.linalg.solve(R[:-1, :-1], b[:-1]).to(device).to(x.dtype))
        return (x_t_ - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos, d1s)).to(x.dtype)

    def _correct(self, x0: torch.Tensor, last: torch.Tensor, this: torch.Tensor, order: int) -> torch.Tensor:
        """UniC: the sample at the current level, corrected with this step's estimate x0."""
        i, device = self.index, this.device
        sigma_t, sigma_s0 = self.sigmas[i].to(device), self.sigmas[i - 1].to(device)
        previous = [self.sigmas[i - (k + 1)] for k in range(1, order)]
        h_phi_1, b_h, d1s, R, b = self._coefficients(sigma_t, sigma_s0, previous, order, device)
        alpha_t = 1 - sigma_t
        m0 = self.x0s[-1]
        x_t_ = sigma_t / sigma_s0 * last - alpha_t * h_phi_1 * m0
        rhos = (torch.ones(1, dtype=last.dtype, device=device) * 0.5 if order == 1
                else torch.linalg.solve(R, b).to(device).to(last.dtype))
        corr = torch.einsum("k,bkc...->bc...", rhos[:-1], d1s) if d1s is not None else 0
        return (x_t_ - alpha_t * b_h * (corr + rhos[-1] * (x0 - m0))).to(last.dtype)

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self.index >= self.steps:
            raise RuntimeError(f"UniPC sampler of {self.steps} steps stepped again")
        cfg, i = self.cfg, self.index
        x0 = sample - self.sigmas[i] * velocity
        if i > 0 and (i - 1) not in cfg.disable_corrector and self.last_sample is not None:
            sample = self._correct(x0, self.last_sample, sample, self.order)
        self.x0s = (self.x0s + [x0])[-cfg.solver_order:]
        order = min(cfg.solver_order, self.steps - i) if cfg.lower_order_final else cfg.solver_order
        self.order = min(order, self.warm + 1)
        self.last_sample = sample
        out = self._predict(sample, self.order)
        self.warm = min(self.warm + 1, cfg.solver_order)
        self.index += 1
        return out

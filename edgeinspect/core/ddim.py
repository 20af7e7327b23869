"""Deterministic DDIM (eta = 0) on torch tensors, with diffusers' noise schedule.

Written out rather than calling `DDIMScheduler.step` because the loops need arbitrary start points
(DiAD t=999, GLAD T0) and per-sample clean estimates; the schedule is computed as diffusers computes
it (float32 betas, cumulative product) without importing diffusers, which would cost a serving
process ~190 MB of memory. Tests check the schedule bit for bit and the steps against diffusers'
DDIMScheduler (trailing spacing).
"""

from __future__ import annotations

import numpy as np
import torch

from edgeinspect.config import SchedulerConfig


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """alpha-bar_t for t = 0..T-1 in float32, as diffusers' DDIMScheduler computes it."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    else:  # scaled_linear (latent diffusion)
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class DDIM:
    def __init__(self, cfg: SchedulerConfig):
        self.num_train_timesteps = cfg.num_train_timesteps
        self.alphas_cumprod = alphas_cumprod(cfg).double()  # float64: sqrt(1 - abar) near t=0 is tiny

    def timesteps(self, t_start: int, steps: int) -> list[int]:
        """`steps` timesteps from t_start down, evenly spaced ("trailing": 999, 899, ..., 99)."""
        if not 0 < t_start < self.num_train_timesteps:
            raise ValueError(f"t_start must be in [1, {self.num_train_timesteps - 1}], got {t_start}")
        ts = np.round(np.linspace(t_start + 1, 0, steps + 1))[:-1].astype(int) - 1
        if len(set(ts.tolist())) != steps:
            raise ValueError(f"{steps} steps do not fit below t_start={t_start}")
        return ts.tolist()

    def abar(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha-bar at t (t < 0 means the clean end, abar = 1), shaped to broadcast over `like`."""
        t = torch.as_tensor(t).reshape(-1).long()
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        return a.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        a = self.abar(t, clean)
        return a.sqrt() * clean + (1 - a).sqrt() * noise

    def pred_clean(self, sample: torch.Tensor, noise_pred: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        a = self.abar(t, sample)
        return (sample - (1 - a).sqrt() * noise_pred) / a.sqrt()

    def step(self, sample: torch.Tensor, noise_pred: torch.Tensor, t: int, t_prev: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step t -> t_prev; returns (x_{t_prev}, clean estimate at t)."""
        clean = self.pred_clean(sample, noise_pred, t)
        return self.add_noise(clean, noise_pred, t_prev), clean


def seeded_noise(shape: tuple[int, ...], seed: int, batch: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same noise for every sample of a batch: a frame's score never depends on its neighbours."""
    g = torch.Generator().manual_seed(seed)
    one = torch.randn(shape, generator=g, dtype=torch.float32)
    return one.unsqueeze(0).expand(batch, *shape).to(device, dtype).contiguous()

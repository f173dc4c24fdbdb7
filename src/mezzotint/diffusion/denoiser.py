"""One denoiser contract: D(x, sigma, **cond) -> x0, in the VE view x = x0 + sigma * eps.

A UNet trained on the VP (DDPM) process takes x_vp = x / sqrt(sigma^2 + 1) and a
timestep t, and predicts eps or v. `Denoiser` wraps it so that samplers only ever see
D (k-diffusion `external.DiscreteEpsDDPMDenoiser` / `CompVisVDenoiser`; Karras et al.
2022, table 1, "VP" column: c_in = 1/sqrt(sigma^2+1), c_skip, c_out below).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SchedulerConfig
from .schedules import sigma_table

PREDICTION_TYPES = ("eps", "v")


class Denoiser(nn.Module):
    """Wraps an eps- or v-predicting UNet `model(x_in, t, **cond)` as D(x, sigma, **cond) -> x0."""

    def __init__(self, model: nn.Module, cfg: SchedulerConfig):
        super().__init__()
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {cfg.prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
        self.model = model
        self.cfg = cfg
        self._table64 = sigma_table(cfg)  # CPU master copy, see _apply
        p = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = p.device if p is not None else None  # wrapping a model already on its device
        # Not persistent: derived from cfg, and kept out of checkpoints of the model.
        self.register_buffer("sigmas", self._table64.float().to(device), persistent=False)
        self.register_buffer("log_sigmas", self._table64.log().float().to(device), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # `.half()` / `.to(dtype)` would round the tables and shift t by up to ~0.2 steps:
        # follow the device, but rebuild them in float32 from the float64 copy.
        super()._apply(fn, *args, **kwargs)
        device = self.sigmas.device
        self.sigmas = self._table64.float().to(device)
        self.log_sigmas = self._table64.log().float().to(device)
        return self

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of each sigma: linear interpolation in log-sigma over the table.

        As k-diffusion DiscreteSchedule.sigma_to_t and diffusers `_sigma_to_t`; sigmas
        outside the table clamp to t = 0 or T - 1.
        """
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().clamp(min=1e-10).log()
        dists = log_sigma - log_sigmas[:, None]  # (T, N)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def _model_dtype(self) -> torch.dtype | None:
        p = next(self.model.parameters(), None) if isinstance(self.model, nn.Module) else None
        return p.dtype if p is not None else None

    def anchor(self, x: Tensor, sigma: Tensor) -> Tensor:
        """a(x) with the UNet's output = k * (a(x) - x0), k > 0 per row: eps = (x - x0) / sigma,
        v = (x / (sigma^2 + 1) - x0) * sqrt(sigma^2 + 1) / sigma (see forward)."""
        x = x.float()
        if self.cfg.prediction_type == "eps":
            return x
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (s**2 + 1)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s = sigma.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        c_in = (s**2 + 1).rsqrt()
        t = self.sigma_to_t(sigma)
        # Run the network in its own dtype; keep t in float32 (fp16 cannot hold 999.5).
        dtype = self._model_dtype()
        x_in = x * c_in
        if self.cfg.blank_terminal:  # trained so: pure noise carries nothing, zeros say so
            x_in = x_in * (t < len(self.sigmas) - 1.001).view(-1, *([1] * (x.ndim - 1)))
        concat = cond.pop("concat", None)
        if concat is not None:  # inpainting UNets take [latent, mask, masked-image latent] channels
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        if dtype is not None:
            x_in = x_in.to(dtype)
            cond = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        out = self.model(x_in, t, **cond).float()
        if self.cfg.prediction_type == "eps":
            # x = x0 + sigma * eps
            return x - s * out
        # v = alpha * eps - sigma_vp * x0 with alpha = c_in, sigma_vp = sigma * c_in (Salimans
        # & Ho 2022, sec. 4); solved for x0 in VE terms: x0 = x/(sigma^2+1) - sigma/sqrt(sigma^2+1) v.
        return x * c_in**2 - s * c_in * out

"""Noise schedules: betas, alpha-bar, sigmas and the timesteps a sampler visits.

Two views of one forward process (Karras et al. 2022, "Elucidating the Design
Space", sec. 2 and table 1):
  VP (DDPM):  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps,   ab_t = prod_{s<=t} (1 - beta_s)
  VE (ours):  x   = x0 + sigma eps,                        sigma_t = sqrt((1 - ab_t) / ab_t)
with x_ve = x_vp / sqrt(ab_t) = x_vp * sqrt(1 + sigma^2). Samplers work in the VE view.

Tables are computed in float64 (as the original LDM code does, `make_beta_schedule`);
diffusers computes them in float32, which differs by up to ~1e-5 relative in sigma at
small t (1 - ab cancels there). That is far inside the 1e-5 parity on final latents.

Timestep selection reproduces diffusers' `EulerDiscreteScheduler.set_timesteps`, the
one the Euler/Heun samplers of SD pipelines use, so a model fine-tuned there sees the
same timesteps here.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

from ..config import SchedulerConfig

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")


def _cosine_betas(T: int, max_beta: float = 0.999) -> Tensor:
    # Nichol & Dhariwal 2021, eq. 17: ab(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008;
    # beta_t = 1 - ab(t+1)/ab(t) clipped at max_beta (diffusers "squaredcos_cap_v2").
    def ab(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - ab((i + 1) / T) / ab(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(cfg: SchedulerConfig) -> Tensor:
    """beta_1..beta_T of the forward process, float64 (T,)."""
    betas = _base_betas(cfg)
    return _zero_terminal_snr(betas) if cfg.rescale_betas_zero_snr else betas


def _zero_terminal_snr(betas: Tensor) -> Tensor:
    # Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", alg. 1
    # (diffusers `rescale_zero_terminal_snr`): shift and scale sqrt(ab) so that it keeps its
    # first value and ends at exactly 0. The SD schedule ends at sqrt(ab) = 0.068: a model
    # trained on it reads the layout off that leftover signal, and from pure noise takes it
    # from the noise instead of from the prompt.
    s = torch.cumprod(1 - betas, dim=0).sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    ab = s**2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def _base_betas(cfg: SchedulerConfig) -> Tensor:
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    if cfg.beta_schedule == "scaled_linear":
        # Linear in sqrt(beta), then squared (LDM / Stable Diffusion).
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
    if cfg.beta_schedule == "cosine":
        return _cosine_betas(T)
    raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}; allowed: {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod(cfg: SchedulerConfig) -> Tensor:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s), float64 (T,).

    A zero-terminal-SNR schedule ends at 2^-24, not 0 (as diffusers' Euler and DPM-Solver
    do), so that sigma stays finite (4096) and samplers need no special first step; the
    signal left there, 2.4e-4 of x0, is nothing a model can read."""
    ac = torch.cumprod(1.0 - make_betas(cfg), dim=0)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24
    return ac


def sigma_table(cfg: SchedulerConfig) -> Tensor:
    """VE noise level of each training timestep, sqrt((1 - ab) / ab), float64 (T,) ascending."""
    ac = alphas_cumprod(cfg)
    return ((1 - ac) / ac).sqrt()


def _check_steps(cfg: SchedulerConfig, steps) -> int:
    T = cfg.num_train_timesteps
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
    return int(steps)


def timesteps_for(cfg: SchedulerConfig, steps: int) -> Tensor:
    """The (fractional) training timesteps visited by `steps` sampling steps, float64 descending.

    As diffusers EulerDiscreteScheduler (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", table 2):
      linspace: evenly from T-1 to 0 (fractional);
      leading:  0, r, 2r, ... with r = T // steps, plus steps_offset;
      trailing: T, T - T/steps, ... rounded, minus 1 (always starts at T-1).
    """
    T = cfg.num_train_timesteps
    steps = _check_steps(cfg, steps)
    spacing = cfg.timestep_spacing
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps)[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1] + cfg.steps_offset
    elif spacing == "trailing":
        # np.arange with a float step sometimes yields one extra element ~1e-13 (e.g.
        # steps=61), which diffusers turns into timestep -1; keep only the first `steps`.
        ts = np.arange(T, 0, -T / steps).round()[:steps] - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; allowed: {', '.join(TIMESTEP_SPACINGS)}")
    ts = torch.from_numpy(ts.astype(np.float64).copy())
    if ts.max() > T - 1 or ts.min() < 0:
        raise ValueError(
            f"timesteps {ts.max():g}..{ts.min():g} leave [0, {T - 1}]: "
            f"steps_offset={cfg.steps_offset} is too large for {steps} steps"
        )
    return ts


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho.

    Returns the `steps` noise levels, float64 (steps,), descending, WITHOUT the final 0.
    """
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def get_sigmas(cfg: SchedulerConfig, steps: int, karras: bool = False, rho: float = 7.0) -> Tensor:
    """Sampling noise levels, float64 (steps + 1,), descending, last = 0.

    Non-Karras: sigma at each of `timesteps_for(cfg, steps)`, linearly interpolated in t
    over the sigma table (diffusers Euler, interpolation_type "linear").
    Karras: eq. 5 between the table's sigma_min and sigma_max (k-diffusion, and diffusers
    DPMSolverMultistep). diffusers Euler/Heun instead take the ends from the sigmas at the
    spaced timesteps, which equals this only for "linspace" spacing.
    float64 is returned so that no precision is lost before a sampler uses it; samplers
    take python floats from it and the Denoiser casts to float32 for the table lookup.
    """
    table = sigma_table(cfg)
    if karras:
        steps = _check_steps(cfg, steps)
        sig = karras_sigmas(steps, table[0].item(), table[-1].item(), rho)
    else:
        ts = timesteps_for(cfg, steps).numpy()
        sig = torch.from_numpy(np.interp(ts, np.arange(len(table)), table.numpy()))
    return torch.cat([sig, sig.new_zeros(1)])


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, cfg_or_alphas_cumprod: SchedulerConfig | Tensor) -> Tensor:
    """Forward process q(x_t | x_0) (Ho et al. 2020, eq. 4): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise.

    `t` is an integer tensor (B,); the result is in the VP view and in x0's dtype.
    """
    ac = cfg_or_alphas_cumprod
    if isinstance(ac, SchedulerConfig):
        ac = alphas_cumprod(ac)
    # Coefficient tables in float64 (1 - ab cancels near t = 0), then cast before moving:
    # some devices (MPS) have no float64.
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    ac = ac.detach().double().cpu()
    idx = t.to(x0.device).long()
    shape = (-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    c0 = ac.sqrt().to(work).to(x0.device)[idx].reshape(shape)
    c1 = (1 - ac).sqrt().to(work).to(x0.device)[idx].reshape(shape)
    return (c0 * x0 + c1 * noise).to(x0.dtype)

"""Samplers: pure functions of (denoiser, x, sigmas) returning the final x (k-diffusion style).

All work in the VE view x = x0 + sigma * eps with a denoiser D(x, sigma, **extra) -> x0.
Common signature:
    fn(denoiser, x, sigmas, *, extra=None, generator=None, callback=None, **options) -> x
  x:         starting latent, already scaled to sigmas[0] by the caller.
  sigmas:    (n + 1,) descending noise levels, ending at 0 (any schedule, Karras included).
  generator: as in `noise.randn`; stochastic samplers draw in the order diffusers does.
  callback:  called after each step with {i, x, sigma, sigma_next, denoised}.
  options:   keyword arguments of the sampler itself (ddim: eta); one it lacks is a TypeError.
Step arithmetic takes sigmas as python floats (float64) and the tensors stay in x's dtype.
The caller's x is never modified in place.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from . import noise as _noise


def _prepare(x: Tensor, sigmas, extra: dict | None):
    s = torch.as_tensor(sigmas).detach().cpu().double()  # to the CPU first: MPS has no float64
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(s.shape)}")
    if bool((s[1:] > s[:-1]).any()) or bool((s[:-1] <= 0).any()):
        raise ValueError("sigmas must be descending and positive except for the last entry")
    # sigma is handed to the denoiser in at least float32 (fp16 would round sigma_max by ~0.01).
    ones = torch.ones(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    return s.tolist(), dict(extra or {}), ones


def _randn_like(x: Tensor, generator) -> Tensor:
    return _noise.randn(x.shape, generator, device=x.device, dtype=x.dtype)


def _report(callback, i, x, sigma, sigma_next, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to sigma_next into a deterministic part to sigma_down and fresh noise sigma_up.

    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is the DDIM / DDPM
    posterior variance in VE units (Song et al. 2021, eq. 16); sigma_down^2 + sigma_up^2 = sigma_next^2.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra=None, generator=None, callback=None):
    """Euler: first-order probability-flow ODE (Karras et al. 2022, Alg. 2, no churn)."""
    s, extra, ones = _prepare(x, sigmas, extra)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i] * ones, **extra)
        d = (x - denoised) / s[i]  # dx/dsigma = (x - D(x)) / sigma, eq. 3 with sigma(t) = t
        x = x + d * (s[i + 1] - s[i])
        _report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra=None, generator=None, callback=None):
    """Heun: second-order ODE solver, Euler on the last step (Karras et al. 2022, Alg. 2)."""
    s, extra, ones = _prepare(x, sigmas, extra)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i] * ones, **extra)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt  # the correction would divide by sigma = 0
        else:
            x_2 = x + d * dt
            denoised_2 = denoiser(x_2, s[i + 1] * ones, **extra)
            d_2 = (x_2 - denoised_2) / s[i + 1]
            x = x + (d + d_2) / 2 * dt  # trapezoidal rule
        _report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_euler_a(denoiser, x, sigmas, *, extra=None, generator=None, callback=None):
    """Euler ancestral: Euler to sigma_down, then fresh noise sigma_up (k-diffusion, eta = 1)."""
    s, extra, ones = _prepare(x, sigmas, extra)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i] * ones, **extra)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1])
        d = (x - denoised) / s[i]
        x = x + d * (sigma_down - s[i])
        # diffusers draws on every step, the last included (where sigma_up = 0).
        x = x + _randn_like(x, generator) * sigma_up
        _report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, extra=None, generator=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12) in sigma form; eta = 0 deterministic, eta = 1 ancestral."""
    # With alpha_bar = 1/(1 + sigma^2) and x = x_vp * sqrt(1 + sigma^2), eq. 12 becomes
    #   x_next = x0 + sigma_down * eps + sigma_up * z,  eps = (x - x0) / sigma,
    # where sigma_up is eta * sigma_t(eq. 16) in VE units and sigma_down^2 = sigma_next^2 - sigma_up^2.
    s, extra, ones = _prepare(x, sigmas, extra)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i] * ones, **extra)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = denoised + (sigma_down / s[i]) * (x - denoised)
        if eta > 0:
            # diffusers DDIMScheduler draws whenever eta > 0, the last step included.
            x = x + _randn_like(x, generator) * sigma_up
        _report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, extra=None, generator=None, callback=None):
    """DDPM ancestral step: sample the posterior q(x_next | x, x0) (Ho et al. 2020, eq. 6-7)."""
    # Eq. 7 with alpha_bar = 1/(1 + sigma^2), in VE units (r = sigma_next / sigma):
    #   mean = r^2 x + (1 - r^2) x0,  std = sigma_next * sqrt(1 - r^2)  ("fixed_small" variance).
    # Equal to DDIM with eta = 1; written as diffusers' posterior mean, interpolating x and x0.
    s, extra, ones = _prepare(x, sigmas, extra)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i] * ones, **extra)
        r2 = (s[i + 1] / s[i]) ** 2
        x = r2 * x + (1 - r2) * denoised
        # diffusers DDPMScheduler draws on every step with t > 0; the last step's draw gets
        # (near) zero weight, so we draw on every step and keep its generator in step.
        x = x + _randn_like(x, generator) * (s[i + 1] * math.sqrt(1 - r2))
        _report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra=None, generator=None, callback=None):
    """DPM-Solver++(2M): second-order multistep in log-SNR (Lu et al. 2022, Alg. 2)."""
    # In VE units with lambda = -log(sigma) and h = lambda_next - lambda:
    #   x_next = (sigma_next / sigma) x - expm1(-h) D,  D = x0 (1st order) or
    #   D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h (2nd order, eq. in Alg. 2).
    # Order rules of diffusers DPMSolverMultistepScheduler (solver_order=2, lower_order_final):
    # 1st order on the first step, on a step to sigma = 0 (where it gives x = x0), and on
    # the last step when there are fewer than 15 steps.
    s, extra, ones = _prepare(x, sigmas, extra)
    n = len(s) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = denoiser(x, s[i] * ones, **extra)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            first_order = old_denoised is None or (i == n - 1 and n < 15)
            if first_order:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, s[i], s[i + 1], denoised)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def sampler_names() -> list[str]:
    """Registered sampler names, in registration order."""
    return list(SAMPLERS)


def sampler_help(name: str) -> str:
    """The one-line description of sampler `name` (its docstring's first line)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return (SAMPLERS[name].__doc__ or "").strip().splitlines()[0]

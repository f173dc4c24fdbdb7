"""Diffusion core: schedules, seeded noise, the denoiser contract, guidance and samplers."""
from .denoiser import Denoiser
from .guidance import CFGDenoiser
from .noise import generators, randn
from .samplers import (
    SAMPLERS,
    ancestral_step,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_a,
    sample_heun,
    sampler_help,
    sampler_names,
)
from .schedules import (
    add_noise,
    alphas_cumprod,
    get_sigmas,
    karras_sigmas,
    make_betas,
    sigma_table,
    timesteps_for,
)

__all__ = [
    "CFGDenoiser",
    "Denoiser",
    "SAMPLERS",
    "add_noise",
    "alphas_cumprod",
    "ancestral_step",
    "generators",
    "get_sigmas",
    "karras_sigmas",
    "make_betas",
    "randn",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_a",
    "sample_heun",
    "sampler_help",
    "sampler_names",
    "sigma_table",
    "timesteps_for",
]

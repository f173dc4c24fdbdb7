"""Schedules against diffusers' scheduler tensors.

Our tables are float64; diffusers builds them in float32. The float32 cumprod and the
1 - alpha_bar cancellation at small t put diffusers' sigma table off the float64 one by
up to ~1.3e-5 relative for the SD schedule (~8e-5 for linear from 1e-4, at t = 0), hence
rtol 3e-5 on SD sigmas; betas and alpha-bar agree to float32 rounding.
"""
import dataclasses

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from mezzotint.config import SchedulerConfig  # noqa: E402
from mezzotint.diffusion import (  # noqa: E402
    Denoiser,
    add_noise,
    alphas_cumprod,
    get_sigmas,
    karras_sigmas,
    make_betas,
    sigma_table,
    timesteps_for,
)

DIFFUSERS_BETA = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
STEPS = [1, 7, 10, 20, 25, 50, 61, 1000]


def euler(cfg, **kw):
    return diffusers.EulerDiscreteScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=DIFFUSERS_BETA[cfg.beta_schedule], timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset, **kw)


@pytest.mark.parametrize("schedule", list(DIFFUSERS_BETA))
def test_betas_and_alphas_cumprod_match_diffusers(schedule):
    cfg = SchedulerConfig(beta_schedule=schedule, beta_start=0.0001 if schedule == "linear" else 0.00085,
                          beta_end=0.02 if schedule == "linear" else 0.012)
    ref = diffusers.DDPMScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                  beta_schedule=DIFFUSERS_BETA[schedule])
    betas, ac = make_betas(cfg), alphas_cumprod(cfg)
    assert betas.dtype == ac.dtype == torch.float64 and betas.shape == (1000,)
    torch.testing.assert_close(betas, ref.betas.double(), rtol=1e-6, atol=0)
    # float32 1 - beta loses eps32 * beta / (1 - beta) relative (cosine clips beta at 0.999)
    bound_ac = 3e-6 + 2.0**-24 * torch.cummax(betas / (1 - betas), 0).values
    assert bool(((ac - ref.alphas_cumprod.double()).abs() / ac <= bound_ac).all())
    sig = sigma_table(cfg)
    torch.testing.assert_close(sig, ((1 - ac) / ac).sqrt())
    ref_sig = euler(cfg).sigmas[:-1].flip(0).double()
    # float32 1 - alpha_bar loses ~eps32 / (1 - alpha_bar) relative at small t
    bound = 2.0**-24 / (1 - ac) + 1e-5 + bound_ac
    assert bool(((sig - ref_sig).abs() / sig <= bound).all())


@pytest.mark.parametrize("spacing,offset", [("trailing", 0), ("leading", 0), ("leading", 1), ("linspace", 0)])
@pytest.mark.parametrize("steps", STEPS)
def test_timesteps_and_sigmas_match_euler(spacing, offset, steps):
    cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and offset and steps == 1000:
        with pytest.raises(ValueError, match="steps_offset"):
            timesteps_for(cfg, steps)
        return
    ref = euler(cfg)
    ref.set_timesteps(steps)
    ts = timesteps_for(cfg, steps)
    assert ts.dtype == torch.float64 and ts.shape == (steps,)
    assert bool((ts[1:] < ts[:-1]).all())
    sig = get_sigmas(cfg, steps)
    assert sig.dtype == torch.float64 and sig.shape == (steps + 1,) and sig[-1] == 0
    if spacing == "trailing" and steps == 61:
        # np.arange(1000, 0, -1000/61) has a 62nd element ~1e-13 that diffusers turns into
        # timestep -1; we keep the first `steps` (the others agree exactly).
        assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1
        ref_ts, ref_sig = ref.timesteps[:-1], torch.cat([ref.sigmas[:-2], ref.sigmas[-1:]])
    else:
        ref_ts, ref_sig = ref.timesteps, ref.sigmas
    assert torch.equal(ts.float(), ref_ts)
    torch.testing.assert_close(sig, ref_sig.double(), rtol=3e-5, atol=0)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [2, 10, 25])
def test_karras_sigmas_match_diffusers(spacing, steps):
    cfg = SchedulerConfig(timestep_spacing=spacing)
    table = sigma_table(cfg)
    sig = get_sigmas(cfg, steps, karras=True)
    assert sig.shape == (steps + 1,) and sig[-1] == 0 and sig.dtype == torch.float64
    assert sig[0].item() == pytest.approx(table[-1].item())
    if steps > 1:
        assert sig[-2].item() == pytest.approx(table[0].item())
    # Karras et al. 2022 eq. 5 spans the model's whole sigma range. diffusers Euler/Heun
    # take the ends from the sigmas at the spaced timesteps instead (trailing ends at
    # sigma(t = 1000/steps - 1), leading starts below T - 1), which agrees with eq. 5 on
    # the table range only for "linspace"; so elsewhere we pin Euler's ends to the table.
    # DPMSolverMultistep always uses the table range, whatever the spacing.
    pin = {} if spacing == "linspace" else {"sigma_min": table[0].item(), "sigma_max": table[-1].item()}
    ref = euler(cfg, use_karras_sigmas=True, **pin)
    ref.set_timesteps(steps)
    torch.testing.assert_close(sig, ref.sigmas.double(), rtol=3e-5, atol=0)
    # the model timesteps diffusers derives from these sigmas = Denoiser.sigma_to_t
    t = Denoiser(torch.nn.Identity(), cfg).sigma_to_t(sig[:-1].float())
    torch.testing.assert_close(t.double(), ref.timesteps.double(), rtol=0, atol=2e-3)
    dpm = diffusers.DPMSolverMultistepScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                                beta_schedule="scaled_linear", timestep_spacing=spacing,
                                                use_karras_sigmas=True)
    dpm.set_timesteps(steps)
    torch.testing.assert_close(sig, dpm.sigmas.double(), rtol=3e-5, atol=0)


def test_karras_sigmas_formula():
    s = karras_sigmas(5, 0.1, 10.0, rho=7.0)
    assert s[0].item() == pytest.approx(10.0) and s[-1].item() == pytest.approx(0.1)
    mid = ((10.0 ** (1 / 7) + 0.1 ** (1 / 7)) / 2) ** 7
    assert s[2].item() == pytest.approx(mid)
    assert bool((s[1:] < s[:-1]).all())
    # one step starts at sigma_max (diffusers' linspace would start at t = 0)
    cfg = SchedulerConfig()
    assert get_sigmas(cfg, 1, karras=True).tolist() == pytest.approx([sigma_table(cfg)[-1].item(), 0.0])


def test_sigma_to_t_inverts_the_table():
    cfg = SchedulerConfig()
    d = Denoiser(torch.nn.Identity(), cfg)
    t = torch.tensor([0.0, 1.0, 250.0, 998.0, 999.0])
    torch.testing.assert_close(d.sigma_to_t(d.sigmas[t.long()]), t)
    # out of range clamps to the ends
    assert d.sigma_to_t(torch.tensor([1e-4, 1e4])).tolist() == [0.0, 999.0]
    assert d.sigma_min == pytest.approx(sigma_table(cfg)[0].item())
    assert d.sigma_max == pytest.approx(sigma_table(cfg)[-1].item())
    # casting the wrapper to half keeps the tables in float32
    assert d.half().sigmas.dtype == torch.float32


@pytest.mark.parametrize("schedule", list(DIFFUSERS_BETA))
def test_add_noise_matches_diffusers(schedule):
    cfg = SchedulerConfig(beta_schedule=schedule)
    ref = diffusers.DDPMScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                  beta_schedule=DIFFUSERS_BETA[schedule])
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    want = ref.add_noise(x0, noise, t)
    for arg in (cfg, alphas_cumprod(cfg)):
        got = add_noise(x0, noise, t, arg)
        assert got.dtype == torch.float32
        # diffusers' float32 1 - alpha_bar is ~5e-5 off near t = 0 for the cosine schedule
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True])
def test_bad_steps_raise(bad):
    cfg = SchedulerConfig()
    with pytest.raises(ValueError, match="steps"):
        timesteps_for(cfg, bad)
    with pytest.raises(ValueError, match="steps"):
        get_sigmas(cfg, bad)
    with pytest.raises(ValueError, match="steps"):
        get_sigmas(cfg, bad, karras=True)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="timestep_spacing"):
        timesteps_for(dataclasses.replace(SchedulerConfig(), timestep_spacing="even"), 10)
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas(dataclasses.replace(SchedulerConfig(), beta_schedule="quadratic"))


def test_zero_terminal_snr_matches_diffusers():
    cfg = SchedulerConfig(prediction_type="v", rescale_betas_zero_snr=True)
    ref = diffusers.DDPMScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule="scaled_linear",
                                  rescale_betas_zero_snr=True)
    betas, ac, plain = make_betas(cfg), alphas_cumprod(cfg), alphas_cumprod(dataclasses.replace(cfg, rescale_betas_zero_snr=False))
    # diffusers rescales in float32 (2e-4 relative off in places); its function on our
    # float64 betas agrees to rounding
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    base = make_betas(dataclasses.replace(cfg, rescale_betas_zero_snr=False))
    torch.testing.assert_close(betas, rescale_zero_terminal_snr(base.clone()), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(betas, ref.betas.double(), rtol=5e-4, atol=1e-8)
    assert betas[-1] == 1 and ac[-1] == 2.0**-24  # diffusers' Euler and DPM-Solver clamp there too
    torch.testing.assert_close(ac[:-1], ref.alphas_cumprod[:-1].double(), rtol=5e-4, atol=1e-9)
    assert ac[0] == pytest.approx(plain[0].item(), rel=1e-12)  # the first step keeps its noise level
    assert bool((ac[1:] < plain[1:]).all())  # every later one gets noisier
    for steps in (1, 10, 20, 50):
        ref_e = euler(cfg, rescale_betas_zero_snr=True, prediction_type="v_prediction")
        ref_e.set_timesteps(steps)
        torch.testing.assert_close(get_sigmas(cfg, steps), ref_e.sigmas.double(), rtol=3e-5, atol=0)

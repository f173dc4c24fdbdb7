"""Our samplers against diffusers' schedulers: same model, steps and seeds -> same latents.

diffusers is driven as its pipelines drive it: latents = randn * init_noise_sigma, then
per timestep scale_model_input, model, step(..., generator=). Our side starts from the
same noise converted to the VE view: Euler-family latents already are VE; DDIM, DDPM and
DPM-Solver latents are VP, x_ve = x_vp * sqrt(1 + sigma_max^2). All end at sigma = 0,
where both views agree. Tolerance: max|ours - theirs| / max|theirs| < 1e-5.

Where diffusers cannot match by construction, the case is adapted and says why:
- DDIM computes prev_timestep = t - T // steps instead of taking the next timestep of its
  list; with "trailing" spacing and steps not dividing T (e.g. 15) the two disagree and
  its last step stops at alpha_bar[0] instead of 1. No sigma list reproduces that, so DDIM
  runs with steps dividing T (10, 20, 25).
- DPMSolverMultistep's "leading" spacing is its own (ratio T // (steps + 1), endpoint 0
  dropped) and differs from Euler's that `timesteps_for` follows; that case feeds the
  scheduler's own sigmas to our sampler.
- DPMSolverMultistep with Karras sigmas rounds the model timestep to an integer
  (`timesteps.round()` in set_timesteps), so its UNet sees t up to 0.5 away from the sigma
  it integrates with; we pass the exact fractional t. That case rounds t on our side too
  to show the solvers agree (unrounded, the gap is the model's dependence on t).
- Euler/Heun with Karras sigmas take sigma_min/max from the spaced timesteps, not the
  table (see test_schedules); Euler is given the table's ends, Heun runs with "linspace",
  where the two agree. EulerAncestral, DDIM and DDPM have no Karras option in diffusers.
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from mezzotint.config import SchedulerConfig  # noqa: E402
from mezzotint.diffusion import SAMPLERS, Denoiser, generators, get_sigmas, randn  # noqa: E402

SHAPE = (2, 4, 8, 8)
SEED = 1234
PRED = {"eps": "epsilon", "v": "v_prediction"}


class ToyUNet(torch.nn.Module):
    """Small nonlinear stand-in for a UNet: a fixed random conv, tanh, scaled smoothly by t."""

    def __init__(self, round_t: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.register_buffer("w", torch.randn(4, 4, 3, 3, generator=g) * 0.3)
        self.register_buffer("b", torch.randn(4, generator=g) * 0.1)
        self.round_t = round_t

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        t = t.round() if self.round_t else t
        t = t.expand(x.shape[0]).view(-1, 1, 1, 1)
        h = F.conv2d(x, self.w, self.b, padding=1)
        return torch.tanh(h * (0.5 + t / 1000)) * torch.cos(t / 700) + 0.2 * x * torch.sin(t / 400 + 0.3)


def cfg_for(pred, spacing="trailing", offset=0):
    return SchedulerConfig(prediction_type=pred, timestep_spacing=spacing, steps_offset=offset)


def make_scheduler(cls, cfg, **kw):
    return cls(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
               beta_schedule="scaled_linear", prediction_type=PRED[cfg.prediction_type],
               timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset, **kw)


def make_gens(single=False):
    return torch.Generator().manual_seed(SEED) if single else generators(SEED, SHAPE[0])


def run_diffusers(sched, steps, model, step_kw=None, single=False):
    sched.set_timesteps(steps)
    gens = make_gens(single)
    latents = diffusers.utils.torch_utils.randn_tensor(SHAPE, generator=gens) * sched.init_noise_sigma
    start = latents.clone()
    # as pipelines' prepare_extra_step_kwargs: pass the generator where step() takes one
    kw = dict(step_kw or {})
    if "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = gens
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        out = model(inp, t)
        latents = sched.step(out, t, latents, **kw).prev_sample
    return start, latents


def run_ours(name, cfg, sigmas, start_ve, model, single=False, **options):
    gens = make_gens(single)
    noise = randn(SHAPE, gens)  # advances the generators exactly as diffusers' start draw did
    assert torch.allclose(noise * (start_ve.abs().max() / noise.abs().max()), start_ve, rtol=1e-5, atol=1e-6)
    return SAMPLERS[name](Denoiser(model, cfg), start_ve, sigmas, generator=gens, **options)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def check(name, cfg, sched, steps, *, vp, sigmas=None, model=None, our_model=None, step_kw=None, single=False,
          tol=1e-5, **options):
    model = model or ToyUNet()
    start, want = run_diffusers(sched, steps, model, step_kw, single)
    sig = get_sigmas(cfg, steps) if sigmas is None else sigmas
    start_ve = start * math.sqrt(1 + sig[0].item() ** 2) if vp else start
    got = run_ours(name, cfg, sig, start_ve, our_model or model, single, **options)
    if vp:  # a schedule ending above 0 leaves diffusers in the VP view
        got = got / math.sqrt(1 + sig[-1].item() ** 2)
    assert torch.isfinite(want).all() and want.abs().max() > 0.1
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.2e}"
    return got, want


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing,offset,steps", [("trailing", 0, 10), ("trailing", 0, 15), ("leading", 1, 12)])
def test_euler(pred, spacing, offset, steps):
    cfg = cfg_for(pred, spacing, offset)
    check("euler", cfg, make_scheduler(diffusers.EulerDiscreteScheduler, cfg), steps, vp=False)


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_euler_karras(pred, spacing):
    cfg = cfg_for(pred, spacing)
    d = Denoiser(torch.nn.Identity(), cfg)
    pin = {"sigma_min": d.sigma_min, "sigma_max": d.sigma_max}
    sched = make_scheduler(diffusers.EulerDiscreteScheduler, cfg, use_karras_sigmas=True, **pin)
    check("euler", cfg, sched, 12, vp=False, sigmas=get_sigmas(cfg, 12, karras=True))


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing,offset,steps", [("trailing", 0, 10), ("trailing", 0, 15), ("leading", 1, 12)])
def test_euler_ancestral(pred, spacing, offset, steps):
    cfg = cfg_for(pred, spacing, offset)
    check("euler_a", cfg, make_scheduler(diffusers.EulerAncestralDiscreteScheduler, cfg), steps, vp=False)


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing,offset,karras", [("trailing", 0, False), ("leading", 1, False),
                                                   ("linspace", 0, True)])
def test_heun(pred, spacing, offset, karras):
    cfg = cfg_for(pred, spacing, offset)
    sched = make_scheduler(diffusers.HeunDiscreteScheduler, cfg, use_karras_sigmas=karras)
    check("heun", cfg, sched, 10, vp=False, sigmas=get_sigmas(cfg, 10, karras=karras))


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m(pred, steps):
    # 10 and 20 straddle the `lower_order_final` threshold (15 steps)
    cfg = cfg_for(pred)
    sched = make_scheduler(diffusers.DPMSolverMultistepScheduler, cfg, algorithm_type="dpmsolver++", solver_order=2,
                           final_sigmas_type="zero")
    check("dpmpp_2m", cfg, sched, steps, vp=True)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_final_sigma_min(steps):
    # Ending at sigma_min instead of 0: the last step is 1st order only below 15 steps.
    cfg = cfg_for("eps")
    sched = make_scheduler(diffusers.DPMSolverMultistepScheduler, cfg, final_sigmas_type="sigma_min")
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double().clone()
    assert sigmas[-1] > 0
    check("dpmpp_2m", cfg, sched, steps, vp=True, sigmas=sigmas)


@pytest.mark.parametrize("name,cls", [("euler_a", "EulerAncestralDiscreteScheduler"), ("ddpm", "DDPMScheduler"),
                                      ("ddim", "DDIMScheduler")])
def test_single_generator(name, cls):
    # One generator for the whole batch draws (B, C, H, W) at once, as diffusers does.
    cfg = cfg_for("eps")
    kw = {"clip_sample": False} if name != "euler_a" else {}
    opts = {"eta": 1.0} if name == "ddim" else {}
    sched = make_scheduler(getattr(diffusers, cls), cfg, **kw)
    check(name, cfg, sched, 10, vp=name != "euler_a", single=True, step_kw=opts, **opts)


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_dpmpp_2m_karras(pred):
    cfg = cfg_for(pred)
    sched = make_scheduler(diffusers.DPMSolverMultistepScheduler, cfg, algorithm_type="dpmsolver++", solver_order=2,
                           use_karras_sigmas=True)
    # diffusers feeds round(t) to the model here (see module docstring)
    check("dpmpp_2m", cfg, sched, 12, vp=True, sigmas=get_sigmas(cfg, 12, karras=True),
          our_model=ToyUNet(round_t=True))


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_dpmpp_2m_leading_with_its_own_sigmas(pred):
    cfg = cfg_for(pred, "leading", 1)
    sched = make_scheduler(diffusers.DPMSolverMultistepScheduler, cfg, algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(12)
    sigmas = sched.sigmas.double().clone()
    check("dpmpp_2m", cfg, sched, 12, vp=True, sigmas=sigmas)


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,offset,steps", [("trailing", 0, 10), ("trailing", 0, 25), ("leading", 1, 20)])
def test_ddim(pred, eta, spacing, offset, steps):
    cfg = cfg_for(pred, spacing, offset)
    sched = make_scheduler(diffusers.DDIMScheduler, cfg, clip_sample=False, set_alpha_to_one=True)
    check("ddim", cfg, sched, steps, vp=True, step_kw={"eta": eta}, eta=eta)


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("spacing,offset,steps", [("trailing", 0, 10), ("trailing", 0, 15), ("leading", 1, 20),
                                                  ("leading", 0, 10)])
def test_ddpm(pred, spacing, offset, steps):
    cfg = cfg_for(pred, spacing, offset)
    sched = make_scheduler(diffusers.DDPMScheduler, cfg, clip_sample=False, variance_type="fixed_small")
    check("ddpm", cfg, sched, steps, vp=True)


def test_dpmpp_2m_karras_unrounded_gap_is_the_timestep_rounding():
    # Without rounding t on our side the results differ, but only by the model's t-slope.
    cfg = cfg_for("eps")
    sched = make_scheduler(diffusers.DPMSolverMultistepScheduler, cfg, use_karras_sigmas=True)
    start, want = run_diffusers(sched, 12, ToyUNet())
    sig = get_sigmas(cfg, 12, karras=True)
    got = run_ours("dpmpp_2m", cfg, sig, start * math.sqrt(1 + sig[0].item() ** 2), ToyUNet())
    assert 1e-5 < rel_err(got, want) < 1e-2


def test_ddim_trailing_needs_steps_dividing_T():
    # diffusers DDIM with trailing spacing and 15 steps ends at alpha_bar[0] (sigma ~0.03),
    # not at sigma 0: its prev_timestep is t - T // steps, not the next listed timestep.
    cfg = cfg_for("eps")
    sched = make_scheduler(diffusers.DDIMScheduler, cfg, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(15)
    last = sched.timesteps[-1].item()
    assert last - cfg.num_train_timesteps // 15 == 0  # lands on t = 0, whose alpha_bar < 1
    assert sched.timesteps[0] - sched.timesteps[1] != cfg.num_train_timesteps // 15


@pytest.mark.parametrize("name,cls,vp", [("euler", "EulerDiscreteScheduler", False),
                                         ("euler_a", "EulerAncestralDiscreteScheduler", False),
                                         ("dpmpp_2m", "DPMSolverMultistepScheduler", True)])
@pytest.mark.parametrize("steps", [10, 20])
def test_zero_terminal_snr(name, cls, vp, steps):
    # Lin et al.'s rescaled schedule; diffusers (and we) end alpha-bar at 2^-24, sigma 4096.
    # diffusers rescales in float32, 2e-4 relative off float64 in places: hence 1e-4 here.
    cfg = SchedulerConfig(prediction_type="v", rescale_betas_zero_snr=True)
    kw = {"final_sigmas_type": "zero"} if vp else {}
    sched = make_scheduler(getattr(diffusers, cls), cfg, rescale_betas_zero_snr=True, **kw)
    assert get_sigmas(cfg, steps)[0].item() == pytest.approx(4096, rel=1e-6)
    check(name, cfg, sched, steps, vp=vp, tol=1e-4)


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("sigma", [0.05, 1.3, 14.6, 4096.0])
def test_guidance_rescale_is_diffusers_rescale_noise_cfg(pred, sigma):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from mezzotint.diffusion.guidance import CFGDenoiser

    class Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.toy = ToyUNet()

        def forward(self, x, t, c):
            return self.toy(x, t) * (1 + c.view(-1, 1, 1, 1)) + c.view(-1, 1, 1, 1)

    cfg = cfg_for(pred)
    den = Denoiser(Cond(), cfg)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * sigma
    s = torch.full((SHAPE[0],), sigma)
    c, u = torch.tensor([0.4, -0.3]), torch.tensor([0.0, 0.1])
    # diffusers' way: combine and rescale the UNet's outputs, then step with them
    x_in, t = x / math.sqrt(sigma**2 + 1), den.sigma_to_t(s)
    out_u, out_c = den.model(x_in, t, u), den.model(x_in, t, c)
    guided = rescale_noise_cfg(out_u + 5.0 * (out_c - out_u), out_c, guidance_rescale=0.7)
    c_in = 1 / math.sqrt(sigma**2 + 1)
    want = x - sigma * guided if pred == "eps" else x * c_in**2 - sigma * c_in * guided
    got = CFGDenoiser(den, {"c": c}, {"c": u}, 5.0, rescale=0.7)(x, s)
    assert rel_err(got, want) < 1e-5
    plain = CFGDenoiser(den, {"c": c}, {"c": u}, 5.0)(x, s)
    assert rel_err(plain, want) > 1e-3
    with pytest.raises(ValueError, match="rescale"):
        CFGDenoiser(den, {"c": c}, {"c": u}, 5.0, rescale=1.5)

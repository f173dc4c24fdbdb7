"""Samplers on a problem with a known answer, plus the denoiser, guidance and noise contracts.

Data x0 ~ N(mu, s^2 I) has the ideal denoiser D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu),
and the probability-flow ODE dx/dsigma = (x - D) / sigma carries x_T at sigma_max to
    mu + (x_T - mu) * s / sqrt(s^2 + sigma_max^2)      at sigma = 0.
Stochastic samplers must instead land on the data distribution: mean mu, std s.
"""
import math

import pytest
import torch

from mezzotint.config import SchedulerConfig
from mezzotint.diffusion import (
    SAMPLERS,
    CFGDenoiser,
    Denoiser,
    generators,
    get_sigmas,
    randn,
    sampler_help,
    sampler_names,
)

MU, S = 0.5, 0.8
CFG = SchedulerConfig()
DETERMINISTIC = [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("ddim", {"eta": 0.0})]
STOCHASTIC = [("ddpm", {}), ("euler_a", {}), ("ddim", {"eta": 1.0})]


def ideal_denoiser(x, sigma, **_):
    s2 = sigma.view(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def ode_solution(x_T, sigma_max):
    return MU + (x_T - MU) * S / math.sqrt(S**2 + sigma_max**2)


def start(shape, seed, sigma_max):
    # x_T ~ N(mu, s^2 + sigma_max^2): the data blurred to sigma_max
    return MU + randn(shape, generators(seed, shape[0])) * math.sqrt(S**2 + sigma_max**2)


def ode_error(name, opts, steps, karras=False):
    sigmas = get_sigmas(CFG, steps, karras=karras)
    x_T = start((2, 3, 4, 4), 0, sigmas[0].item())
    x = SAMPLERS[name](ideal_denoiser, x_T, sigmas, **opts)
    return (x - ode_solution(x_T, sigmas[0].item())).abs().max().item()


def test_registry():
    assert sampler_names() == ["ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m"]
    for name in sampler_names():
        line = sampler_help(name)
        assert line and "\n" not in line
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_help("plms")


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("name,opts", DETERMINISTIC)
def test_deterministic_samplers_solve_the_ode(name, opts, karras):
    # Every schedule ends with a jump from its last sigma to 0 (the last step returns
    # D(x)), which bounds the accuracy: sigma(t=12) ~ 0.1 for trailing at 80 steps, the
    # table's sigma_min ~ 0.03 for Karras.
    errs = [ode_error(name, opts, n, karras) for n in (10, 20, 40, 80)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    second_order = name in ("heun", "dpmpp_2m")
    assert errs[-1] < (1e-3 if karras and second_order else 5e-2), errs


@pytest.mark.parametrize("karras", [False, True])
def test_second_order_beats_euler(karras):
    for n in (10, 20, 40):
        e = ode_error("euler", {}, n, karras)
        for name in ("heun", "dpmpp_2m"):
            assert ode_error(name, {}, n, karras) < (0.5 if karras else 0.6) * e
    if karras:
        assert ode_error("heun", {}, 40, True) < 0.2 * ode_error("euler", {}, 40, True)


def test_ddim_eta0_is_euler():
    # In the VE view DDIM's update x0 + (sigma_next / sigma)(x - x0) is exactly an Euler step.
    sigmas = get_sigmas(CFG, 10)
    x_T = start((2, 3, 4, 4), 1, sigmas[0].item())
    a = SAMPLERS["ddim"](ideal_denoiser, x_T, sigmas, eta=0.0)
    b = SAMPLERS["euler"](ideal_denoiser, x_T, sigmas)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def sample_stats(name, opts, sigmas, seed=0):
    x_T = start((8, 4, 16, 16), seed, sigmas[0].item())  # 8192 independent scalars
    x = SAMPLERS[name](ideal_denoiser, x_T, sigmas, generator=generators(seed + 100, 8), **opts)
    return x.mean().item(), x.std().item()


def ancestral_chain_std(sigmas):
    """Exact std of the discrete ancestral chain with the ideal denoiser (a linear Gaussian recursion).

    Each step x' = r^2 x + (1 - r^2) D(x) + sigma' sqrt(1 - r^2) z, r = sigma'/sigma, keeps the
    mean at mu but drops the posterior spread of x0 ((1 - r^2)^2 Var[x0 | x]), so the std
    reaches s only as steps grow (first order in the step size).
    """
    s = sigmas.tolist()
    var = S**2 + s[0] ** 2
    for sig, nxt in zip(s[:-1], s[1:]):
        k, r2 = S**2 / (S**2 + sig**2), (nxt / sig) ** 2
        var = (r2 + (1 - r2) * k) ** 2 * var + nxt**2 * (1 - r2)
    return math.sqrt(var)


@pytest.mark.parametrize("name,opts", STOCHASTIC)
@pytest.mark.parametrize("karras", [False, True])
def test_stochastic_samplers_reach_the_data_distribution(name, opts, karras):
    # sampling error of 8192 draws: ~0.009 on the mean, ~0.8% on the std
    for steps in (50, 500):
        sigmas = get_sigmas(CFG, steps, karras=karras)
        mean, std = sample_stats(name, opts, sigmas)
        assert mean == pytest.approx(MU, abs=0.03)
        assert std == pytest.approx(ancestral_chain_std(sigmas), rel=0.025)
    assert std == pytest.approx(S, rel=0.03)
    assert ancestral_chain_std(get_sigmas(CFG, 500, karras=karras)) == pytest.approx(S, rel=0.015)


def test_ddpm_equals_ddim_eta1():
    # Same posterior mean and variance, and the same draws from the same generators.
    sigmas = get_sigmas(CFG, 12, karras=True)
    x_T = start((2, 3, 4, 4), 3, sigmas[0].item())
    a = SAMPLERS["ddpm"](ideal_denoiser, x_T, sigmas, generator=generators(9, 2))
    b = SAMPLERS["ddim"](ideal_denoiser, x_T, sigmas, generator=generators(9, 2), eta=1.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,opts", DETERMINISTIC + STOCHASTIC)
def test_seeded_determinism_and_no_mutation(name, opts):
    sigmas = get_sigmas(CFG, 8)
    x_T = start((3, 2, 4, 4), 5, sigmas[0].item())
    keep = x_T.clone()
    a = SAMPLERS[name](ideal_denoiser, x_T, sigmas, generator=generators(42, 3), **opts)
    b = SAMPLERS[name](ideal_denoiser, x_T, sigmas, generator=generators(42, 3), **opts)
    assert torch.equal(a, b)
    assert torch.equal(x_T, keep)
    if (name, opts) in STOCHASTIC:
        c = SAMPLERS[name](ideal_denoiser, x_T, sigmas, generator=generators(43, 3), **opts)
        assert not torch.allclose(a, c)


@pytest.mark.parametrize("name,opts", STOCHASTIC)
def test_batch_row_k_equals_single_run_with_seed_plus_k(name, opts):
    sigmas = get_sigmas(CFG, 8)
    x_T = start((3, 2, 4, 4), 5, sigmas[0].item())
    batch = SAMPLERS[name](ideal_denoiser, x_T, sigmas, generator=generators(42, 3), **opts)
    for k in range(3):
        one = SAMPLERS[name](ideal_denoiser, x_T[k:k + 1], sigmas, generator=generators(42 + k, 1), **opts)
        torch.testing.assert_close(batch[k:k + 1], one, rtol=0, atol=1e-6)


def test_callback_and_options():
    sigmas = get_sigmas(CFG, 6)
    x_T = start((1, 1, 2, 2), 0, sigmas[0].item())
    seen = []
    SAMPLERS["heun"](ideal_denoiser, x_T, sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert set(seen[0]) == {"i", "x", "sigma", "sigma_next", "denoised"}
    assert seen[-1]["sigma_next"] == 0 and seen[0]["sigma"] == pytest.approx(sigmas[0].item())
    with pytest.raises(TypeError):
        SAMPLERS["euler"](ideal_denoiser, x_T, sigmas, eta=1.0)  # options are per sampler
    with pytest.raises(ValueError, match="descending"):
        SAMPLERS["euler"](ideal_denoiser, x_T, sigmas.flip(0))


def test_extra_reaches_the_denoiser():
    got = {}

    def d(x, sigma, **kw):
        got.update(kw)
        assert sigma.shape == (x.shape[0],)
        return ideal_denoiser(x, sigma)

    sigmas = get_sigmas(CFG, 2)
    SAMPLERS["dpmpp_2m"](d, start((2, 1, 2, 2), 0, sigmas[0].item()), sigmas, extra={"context": 1})
    assert got == {"context": 1}


# -- Denoiser -----------------------------------------------------------------------------------


class Fixed(torch.nn.Module):
    """A 'UNet' that returns a fixed output and records what it was given."""

    def __init__(self, out, dtype=torch.float32):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros((), dtype=dtype))
        self.out = out
        self.seen = {}

    def forward(self, x_in, t, **cond):
        self.seen = {"x_in": x_in, "t": t, **cond}
        return self.out.to(x_in.dtype) + self.p


def test_denoiser_eps():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    sigma = torch.tensor([0.5, 7.0])
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    model = Fixed(eps)
    d = Denoiser(model, SchedulerConfig(prediction_type="eps"))
    torch.testing.assert_close(d(x, sigma), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.seen["x_in"], x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt())
    torch.testing.assert_close(model.seen["t"], d.sigma_to_t(sigma))
    # a scalar sigma applies to every row
    torch.testing.assert_close(d(x, 7.0)[1], d(x, sigma)[1])


def test_denoiser_v():
    # v = alpha * eps - sigma_vp * x0 (Salimans & Ho 2022), alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma alpha
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    sigma = torch.tensor([0.1, 3.0]).view(-1, 1, 1, 1)
    alpha = 1 / (1 + sigma**2).sqrt()
    v = alpha * eps - sigma * alpha * x0
    d = Denoiser(Fixed(v), SchedulerConfig(prediction_type="v"))
    torch.testing.assert_close(d(x0 + sigma * eps, sigma.flatten()), x0, rtol=1e-5, atol=1e-5)


def test_denoiser_runs_model_in_its_dtype():
    model = Fixed(torch.zeros(1, 2, 2, 2), dtype=torch.float64)
    d = Denoiser(model, CFG)
    out = d(torch.ones(1, 2, 2, 2), torch.tensor([1.0]), context=torch.ones(1, 3, 4), context_mask=torch.ones(1, 3).bool())
    assert model.seen["x_in"].dtype == torch.float64 and model.seen["context"].dtype == torch.float64
    assert model.seen["context_mask"].dtype == torch.bool and model.seen["t"].dtype == torch.float32
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(model, SchedulerConfig(prediction_type="x0"))


# -- guidance -----------------------------------------------------------------------------------


class Counting:
    """D(x, sigma, context, context_mask) = x / (1 + sigma^2) + masked mean of the context."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context, context_mask=None):
        self.calls.append(x.shape[0])
        m = torch.ones(context.shape[:2], dtype=torch.bool) if context_mask is None else context_mask
        pooled = (context * m[..., None]).sum((1, 2)) / m.sum(1) / context.shape[2]  # (B,)
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + pooled.view(-1, 1, 1, 1)


def conds(B, L_c, L_u, mask=True):
    g = torch.Generator().manual_seed(L_c * 10 + L_u)
    c = {"context": torch.randn(B, L_c, 6, generator=g)}
    u = {"context": torch.randn(B, L_u, 6, generator=g)}
    if mask:
        c["context_mask"] = torch.ones(B, L_c, dtype=torch.bool)
        c["context_mask"][0, -1] = False
        u["context_mask"] = torch.ones(B, L_u, dtype=torch.bool)
    return c, u


@pytest.mark.parametrize("L_c,L_u", [(5, 5), (5, 3), (2, 7)])
def test_cfg_batched_equals_unbatched(L_c, L_u):
    x, sigma = torch.randn(3, 2, 4, 4), torch.tensor([2.0, 2.0, 2.0])
    c, u = conds(3, L_c, L_u)
    inner_b, inner_u = Counting(), Counting()
    a = CFGDenoiser(inner_b, c, u, 7.5)(x, sigma)
    b = CFGDenoiser(inner_u, c, u, 7.5, batch_together=False)(x, sigma)
    torch.testing.assert_close(a, b)
    assert inner_b.calls == [6] and inner_u.calls == [3, 3]
    want = inner_u(x, sigma, **u) + 7.5 * (inner_u(x, sigma, **c) - inner_u(x, sigma, **u))
    torch.testing.assert_close(a, want)


def test_cfg_scale_one_is_cond_alone():
    x, sigma = torch.randn(2, 2, 4, 4), torch.tensor([1.0, 1.0])
    c, u = conds(2, 4, 6)
    inner = Counting()
    out = CFGDenoiser(inner, c, u, 1.0)(x, sigma)
    torch.testing.assert_close(out, Counting()(x, sigma, **c))
    assert inner.calls == [2]


def test_cfg_without_mask_does_not_pad():
    # Zero padding without a mask would be attended to: fall back to two passes.
    x, sigma = torch.randn(2, 2, 4, 4), torch.tensor([1.0, 1.0])
    c, u = conds(2, 4, 6, mask=False)
    inner = Counting()
    out = CFGDenoiser(inner, c, u, 3.0)(x, sigma)
    assert inner.calls == [2, 2]
    ref = Counting()
    torch.testing.assert_close(out, ref(x, sigma, **u) + 3.0 * (ref(x, sigma, **c) - ref(x, sigma, **u)))


def test_cfg_with_sampler_and_batch1_uncond():
    # One unconditional embedding (batch 1) serves every row; works inside a sampler.
    c, u = conds(2, 4, 4)
    u = {k: v[:1] for k, v in u.items()}
    sigmas = get_sigmas(CFG, 4)
    x = start((2, 2, 4, 4), 0, sigmas[0].item())
    out = SAMPLERS["euler"](CFGDenoiser(Counting(), c, u, 5.0), x, sigmas)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(Counting(), c, {"context": u["context"]}, 5.0)


# -- noise ----------------------------------------------------------------------------------------


def test_randn_rows_follow_their_seeds():
    batch = randn((3, 4, 5, 5), generators(10, 3))
    for k in range(3):
        one = torch.randn((1, 4, 5, 5), generator=torch.Generator().manual_seed(10 + k))
        assert torch.equal(batch[k:k + 1], one)
    single = randn((3, 4, 5, 5), torch.Generator().manual_seed(10))
    assert torch.equal(single, torch.randn((3, 4, 5, 5), generator=torch.Generator().manual_seed(10)))
    assert randn((2, 3), None, dtype=torch.float64).dtype == torch.float64
    assert [g.initial_seed() for g in generators(7, 3)] == [7, 8, 9]
    with pytest.raises(ValueError, match="generators"):
        randn((3, 4), generators(0, 2))

"""Stable Diffusion checkpoints load into mezzotint and compute what diffusers computes.

The reference is diffusers from PyPI on the same (random) weights: tiny SD 1.5-like and
SD 2.1-like models saved by diffusers' save_pretrained, and as an original-layout single
file (which diffusers' own from_single_file is shown to read into the same weights).
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_sd_common import diffusers, max_err, reference, saved

from mezzotint.diffusion import generators, randn
from mezzotint.pipeline import Pipeline, Request
from mezzotint.sd import load_sd

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
TOL = 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def case(request):
    variant = request.param
    folder, single = saved(variant)
    return variant, reference(variant), load_sd(single), folder, single


def test_detected_config(case):
    variant, ref, (unet, vae, text, cfg), _, _ = case
    sd2 = variant == "sd2"
    assert cfg.scheduler.prediction_type == ("v" if sd2 else "eps")
    assert (cfg.scheduler.timestep_spacing, cfg.scheduler.steps_offset) == ("leading", 1)
    assert (cfg.scheduler.beta_start, cfg.scheduler.beta_end) == (0.00085, 0.012)
    assert cfg.unet.linear_proj == sd2 and cfg.unet.num_heads == (0 if sd2 else 8)
    assert cfg.unet.channel_mult == (1, 2, 2) and cfg.unet.attention_levels == (0, 1)
    assert cfg.vae.scaling_factor == 0.18215 and cfg.vae.factor == 2
    assert (cfg.text.kind, cfg.text.layer) == ("clip", -1)
    assert text.model.config.num_hidden_layers == 2  # SD 2.x: OpenCLIP's last of 3 layers dropped
    assert text.model.config.hidden_act == ref.text_encoder.config.hidden_act
    assert text.tokenizer.pad_token_id == ref.tokenizer.pad_token_id == (0 if sd2 else 49407)
    assert (cfg.defaults.width, cfg.defaults.cfg) == (768 if sd2 else 512, 7.5)


def test_single_file_equals_diffusers_folder(case):
    variant, ref, single_models, folder, _ = case
    folder_models = load_sd(folder)
    assert folder_models[3] == replace(single_models[3], name=folder_models[3].name,
                                       defaults=folder_models[3].defaults)
    for a, b in zip(single_models[:2] + (single_models[2].model,), folder_models[:2] + (folder_models[2].model,)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diffusers_reads_our_single_file_as_the_same_weights(case):
    # an independent check of the key tables: diffusers' own converter agrees
    variant, ref, _, folder, single = case
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, name).state_dict(), getattr(theirs, name).state_dict()
        assert set(a) == set(b) and max(max_err(a[k], b[k]) for k in a) == 0, name


def test_text_encoder_matches(case):
    variant, ref, (_, _, text, _), _, _ = case
    prompts = ["a photo of a cat", ""]
    ours, mask = text.encode(prompts)
    assert ours.shape == (2, 77, 32) and mask.all()
    ids = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert [text.tokenize(p)[0] + [text.tokenizer.pad_token_id] * (77 - len(text.tokenize(p)[0]))
            for p in prompts] == ids.tolist()
    with torch.no_grad():
        want = ref.text_encoder(ids)[0]
    err = max_err(ours, want)
    assert err < TOL, err


def test_unet_matches(case):
    variant, ref, (unet, _, _, _), _, _ = case
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([3.0, 711.0])
    with torch.no_grad():
        err = max_err(unet(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample)
    assert err < TOL, err


def test_vae_matches(case):
    variant, ref, (_, vae, _, _), _, _ = case
    g = torch.Generator().manual_seed(2)
    z, img = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        dec = max_err(vae.decode(z), ref.vae.decode(z / 0.18215).sample)
        enc = max_err(vae.encode(img), ref.vae.encode(img).latent_dist.mode() * 0.18215)
    assert dec < TOL and enc < TOL, (dec, enc)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_pipeline_matches(case, sampler):
    variant, ref, (unet, vae, text, cfg), _, _ = case
    steps, seed, prompt = 8, 42, "a photo of a cat"
    saved_sched = ref.scheduler  # the reference is shared by the module's tests: put it back
    sched = saved_sched.config
    if sampler == "euler":  # SD's own "leading" spacing with steps_offset 1
        ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(sched)
    else:  # diffusers' DPM-Solver has its own "leading" (see test_diffusers_parity): both trailing here
        cfg = replace(cfg, scheduler=replace(cfg.scheduler, timestep_spacing="trailing", steps_offset=0))
        ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            sched, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", steps_offset=0,
            final_sigmas_type="zero")
    pipe = Pipeline(unet, vae, text, cfg, "cpu", torch.float32)
    [res] = pipe(Request(prompt=prompt, seed=seed, steps=steps, sampler=sampler, cfg=7.5, width=16, height=16))
    noise = randn((1, 4, 8, 8), generators(seed, 1))  # our first draw; diffusers scales it itself
    try:
        out = ref(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=7.5, height=16, width=16,
                  latents=noise, output_type="latent")
    finally:
        ref.scheduler = saved_sched
    latent = out.images
    assert (res.latent - latent[0]).abs().max() / latent.abs().max() < 1e-3
    with torch.no_grad():
        image = (ref.vae.decode(latent / 0.18215).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    mean_err = np.abs(np.asarray(res.image, dtype=np.float64) / 255 - image).mean()
    assert mean_err < 1 / 255, mean_err


def test_pipeline_matches_with_guidance_rescale_and_zero_terminal_snr(case):
    # diffusers' guidance_rescale (on eps or v, as the UNet predicts); the v-model also with
    # the zero-terminal-SNR schedule and trailing spacing, as Lin et al. prescribe (the
    # eps-model keeps SD's own leading spacing, as test_pipeline_matches)
    variant, ref, (unet, vae, text, cfg), _, _ = case
    steps, seed, prompt, phi = 8, 7, "a photo of a cat", 0.7
    saved_sched = ref.scheduler
    if cfg.scheduler.prediction_type == "v":
        cfg = replace(cfg, scheduler=replace(cfg.scheduler, timestep_spacing="trailing", steps_offset=0,
                                             rescale_betas_zero_snr=True))
    s = cfg.scheduler
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        saved_sched.config, timestep_spacing=s.timestep_spacing, steps_offset=s.steps_offset,
        rescale_betas_zero_snr=s.rescale_betas_zero_snr)
    try:
        pipe = Pipeline(unet, vae, text, cfg, "cpu", torch.float32)
        req = Request(prompt=prompt, seed=seed, steps=steps, sampler="euler", cfg=7.5, width=16, height=16,
                      guidance_rescale=phi)
        [res] = pipe(req)
        [plain] = pipe(replace(req, guidance_rescale=0.0))
        noise = randn((1, 4, 8, 8), generators(seed, 1))
        latent = ref(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=7.5, height=16, width=16,
                     latents=noise, output_type="latent", guidance_rescale=phi).images
    finally:
        ref.scheduler = saved_sched
    scale = latent.abs().max()
    assert (res.latent - latent[0]).abs().max() / scale < 1e-3
    assert (plain.latent - latent[0]).abs().max() / scale > 1e-2  # the rescale did something

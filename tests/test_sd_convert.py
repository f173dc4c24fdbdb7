"""Writing SD models (diffusers folder, our folder, original single file), `convert`, .ckpt
files, and where eps / v comes from."""
import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_sd_common import diffusers, max_err, reference, saved

from mezzotint.checkpoints import ModelError
from mezzotint.pipeline import Pipeline, Request
from mezzotint.sd import (
    convert,
    is_sd_checkpoint,
    load_sd,
    read_sd_config,
    save_diffusers,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_save_diffusers_loads_in_diffusers(variant, tmp_path):
    folder, single = saved(variant)
    ref = reference(variant)
    save_diffusers(tmp_path / "out", *load_sd(single))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(pipe, name), getattr(ref, name)), name
    for key in ("prediction_type", "beta_start", "beta_end", "beta_schedule", "timestep_spacing", "steps_offset"):
        assert pipe.scheduler.config[key] == ref.scheduler.config[key], key
    assert pipe.tokenizer.pad_token_id == ref.tokenizer.pad_token_id
    assert pipe.unet.config.attention_head_dim == ref.unet.config.attention_head_dim
    assert pipe.vae.config.scaling_factor == 0.18215


def test_convert_to_mezzotint_then_pipeline_load(tmp_path):
    _, single = saved("sd2")
    dst = convert(single, tmp_path / "model", "mezzotint")
    meta = json.loads((dst / "model.json").read_text())
    assert meta["config"]["text"]["path"] == "text_encoder" and (dst / "text_encoder" / "config.json").is_file()
    loaded = Pipeline.load(dst, device="cpu")
    direct = Pipeline(*load_sd(single), "cpu", torch.float32)
    req = Request(prompt="a photo of a cat", seed=3, steps=4, sampler="euler", cfg=7.5, width=16, height=16)
    assert loaded.text.tokenizer.pad_token_id == 0
    # same weights; kernels may round differently with the tensors' memory alignment
    a, b = loaded(req)[0].latent, direct(req)[0].latent
    assert max_err(a, b) < 1e-4 * b.abs().max()


def test_convert_back_to_original_and_refusals(tmp_path):
    folder, single = saved("sd1")
    out = convert(folder, tmp_path / "again.safetensors", "original")
    a, b = load_file(single), load_file(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ModelError, match="exists"):
        convert(folder, tmp_path / "again.safetensors", "original")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ModelError, match="not an empty folder"):
        convert(single, tmp_path / "busy", "diffusers")
    with pytest.raises(ValueError, match="unknown target"):
        convert(single, tmp_path / "y", "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors", "busy"]  # no temp folders left


def test_convert_keeps_half_precision(tmp_path):
    _, single = saved("sd1")
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(single).items()}, half)
    dst = convert(half, tmp_path / "m", "mezzotint")
    with safe_open(dst / "unet.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    unet, *_ = load_sd(half, dtype=torch.float32)
    assert next(unet.parameters()).dtype == torch.float32


def test_ckpt_and_where_prediction_comes_from(tmp_path):
    _, single = saved("sd2")
    sd = load_file(single)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, plain)
    base = tmp_path / "base.ckpt"
    torch.save({"state_dict": sd, "global_step": 875000}, base)  # SD 2.x-base's last step: eps, as diffusers
    assert is_sd_checkpoint(plain)
    unet, _, _, cfg = load_sd(plain)
    assert cfg.scheduler.prediction_type == "v" and same_weights(unet, load_sd(single)[0])
    assert load_sd(base)[3].scheduler.prediction_type == "eps"
    assert load_sd(plain, prediction="eps")[3].scheduler.prediction_type == "eps"
    sd1_file = tmp_path / "sd1.safetensors"
    shutil.copy(saved("sd1")[1], sd1_file)
    assert load_sd(sd1_file)[3].scheduler.prediction_type == "eps"
    sd1_file.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')  # A1111's sidecar
    assert load_sd(sd1_file)[3].scheduler.prediction_type == "v"
    with pytest.raises(ValueError, match="unknown prediction"):
        load_sd(plain, prediction="x0")


def test_is_sd_checkpoint(tiny_model, tmp_path):
    folder, single = saved("sd1")
    assert is_sd_checkpoint(folder) and is_sd_checkpoint(single)
    assert not is_sd_checkpoint(tiny_model) and not is_sd_checkpoint(tmp_path / "none.safetensors")
    from mezzotint.checkpoints import load_model, save_model
    one = save_model(tmp_path / "one.safetensors", *load_model(tiny_model))
    assert not is_sd_checkpoint(one)


def test_unet_output_after_save_diffusers_roundtrip(tmp_path):
    folder, single = saved("sd1")
    unet, vae, text, cfg = load_sd(single)
    save_diffusers(tmp_path / "d", unet, vae, text, cfg)
    again = load_sd(tmp_path / "d")
    assert again[3].unet == cfg.unet and again[3].vae == cfg.vae and again[3].scheduler == cfg.scheduler
    assert same_weights(again[0], unet) and same_weights(again[1], vae) and same_weights(again[2].model, text.model)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():  # equal weights; rounding may differ with their memory alignment
        assert max_err(again[0](x, torch.tensor([500.0]), ctx), unet(x, torch.tensor([500.0]), ctx)) < 1e-5


def test_read_sd_config_reads_no_weights(tmp_path):
    folder, single = saved("sd2")
    for path in (folder, single):
        assert read_sd_config(path) == load_sd(path)[3]
    assert read_sd_config(single, prediction="eps").scheduler.prediction_type == "eps"
    ckpt = tmp_path / "x.ckpt"
    torch.save(load_file(single), ckpt)
    assert read_sd_config(ckpt) == replace(load_sd(single)[3], name="x")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single.read_bytes()[:1000])
    with pytest.raises(ModelError, match="corrupt"):
        read_sd_config(cut)


def test_inpainting_unet_and_old_clip_names(tmp_path):
    _, single = saved("sd1")
    sd = load_file(single)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(32, 9, 3, 3)  # +1 mask +4 masked image
    # older SD 1.x files name the CLIP tensors without the "text_model." level
    sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
          for k, v in sd.items()}
    file = tmp_path / "inpaint.safetensors"
    save_file(sd, file)
    unet, _, text, cfg = load_sd(file)
    assert cfg.unet.in_channels == 9 and cfg.unet.out_channels == 4
    assert same_weights(text.model, load_sd(single)[2].model)
    with torch.no_grad():
        assert unet(torch.randn(1, 9, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32)).shape == (1, 4, 8, 8)


def test_zero_terminal_snr_scheduler_is_read_and_written(tmp_path):
    folder, _ = saved("sd2")
    src = tmp_path / "ztsnr"
    shutil.copytree(folder, src)
    path = src / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rescale_betas_zero_snr": True}))
    parts = load_sd(src)
    assert parts[3].scheduler.rescale_betas_zero_snr and parts[3].scheduler.prediction_type == "v"
    save_diffusers(tmp_path / "out", *parts)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    assert pipe.scheduler.config["rescale_betas_zero_snr"] is True
    assert load_sd(tmp_path / "out")[3].scheduler.rescale_betas_zero_snr

"""Shared by the test_sd_* files: tiny random SD 1.5-like and SD 2.1-like models, saved by
diffusers itself (the reference) as a pipeline folder, and as an original-layout single file.

SD 1.5-like: CLIP (quick_gelu, last layer), 8 heads, conv proj_in/out, eps.
SD 2.1-like: OpenCLIP layout (gelu, penultimate layer: diffusers keeps one layer less),
64-wide heads, linear proj_in/out, v-prediction, tokenizer padding with "!" (id 0).
"""
import atexit
import functools
import shutil
import tempfile

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

VARIANTS = {
    "sd1": dict(widths=[32, 64, 64], heads=8, linear=False, act="quick_gelu", pred="epsilon", pad="<|endoftext|>"),
    "sd2": dict(widths=[64, 128, 128], heads=[1, 2, 2], linear=True, act="gelu", pred="v_prediction", pad="!"),
}
TEXT_WIDTH = 32
ROOT = tempfile.mkdtemp(prefix="mezzotint-sd-tests-")
atexit.register(shutil.rmtree, ROOT, True)


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms included, so a swapped pair of tensors shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = p.std().item() if p.numel() > 1 and p.std() > 0 else 1.0
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * scale)


def reference_parts(variant: str, seed: int = 0):
    """diffusers' UNet / autoencoder, transformers' CLIP, a tokenizer from the shipped BPE, Euler."""
    from transformers import CLIPTextConfig, CLIPTextModel
    v = VARIANTS[variant]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=v["widths"], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=v["heads"], use_linear_projection=v["linear"],
        norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=32, sample_size=16, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act=v["act"], bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    for i, m in enumerate((unet, vae, text)):
        perturb(m, seed * 10 + i)
    sched = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=v["pred"], timestep_spacing="leading", steps_offset=1)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=hf_clip_tokenizer(v["pad"]),
                scheduler=sched)


def hf_clip_tokenizer(pad: str):
    """transformers' CLIPTokenizer over the shipped vocabulary (the reference: mezzotint's own
    is sd/clip.py's)."""
    from transformers import CLIPTokenizer

    from mezzotint.sd.tokenizer import BOS, EOS, clip_vocab
    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], bos_token=BOS,
                         eos_token=EOS, unk_token=EOS, pad_token=pad, model_max_length=77)


def reference_pipeline(parts):
    return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


@functools.cache
def saved(variant: str):
    """(diffusers folder, original-layout .safetensors) of one variant, written once per session."""
    from pathlib import Path

    from mezzotint.sd import load_sd, save_single_file
    root = Path(ROOT) / variant
    folder = root / "diffusers"
    reference_pipeline(reference_parts(variant)).save_pretrained(folder)
    unet, vae, text, cfg = load_sd(folder)
    single = save_single_file(root / f"{variant}.safetensors", unet, vae, text, cfg)
    return folder, single


def reference(variant: str):
    """The reference pipeline, loaded by diffusers from its own saved folder."""
    folder, _ = saved(variant)
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()

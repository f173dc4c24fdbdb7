"""Real Stable Diffusion 1.5 shapes with random weights (about 1.1 B parameters, ~8 GB of
memory at peak): single file -> detected config -> diffusers folder -> same UNet output
as diffusers. Slow: run with `pytest -m slow tests/test_sd_full_size.py`."""
import gc

import pytest
import torch

from mezzotint.config import UNetConfig, VAEConfig

SD15_UNET = UNetConfig(in_channels=4, out_channels=4, channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                       attention_levels=(0, 1, 2), head_dim=64, num_heads=8, linear_proj=False, context_dim=768,
                       transformer_depth=1, groups=32)
SD15_VAE = VAEConfig(in_channels=3, latent_channels=4, channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                     mid_attention=True, groups=32, scaling_factor=0.18215)


@pytest.mark.slow
def test_sd15_shapes_single_file_to_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from mezzotint.config import ModelConfig
    from mezzotint.sd import load_sd, original_state_dict, save_diffusers
    from mezzotint.sd.keys import text_config
    from mezzotint.sd.tokenizer import clip_tokenizer
    from mezzotint.text import TextEncoder
    from mezzotint.unet import UNet
    from mezzotint.vae import AutoencoderKL

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    text = TextEncoder(text_config(), clip_tokenizer(), clip)
    cfg = ModelConfig(unet=SD15_UNET, vae=SD15_VAE, text=text_config())
    file = tmp_path / "sd15.safetensors"
    tensors = {k: v.half() for k, v in original_state_dict(UNet(SD15_UNET), AutoencoderKL(SD15_VAE), text, cfg).items()}
    assert sum(v.numel() for v in tensors.values()) > 1.0e9
    save_file(tensors, file)
    del tensors, clip, text
    gc.collect()

    unet, vae, text, cfg = load_sd(file)
    assert cfg.unet == SD15_UNET and cfg.vae == SD15_VAE
    assert cfg.scheduler.prediction_type == "eps" and cfg.defaults.width == 512
    c = text.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.hidden_act) == (768, 12, 12, "quick_gelu")
    save_diffusers(tmp_path / "diffusers", unet, vae, text, cfg)
    del vae, text
    gc.collect()
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "diffusers" / "unet").eval()
    assert ref.config.attention_head_dim == 8 and list(ref.config.block_out_channels) == [320, 640, 1280, 1280]
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        err = (unet(x, t, ctx) - ref(x, t, encoder_hidden_states=ctx).sample).abs().max().item()
    assert err < 1e-3, err

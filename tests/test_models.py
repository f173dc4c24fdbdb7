"""UNet and autoencoder: shapes, and equality with diffusers on the same weights."""
import pytest
import torch

from mezzotint.config import PRESETS, UNetConfig, VAEConfig
from mezzotint.unet import UNet
from mezzotint.vae import AutoencoderKL


def _diffusers_unet(cfg: UNetConfig):
    from diffusers import UNet2DConditionModel
    L = len(cfg.channel_mult)
    widths = [cfg.channels * m for m in cfg.channel_mult]
    heads = cfg.num_heads or None
    return UNet2DConditionModel(
        sample_size=16, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=widths, layers_per_block=cfg.num_res_blocks,
        down_block_types=["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(L)],
        up_block_types=["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(range(L))],
        cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.groups,
        attention_head_dim=heads if heads else [w // cfg.head_dim for w in widths],
        use_linear_projection=cfg.linear_proj, flip_sin_to_cos=True, freq_shift=0,
        transformer_layers_per_block=cfg.transformer_depth,
    )


@pytest.mark.parametrize("cfg", [
    PRESETS["tiny"].unet,
    UNetConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
               num_heads=4, linear_proj=False, context_dim=24, groups=8),
])
def test_unet_matches_diffusers(cfg):
    torch.manual_seed(0)
    ours = UNet(cfg).eval()
    ref = _diffusers_unet(cfg).eval()
    # both start random; give diffusers our weights, by identical names
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, cfg.in_channels, 16, 16)
    t = torch.tensor([3.0, 711.5])
    ctx = torch.randn(2, 5, cfg.context_dim)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = ref(x, t, encoder_hidden_states=ctx).sample
    assert a.shape == x.shape
    assert (a - b).abs().max().item() < 1e-4


def test_unet_mask_ignores_padding():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].unet
    net = UNet(cfg).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([100.0])
    ctx = torch.randn(1, 3, cfg.context_dim)
    padded = torch.cat([ctx, torch.randn(1, 4, cfg.context_dim)], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4])
    with torch.no_grad():
        assert torch.allclose(net(x, t, ctx), net(x, t, padded, mask), atol=1e-5)
        assert not torch.allclose(net(x, t, ctx), net(x, t, padded), atol=1e-3)


def test_vae_matches_diffusers():
    from diffusers import AutoencoderKL as Ref
    torch.manual_seed(0)
    cfg = VAEConfig(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, groups=8, scaling_factor=0.5)
    ours = AutoencoderKL(cfg).eval()
    ref = Ref(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
              block_out_channels=[16, 32, 32], layers_per_block=1,
              down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ours.encode(img)
        assert z.shape == (1, 4, 8, 8)
        zr = ref.encode(img).latent_dist.mode() * 0.5
        assert (z - zr).abs().max() < 1e-5
        assert (ours.decode(z) - ref.decode(z / 0.5).sample).abs().max() < 1e-5


def test_vae_factor_8():
    cfg = VAEConfig(channels=8, channel_mult=(1, 1, 2, 2), groups=4)
    assert cfg.factor == 8
    vae = AutoencoderKL(cfg)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 48))
    assert z.shape == (1, 4, 8, 6)
    assert vae.decode(z).shape == (1, 3, 64, 48)

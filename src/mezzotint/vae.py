"""The KL autoencoder (Rombach et al. 2022, appendix G): images <-> latents.

The encoder predicts a diagonal Gaussian over z; the UNet works on
latent = (z - shift_factor) * scaling_factor, both fields of VAEConfig.
Module names match diffusers' AutoencoderKL (see nn.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .nn import (CHANNELS_LAST_MIN_PIXELS, Attention, Conv2d, Downsample, ResBlock, Upsample,
                 channels_last_wanted)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (B, 3, H, W) -> float in [-1, 1], the autoencoder's input range."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output, about [-1, 1] -> uint8 pixels, same layout."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


# float32 from SD's latent at 512x512, bfloat16 as everywhere
DECODE_CHANNELS_LAST_MIN_PIXELS = {**CHANNELS_LAST_MIN_PIXELS, torch.float32: 64 * 64}


def decode_channels_last(z: torch.Tensor) -> bool:
    """float32 decoding of large latents on the CPU runs channels-last too, as bfloat16 does from
    32x32: at full resolution F.conv2d in NCHW ran 108-125 GFLOP/s, channels-last 129-148
    (AVX2, 2 cores), and SD 1.5's decoder at 512x512 took 23.3-24.2 s against 26.8-26.9 s,
    5e-5 from the NCHW result at most. Smaller float32 latents keep NCHW (not measured there,
    and the default model's 16x16 ones are bound by per-op overhead)."""
    return channels_last_wanted(z, DECODE_CHANNELS_LAST_MIN_PIXELS)


class MidAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__(ch, 1, ch, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, groups, eps=1e-6), ResBlock(ch, ch, groups, eps=1e-6)])
        self.attentions = nn.ModuleList([MidAttention(ch, groups)]) if attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Block(nn.Module):
    def __init__(self, resnets, resample, name):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self._name = name if resample is not None else None
        if resample is not None:
            setattr(self, name, nn.ModuleList([resample]))

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return getattr(self, self._name)[0](x) if self._name else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        ch = widths[0]
        for i, w in enumerate(widths):
            resnets = []
            for _ in range(cfg.num_res_blocks):
                resnets.append(ResBlock(ch, w, cfg.groups, eps=1e-6))
                ch = w
            last = i == len(widths) - 1
            self.down_blocks.append(Block(resnets, None if last else Downsample(ch, asymmetric=True),
                                          "downsamplers"))
        self.mid_block = Mid(ch, cfg.groups, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch, eps=1e-6)
        self.conv_out = Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=not torch.is_grad_enabled()))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult][::-1]
        ch = widths[0]
        self.conv_in = Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid_block = Mid(ch, cfg.groups, cfg.mid_attention)
        self.up_blocks = nn.ModuleList()
        for i, w in enumerate(widths):
            resnets = []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(ResBlock(ch, w, cfg.groups, eps=1e-6))
                ch = w
            last = i == len(widths) - 1
            self.up_blocks.append(Block(resnets, None if last else Upsample(ch), "upsamplers"))
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch, eps=1e-6)
        self.conv_out = Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=not torch.is_grad_enabled()))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = Conv2d(c, c, 1)
        # runs once per image: a packed copy would save one weight reorder per call and
        # hold its weights in memory for good (the file's pages stream, see pages.py)
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.packable = False

    def encode_dist(self, x):
        """x in [-1, 1], (B, 3, H, W) -> (mean, logvar) of z, each (B, c, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, generator=None):
        """Image in [-1, 1] -> UNet latent. The mean of q(z|x) unless a generator asks for a sample."""
        mean, logvar = self.encode_dist(x)
        z = mean
        if generator is not None:
            from .diffusion.noise import randn
            z = mean + torch.exp(0.5 * logvar) * randn(mean.shape, generator, mean.device, mean.dtype)
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, latent):
        """UNet latent -> image in about [-1, 1]."""
        z = latent / self.cfg.scaling_factor + self.cfg.shift_factor
        cl = decode_channels_last(z)
        out = self.decoder(self.post_quant_conv(z.contiguous(memory_format=torch.channels_last) if cl else z))
        return out.contiguous() if cl else out

    def forward(self, x, noise=None):
        """Training pass: (reconstruction through a sample of q(z|x), mean, logvar)."""
        mean, logvar = self.encode_dist(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
        return self.decoder(self.post_quant_conv(z)), mean, logvar

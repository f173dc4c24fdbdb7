"""Layout guidance: where the prompt puts each object, read off the text alone, steering the
cross-attention of the noisy steps.

On 16x16 latents the noisy steps decide which object goes where, and the default model's
UNet decides it from the noise (README, "the default model"). A layout map, one cross-attention
from the cells' 2-D positions to the frozen text tokens, fitted to the Shapes world's object
masks with the grounding loss (train/grounding.py), learns in a minute what the UNet did not in
hours: "a red circle to the left of a blue square" sends "red" and "circle" to the left.

At sampling, from the steps at timestep >= `start` on up (the noisy ones), every
cross-attention logit of cell n for token l gets `strength * g_l * clamp(log(N p_l(n)), +-3)`:
p_l is token l's share of the map over the N cells (pooled to each level's size), g_l the
map's estimate that l names an object (other words, and the empty prompt, get ~0). This is
Dense Diffusion's attention modulation (Kim et al. 2023) with a layout predicted from the text
in place of one drawn by a user, as LLM-grounded diffusion (Lian et al. 2023) plans one.

Guidance steers attention, not the noise, so the pipeline also chooses the initial noise by the
map (`choose_noise` below, with `separation` and `agreement`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CLIP = 3.0  # the bias's bound, in logits: a map near zero must not shut a word out entirely


def grid_features(H: int, W: int, n: int, device, dtype) -> torch.Tensor:
    """(H*W, 4n) sin and cos of pi*k*u for k = 1..n, u the cell centre's place in [0, 1] along
    each axis: any image size sees the same left and right; k = 1 is monotone."""
    k = torch.arange(1, n + 1, device=device, dtype=torch.float32) * torch.pi
    ys = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / H
    xs = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / W
    fy, fx = ys[:, None] * k, xs[:, None] * k  # (H, n), (W, n)
    fy = torch.cat([fy.sin(), fy.cos()], 1)[:, None].expand(H, W, 2 * n)
    fx = torch.cat([fx.sin(), fx.cos()], 1)[None].expand(H, W, 2 * n)
    return torch.cat([fx, fy], 2).reshape(H * W, 4 * n).to(dtype)


class LayoutMap(nn.Module):
    """Cells attend to tokens with queries made of their positions alone. Each head is fitted
    on its own (the loss is per head) and their maps are averaged: an ensemble, since single
    fits differ in which captions they get right."""

    def __init__(self, context_dim: int, n: int = 4, heads: int = 1, dim: int = 32):
        super().__init__()
        self.n, self.heads = n, heads
        self.pos_in = nn.Linear(4 * n, heads * dim)
        self.to_q = nn.Linear(heads * dim, heads * dim, bias=False)
        self.to_k = nn.Linear(context_dim, heads * dim, bias=False)
        self.gate = nn.Linear(context_dim, 1)  # does token l name an object?

    def attention(self, context: torch.Tensor, mask: torch.Tensor | None, H: int, W: int) -> torch.Tensor:
        """(B, heads, H*W, L): each cell's softmax over the tokens (padding masked). Tokens
        compete for cells, which is what lets two objects' words take the two sides."""
        q = self.to_q(self.pos_in(grid_features(H, W, self.n, context.device, context.dtype)))
        q = q.unflatten(-1, (self.heads, -1))  # (N, heads, d)
        k = self.to_k(context).unflatten(-1, (self.heads, -1))  # (B, L, heads, d)
        logits = torch.einsum("nhd,blhd->bhnl", q, k) * q.shape[-1] ** -0.5
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        return logits.softmax(-1)

    def shares(self, context, mask, H: int, W: int) -> torch.Tensor:
        """(B, L, H, W): each token's share of the map over the cells (sums to 1 per token),
        the mean over the heads."""
        w = self.attention(context, mask, H, W).transpose(2, 3)  # (B, heads, L, N)
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
        return w.mean(1).unflatten(2, (H, W))

    def gates(self, context) -> torch.Tensor:
        """(B, L): the map's estimate that token l names an object."""
        return torch.sigmoid(self.gate(context)[..., 0])

    def biases(self, context, mask, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per size (h, w), the (B, 1, h*w, L) attention bias at strength 1 (no padding bias):
        the finest size's shares pooled to each size."""
        H, W = sizes[0]
        p = self.shares(context, mask, H, W)
        g = self.gates(context)
        out = []
        for h, w in sizes:
            q = p if (h, w) == (H, W) else F.adaptive_avg_pool2d(p, (h, w))
            q = q.flatten(2)
            q = q / q.sum(-1, keepdim=True).clamp(min=1e-12)
            b = torch.log(q * q.shape[-1] + 1e-6).clamp(-CLIP, CLIP) * g[..., None]  # (B, L, hw)
            if mask is not None:
                b = b.masked_fill(~mask[..., None], 0.0)
            out.append(b.transpose(1, 2)[:, None].contiguous())
        return out


APART = 0.9  # the separation from which a prompt's objects have places of their own


def separation(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B,) how far apart the map puts the prompt's object words: the gated mean L1 distance of
    each word's share (p: (B, L, N)) from the words' gated mean (g: (B, L)). About 1 for two
    objects on two sides, about 0.5 for one object (its words' maps differ a little), 0 if
    every word has the same map."""
    mean = (g[..., None] * p).sum(1, keepdim=True) / g.sum(1).clamp(min=1e-12)[:, None, None]
    return (g * (p - mean).abs().sum(-1)).sum(1) / g.sum(1).clamp(min=1e-12)


def agreement(a: torch.Tensor, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, K) how well K attention maps per prompt, a: (B, K, L, N) (each word's attention over
    the cells, summed over layers and heads), agree with the map's shares p: (B, L, N): each
    word's expected share under its attention, N times (1 = no agreement beyond chance),
    summed over the words weighted by g."""
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-12)
    return ((a * p[:, None]).sum(-1) * p.shape[-1] * g[:, None]).sum(-1)


def choose_noise(denoiser, x: torch.Tensor, sigma, cond: dict, gens: list, k: int) -> torch.Tensor:
    """Of k initial noises per image (x's row, then k - 1 more from the image's generator), the
    one where the UNet's own cross-attention at the first step (sigma), without layout
    guidance, best agrees with the map.

    On 16x16 latents the first steps put the objects where the noise favours them, and layout
    guidance steers attention, not the noise: with a noise that wants the square on the left it
    recolours the objects instead of moving them (their shapes come out swapped). Choosing the
    noise is Initial Noise Optimization's idea (Guo et al. 2024) by selection instead of
    gradients. Only for prompts whose objects the map puts apart (separation): for one object,
    or several of one kind, agreeing with the map's single blob favours noises that crowd them
    together. Image by image, so an image does not depend on its batch."""
    from .diffusion import randn
    from .explain import record_cross_attention
    unet = denoiser.model
    lm, (h, w) = unet.layout_map, x.shape[-2:]
    dt = next(lm.parameters()).dtype
    scale = math.sqrt(1.0 + float(sigma) ** 2)  # as the pipeline's initial latent
    saved, unet.layout_guidance = unet.layout_guidance, (0.0, 0.0)
    out = []
    try:
        with torch.inference_mode():
            for b in range(x.shape[0]):
                ctx, mask = cond["context"][b:b + 1], cond["context_mask"][b:b + 1]
                p = lm.shares(ctx.to(dt), mask, h, w).flatten(2).float()  # (1, L, N)
                g = lm.gates(ctx.to(dt)).float() * mask
                if float(separation(p, g)) < APART:
                    out.append(x[b])
                    continue
                cands = torch.cat([x[b:b + 1], randn((k - 1, *x.shape[1:]), gens[b], x.device) * scale])
                with record_cross_attention(unet, k, (h, w), (h, w)) as total:
                    denoiser(cands, sigma, context=ctx.expand(k, -1, -1), context_mask=mask.expand(k, -1))
                out.append(cands[int(agreement(total[0].flatten(2)[None].to(p.device), p, g).argmax())])
    finally:
        unet.layout_guidance = saved
    return torch.stack(out)

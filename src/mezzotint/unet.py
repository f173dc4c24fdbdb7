"""The cross-attention UNet (Rombach et al. 2022, "latent diffusion"), architecture only.

Levels go down by stride-2 convs and up by nearest upsampling, with skip connections
between them; at the levels named in the config every ResBlock is followed by a
transformer that attends to itself and, through cross-attention, to the text.
Module names match diffusers' UNet2DConditionModel (see nn.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import graphs
from . import nn as nn_
from .config import UNetConfig
from .layout import LayoutMap, grid_features
from .nn import (Attention, Conv2d, Downsample, Linear, ResBlock, TimestepMLP, Upsample, attention_bias, kept,
                 timestep_embedding)


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, mask=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class ContextBlock(nn.Module):
    """Pre-norm self-attention and feed-forward over the text tokens: a trainable refiner
    between the frozen text encoder and the cross-attention (as Lumina-Image 2's context
    refiner). A frozen sentence encoder spreads every word's facts over all tokens; these
    blocks can gather each object's colour, shape and place back onto its own tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=2)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.ff(self.norm2(x))


class LayoutPrior(nn.Module):
    """Where the prompt puts things, before any pixel is seen: a cross-attention whose queries
    are the cells' 2-D positions alone, added to the first feature map. At pure noise the
    UNet's own queries are noise; these are not, so "a red circle to the left of a blue
    square" can send the circle's words to the left from the first step (a bilinear map of
    position and frozen MiniLM tokens learns that in minutes; the UNet's queries did not)."""

    def __init__(self, ch: int, heads: int, context_dim: int, n: int):
        super().__init__()
        self.n = n
        self.pos_in = Linear(4 * n, ch)
        self.attn2 = Attention(ch, heads, ch // heads, context_dim=context_dim)
        self.probe = None  # training (--layout-target): called with what the prior adds, (B, ch, H, W)

    def forward(self, h, context, mask=None):
        B, _, H, W = h.shape
        q = self.pos_in(grid_features(H, W, self.n, h.device, h.dtype)).expand(B, -1, -1)
        delta = self.attn2(q, context, mask).unflatten(1, (H, W)).permute(0, 3, 1, 2)
        if self.probe is not None:
            self.probe(delta)
        return h + delta


class SpatialTransformer(nn.Module):
    """Flattens a feature map to tokens, runs transformer blocks, and adds it back."""

    def __init__(self, ch: int, heads: int, head_dim: int, context_dim: int, depth: int,
                 groups: int, linear: bool, positions: int = 0):
        super().__init__()
        inner = heads * head_dim
        self.linear = linear
        self.positions = positions
        if positions:
            self.pos_proj = Linear(4 * positions, inner)
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = Linear(ch, inner) if linear else Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth))
        self.proj_out = Linear(inner, ch) if linear else Conv2d(inner, ch, 1)

    def forward(self, x, context, mask=None):
        H, W = x.shape[2:]
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).flatten(1, 2)  # (B, HW, inner)
        if self.linear:
            h = self.proj_in(h)
        if self.positions:
            h = h + self.pos_proj(grid_features(H, W, self.positions, h.device, h.dtype))
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        if self.linear:
            h = self.proj_out(h)
        h = h.unflatten(1, (H, W)).permute(0, 3, 1, 2)  # (B, inner, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Level(nn.Module):
    """One resolution level: ResBlocks, each optionally followed by a transformer."""

    def __init__(self, resnets: list[ResBlock], attentions: list[nn.Module] | None,
                 resample: nn.Module | None, name: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        if resample is not None:
            setattr(self, name, nn.ModuleList([resample]))
        self._resample = name if resample is not None else None

    def resample(self, x):
        return getattr(self, self._resample)[0](x) if self._resample else x

    def block(self, j, x, emb, context, mask):
        x = self.resnets[j](x, emb)
        if self.attentions is not None:
            x = self.attentions[j](x, context, mask)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch0 = cfg.channels
        widths = [ch0 * m for m in cfg.channel_mult]
        temb = ch0 * 4
        L = len(widths)

        def transformer(ch):
            heads = cfg.num_heads or ch // cfg.head_dim
            return SpatialTransformer(ch, heads, ch // heads, cfg.context_dim, cfg.transformer_depth,
                                      cfg.groups, cfg.linear_proj, cfg.positions)

        def res(cin, cout):
            return ResBlock(cin, cout, cfg.groups, temb=temb, dropout=cfg.dropout)

        self.conv_in = Conv2d(cfg.in_channels, ch0, 3, padding=1)
        self.time_embedding = TimestepMLP(ch0, temb)

        skips = [ch0]  # channels of every tensor the down path hands to the up path
        self.down_blocks = nn.ModuleList()
        ch = ch0
        for i, w in enumerate(widths):
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks):
                resnets.append(res(ch, w))
                attns.append(transformer(w))
                ch = w
                skips.append(ch)
            last = i == L - 1
            self.down_blocks.append(Level(resnets, attns if i in cfg.attention_levels else None,
                                          None if last else Downsample(ch), "downsamplers"))
            if not last:
                skips.append(ch)

        self.mid_block = Level([res(ch, ch), res(ch, ch)], [transformer(ch)], None, "")

        self.up_blocks = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(res(ch + skips.pop(), w))
                attns.append(transformer(w))
                ch = w
            self.up_blocks.append(Level(resnets, attns if i in cfg.attention_levels else None,
                                        Upsample(ch) if i > 0 else None, "upsamplers"))

        if cfg.input_gate:  # see _run; zero-started
            self.input_gate = Linear(temb, ch0)
        if cfg.layout:
            self.layout = LayoutPrior(ch0, max(1, ch0 // cfg.head_dim), cfg.context_dim, cfg.layout)
        if cfg.layout_map:  # layout guidance (layout.py), at inference only
            # fitted apart (fit-layout), never by UNet training: frozen, so DDP does not wait for its gradients
            self.layout_map = LayoutMap(cfg.context_dim, cfg.layout_map, cfg.layout_heads).requires_grad_(False)
        self.layout_guidance = (0.0, 0.0)  # (strength, lowest timestep it applies at); the pipeline sets it
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = Conv2d(ch, cfg.out_channels, 3, padding=1)
        if cfg.context_layers:
            heads = max(1, cfg.context_dim // 64)
            self.context_blocks = nn.ModuleList(ContextBlock(cfg.context_dim, heads) for _ in range(cfg.context_layers))
        if sum(p.numel() for p in self.parameters()) <= graphs.MAX_PARAMS:
            for m in self.modules():  # rows that round alike in any batch (graphs.row_invariant)
                if isinstance(m, Conv2d):
                    m.pack_all = True

    def refine_context(self, context, mask=None):
        """The text tokens the cross-attention sees: the encoder's, through the refiner if any.
        In inference row by row: the same prompt gives the same tokens in any batch (small-M
        matmuls), and a sampler's steps, which pass the same tokens, refine them once (kept as
        the cross-attention's keys and values are). In training batched, as the per-row loop
        costs a third of a step."""
        if not self.cfg.context_layers:
            return context
        if self.training:
            return self._refine(context, mask)

        def rows():
            return torch.cat([self._refine(context[i:i + 1], None if mask is None else mask[i:i + 1])
                              for i in range(context.shape[0])])
        return kept(self, "_refined", self.context_blocks.parameters(), (context, mask), rows)

    def _refine(self, context, mask):
        for block in self.context_blocks:
            context = block(context, mask)
        return context

    def __getstate__(self):  # copies (deepcopy, pickle) leave the caches and traces behind
        return {k: v for k, v in graphs.state(self.__dict__).items()
                if k not in ("_refined", "_cross", "_kv_in", "_layout")}

    def _level_masks(self, x, t, context, context_mask) -> list[torch.Tensor]:
        """A model with a layout map: the per-level attention biases of layout guidance (padding
        included; the padding bias alone when it is off), passed to _forward after the keys and
        values. The map's part is made once per prompt, row by row (kept, as the keys and values
        are); below the starting timestep it is zeros of the same shapes, so one trace serves all
        steps. Other models: []."""
        if not self.cfg.layout_map:
            return []
        mask = context_mask if context_mask is not None else torch.ones(context.shape[:2], dtype=torch.bool,
                                                                           device=context.device)
        pad = attention_bias(mask, x.dtype)
        strength, start = self.layout_guidance
        if not strength or self.training:
            return [pad] * len(self.down_blocks)
        sizes = [tuple(x.shape[2:])]
        for _ in range(len(self.down_blocks) - 1):
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))  # a stride-2 conv with padding 1

        def rows():
            per = [self.layout_map.biases(context[i:i + 1].to(x.dtype), mask[i:i + 1], sizes)
                   for i in range(context.shape[0])]
            return [torch.cat(level) for level in zip(*per)]
        biases = kept(self, "_layout", self.layout_map.parameters(), (context, mask, torch.tensor(sizes)), rows)
        scale = strength if float(t.max()) >= start else 0.0
        return [pad + scale * b for b in biases]

    def forward(self, x, t, context, context_mask=None):
        """x: (B, C, h, w) latent; t: (B,) timesteps (float allowed); context: (B, L, D)."""
        t = t.reshape(-1)
        if t.shape[0] > 1 and bool((t == t[0]).all()):
            # one embedding broadcast over the batch: also keeps row k of a batch bit-identical
            # to a batch of one, since small-M matmuls take other kernels as M changes
            t = t[:1]
        masks = self._level_masks(x, t, context, context_mask)
        traced = graphs.usable(self, x)
        if traced or graphs.split_eager(self, x):
            # the text's keys and values, kept between steps, made here and passed in: in a
            # trace they would be computed again at every call, and on a thread of its own a
            # half would round them otherwise (small-M matmuls split by thread count)
            ctx = self.refine_context(context.to(x.dtype), context_mask)
            cross = self._cross_attentions()
            weights = [p for a in cross for p in (a.to_k.weight, a.to_k.bias, a.to_v.weight, a.to_v.bias)]
            kv = kept(self, "_kv_in", weights, (ctx,), lambda: [kv for a in cross for kv in a._context_kv(ctx)])
            if traced:
                return graphs.run(self, "_forward", x, t, context, context_mask, *kv, *masks)
            return graphs.in_halves(lambda *part: lambda: self._forward(*part), x, t, context, context_mask,
                                    *kv, *masks)
        return self._forward(x, t, context, context_mask, *masks)

    def _cross_attentions(self) -> list:
        found = self.__dict__.get("_cross")
        if found is None or found[0] != graphs.epoch():  # submodules registered since: looked up again
            found = self.__dict__["_cross"] = (graphs.epoch(), [m.attn2 for m in self.modules()
                                                                if isinstance(m, (TransformerBlock, LayoutPrior))])
        return found[1]

    def _forward(self, x, t, context, context_mask, *given):
        # given: the cross-attentions' keys and values (two per layer) or none, then the
        # per-level masks of layout guidance or none
        n_masks = len(self.down_blocks) if self.cfg.layout_map else 0
        kv, masks = given[:len(given) - n_masks], given[len(given) - n_masks:]
        if not kv:
            return self._run(x, t, self.refine_context(context.to(x.dtype), context_mask), context_mask, masks)
        nn_.GIVEN_KV.kv = dict(zip(self._cross_attentions(), zip(kv[::2], kv[1::2])))
        try:  # the cross-attentions take these; `context` goes unused
            return self._run(x, t, context, context_mask, masks)
        finally:
            nn_.GIVEN_KV.kv = None

    def _run(self, x, t, context, context_mask, masks=()):
        emb = self.time_embedding(timestep_embedding(t, self.cfg.channels).to(x.dtype))
        if context_mask is not None:
            context_mask = attention_bias(context_mask, x.dtype)
        cl = nn_.channels_last_wanted(x)
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last) if cl else x)
        if self.cfg.input_gate:
            # the ResBlocks take the timestep as a bias, so nothing else can scale the noise's
            # features down; at a zero-terminal-SNR schedule's last step they carry nothing
            h = h * (1 + self.input_gate(F.silu(emb)))[..., None, None]
        if self.cfg.layout:
            h = self.layout(h, context, context_mask)
        masks = list(masks) or [context_mask] * len(self.down_blocks)  # per level, finest first
        skips = [h]
        for i, level in enumerate(self.down_blocks):
            for j in range(len(level.resnets)):
                h = level.block(j, h, emb, context, masks[i])
                skips.append(h)
            if level._resample:
                h = level.resample(h)
                skips.append(h)
        h = self.mid_block.resnets[0](h, emb)
        h = self.mid_block.attentions[0](h, context, masks[-1])
        h = self.mid_block.resnets[1](h, emb)
        for k, level in enumerate(self.up_blocks):
            for j in range(len(level.resnets)):
                h = level.block(j, torch.cat([h, skips.pop()], dim=1), emb, context, masks[-1 - k])
            h = level.resample(h)
        out = self.conv_out(F.silu(self.conv_norm_out(h), inplace=not torch.is_grad_enabled()))
        return out.contiguous() if cl else out

"""Grounded cross-attention: a training loss that sends each word's attention to its object.

A UNet that has learnt which colours and shapes a caption names can still give each object
the other's colour: cross-attention lets every pixel read every word, and nothing ties
"red" to the pixels of the circle. The Shapes world knows where each object is, so the
words that name an object (its colour, shape, size) can be told where to look: the token
loss of TokenCompose (Wang et al. 2024), which pushes the share of a word's attention that
falls inside its object's mask towards 1. It applies to the layers at 8x8 and finer (a 4x4
map cannot tell two objects apart) and to captions that were not dropped.
"""
from __future__ import annotations

import contextlib
import re

import numpy as np
import torch

from ..data.phrasing import attribute_of
from ..data.shapes import ShapesDataset, coverage

MIN_TOKENS = 64  # layers with fewer pixels (4x4) are left alone


def word_objects(word: str, scene) -> list[int]:
    """Indices of the scene's objects that `word` (a colour, shape or size word) describes."""
    got = attribute_of(word)
    if got is None:
        return []
    kind, value = got
    return [k for k, o in enumerate(scene.objects) if getattr(o, kind) == value]


def whole_word(caption: str, start: int, end: int) -> str:
    """The token at caption[start:end] widened to its whole word (letters only), lower case."""
    while start > 0 and caption[start - 1].isalpha():
        start -= 1
    while end < len(caption) and caption[end].isalpha():
        end += 1
    return caption[start:end].lower()


def token_targets(caption: str, scene, tokenizer, res: int) -> tuple[list[int], list[np.ndarray]]:
    """(token rows, masks): for each token of a word that names objects, its row in the
    encoder's output (after the start token) and the union of those objects' coverage at
    res x res. Tokens of other words ("a", "and", "left") get no target."""
    enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    masks = {}
    rows, out = [], []
    for pos, (start, end) in enumerate(enc["offset_mapping"]):
        if end <= start:
            continue
        objs = word_objects(whole_word(caption, start, end), scene)
        if not objs:
            continue
        m = np.zeros((res, res), np.float32)
        for k in objs:
            if k not in masks:
                masks[k] = np.zeros((res, res), np.float32)
                y0, x0, cov = coverage(scene.objects[k], res)
                masks[k][y0:y0 + cov.shape[0], x0:x0 + cov.shape[1]] = cov
            m = np.maximum(m, masks[k])
        rows.append(1 + pos)
        out.append(m)
    return rows, out


class Grounding:
    """Builds per-batch targets from the Shapes world and scores recorded attention."""

    def __init__(self, dataset, tokenizer, res: int, attention_levels=()):
        if not any((res >> lv) ** 2 >= MIN_TOKENS for lv in attention_levels):
            raise ValueError(f"--attention-loss needs cross-attention at 8x8 or finer; at {res}x{res} latents "
                             f"the UNet's transformers (levels {list(attention_levels)}) are all coarser")
        if not isinstance(dataset, ShapesDataset):
            raise ValueError("--attention-loss needs --data shapes (it needs to know where each object is)")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("--attention-loss needs a fast tokenizer (for token offsets)")
        self.dataset, self.tokenizer, self.res = dataset, tokenizer, res

    def targets(self, items: list[int], dropped: list[bool], lengths: list[int]) -> torch.Tensor:
        """(B, L, res, res) masks, L = max(lengths); all zero where a token has no target."""
        t = torch.zeros(len(items), max(lengths), self.res, self.res)
        for b, (i, d, n) in enumerate(zip(items, dropped, lengths)):
            if d:
                continue
            scene, _, caption = self.dataset.example(i)
            rows, masks = token_targets(caption, scene, self.tokenizer, self.res)
            if rows and max(rows) >= n - 1:  # a caption cut or chunked: leave it out
                continue
            for r, m in zip(rows, masks):
                t[b, r] = torch.from_numpy(m)
        return t


def attention_loss(maps: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean over layers, heads and targeted tokens of (1 - share of attention inside the mask)^2.
    maps: (B, heads, N, L) softmax weights; target: (B, L, R, R) with R^2 >= N."""
    width = max(w.shape[3] for w in maps) if maps else 0
    if target.shape[1] < width:  # a context padded further (the contrast loss's longer captions)
        target = torch.nn.functional.pad(target, (0, 0, 0, 0, 0, width - target.shape[1]))
    has = target.flatten(2).amax(-1) > 0  # (B, L)
    if not has.any():
        return target.new_zeros(())
    total = 0.0
    for w in maps:
        B, _, N, L = w.shape
        r = round(N ** 0.5)
        m = torch.nn.functional.adaptive_avg_pool2d(target[:, :L], r).flatten(2)  # (B, L, N)
        w = w.float()
        inside = torch.einsum("bhnl,bln->bhl", w, m.to(w.device)) / w.sum(2).clamp(min=1e-8)
        total = total + ((1 - inside) ** 2 * has[:, None, :L].to(w.device)).sum() / (has.sum() * w.shape[1])
    return total / len(maps)


@contextlib.contextmanager
def recording(unet: torch.nn.Module):
    """Collect the cross-attention weights of the layers with >= MIN_TOKENS pixels (with their graph)."""
    maps: list[torch.Tensor] = []

    def probe(w):
        if w.shape[2] >= MIN_TOKENS:
            maps.append(w)

    attns = [m for name, m in unet.named_modules() if re.search(r"(^|\.)attn2$", name)]
    for m in attns:
        m.probe = probe
    try:
        yield maps
    finally:
        for m in attns:
            m.probe = None


def layout_target_loss(delta: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """MSE between the layout prior's first C output channels and the clean latent (C channels):
    the prior sees no pixel, so its best answer is the caption's mean latent, a rough image of
    where the prompt puts what. Copying it is then what the UNet's first step must do."""
    return torch.nn.functional.mse_loss(delta[:, :x0.shape[1]].float(), x0.float())


def fit_layout(unet, grounding: Grounding, contexts, size: int, steps: int, seed: int, batch: int = 128,
               lr: float = 3e-3, log=None, target: float = 0.0) -> tuple[float, float]:
    """Fit a layout prior's attention (its queries and keys) to the grounding targets alone,
    before the UNet trains: the layout depends on the text only, so this needs no image and
    no UNet pass, and it learns in minutes what a UNet batch, with a few relation captions
    in it, teaches over hours. contexts(items) -> (latents or None, context, mask) of those
    items; items are drawn from range(size). With target > 0 its values and output are fitted
    too, to the mean latent (layout_target_loss, that weight). log(step, grounding, target or
    None) every 50 steps. Returns the (total) loss before and after."""
    layout = unet.layout
    params = [*layout.pos_in.parameters(), *layout.attn2.to_q.parameters(), *layout.attn2.to_k.parameters()]
    if target:
        params += [*layout.attn2.to_v.parameters(), *layout.attn2.to_out.parameters()]
    opt = torch.optim.Adam(params, lr)
    g = torch.Generator().manual_seed(seed)
    maps: list[torch.Tensor] = []
    layout.attn2.probe = maps.append
    dev = layout.pos_in.weight.device
    blank = torch.zeros(batch, layout.pos_in.out_features, grounding.res, grounding.res, device=dev)
    first = last = 0.0
    try:
        for step in range(steps):
            items = torch.randint(0, size, (batch,), generator=g).tolist()
            x0, ctx, mask = contexts(items)
            target_maps = grounding.targets(items, [False] * batch, mask.sum(1).tolist())
            maps.clear()
            delta = layout(blank, ctx.to(dev), mask.to(dev))  # the input is zero: this is what it adds
            loss = ground = attention_loss(maps, target_maps)
            mean = None
            if target:
                mean = layout_target_loss(delta, x0.to(dev))
                loss = loss + target * mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss.item()
            if step == 0:
                first = last
            if log is not None and (step % 50 == 0 or step == steps - 1):
                log(step, ground.item(), None if mean is None else mean.item())
    finally:
        layout.attn2.probe = None
    return first, last

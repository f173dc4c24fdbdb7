"""Fitting a layout map (layout.py) to the Shapes world, and adding it to a model folder.

The map reads the text alone, so it needs no image and no UNet pass: the targets are each
object word's mask (train/grounding.py's token_targets) and the loss is the grounding loss on
the map's attention, plus a binary cross-entropy for its gate (does this token name an object).
Captions without a relation ("a blue circle and a red diamond") leave the sides open; their
masks are mirrored so that the first object named is on the left, as it is read. The mirrored
image is as true of the caption as the original, and the map gets one layout to learn instead of
an even mix of two that would average to no side at all.
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shapes import ShapesDataset
from .grounding import attention_loss, token_targets, whole_word, word_objects


def first_named(caption: str, scene, tokenizer) -> int | None:
    """Index of the scene object that the caption's first object-naming word names alone."""
    enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    for start, end in enc["offset_mapping"]:
        objs = word_objects(whole_word(caption, start, end), scene)
        if len(objs) == 1:
            return objs[0]
    return None


def examples(text, res: int, items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context (n, L, D), mask (n, L), targets (n, L, res, res) float16) of Shapes items 0..n-1."""
    data = ShapesDataset(64, seed, "train")
    captions, targets = [], []
    for i in range(items):
        scene, facts, caption = data.example(i)
        rows, masks = token_targets(caption, scene, text.tokenizer, res)
        if facts.kind == "two":
            k = first_named(caption, scene, text.tokenizer)
            if k is not None and scene.objects[k].x > scene.objects[1 - k].x:
                masks = [np.ascontiguousarray(m[:, ::-1]) for m in masks]
        captions.append(caption)
        targets.append((rows, masks))
    ctxs, masks = [], []
    for k in range(0, items, 256):
        c, m = text.encode_batch(captions[k:k + 256])
        ctxs.append(c.float().cpu())
        masks.append(m.cpu())
    L = max(c.shape[1] for c in ctxs)
    ctx = torch.cat([F.pad(c, (0, 0, 0, L - c.shape[1])) for c in ctxs])
    mask = torch.cat([F.pad(m, (0, L - m.shape[1])) for m in masks])
    T = torch.zeros(items, L, res, res, dtype=torch.float16)
    for i, (rows, ms) in enumerate(targets):
        for r, m in zip(rows, ms):
            if r < L:
                T[i, r] = torch.from_numpy(m)
    return ctx, mask, T


def fit(layout_map, data, steps: int = 2500, batch: int = 128, lr: float = 3e-3, seed: int = 0,
        log=None) -> tuple[float, float]:
    """Adam on the grounding loss of the map's attention and its gate's cross-entropy. Returns
    the grounding loss of the first and the last step."""
    ctx, mask, T = data
    res = T.shape[-1]
    opt = torch.optim.Adam(layout_map.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    first = last = 0.0
    for step in range(steps):
        idx = torch.randint(0, ctx.shape[0], (batch,), generator=g)
        c, m, t = ctx[idx], mask[idx], T[idx].float()
        w = layout_map.attention(c, m, res, res)  # (B, heads, N, L)
        ground = attention_loss([w], t)  # per head
        has = t.flatten(2).amax(-1) > 0
        gate = F.binary_cross_entropy_with_logits(layout_map.gate(c)[..., 0][m], has[m].float())
        opt.zero_grad(set_to_none=True)
        (ground + gate).backward()
        opt.step()
        last = ground.item()
        if step == 0:
            first = last
        if log is not None and (step % 250 == 0 or step == steps - 1):
            log(step, last, gate.item())
    return first, last


@torch.no_grad()
def side_agreement(layout_map, data) -> float:
    """Share of pairs of object words in one caption whose masks' centres lie apart (by more
    than 0.15 of the side along some axis) that the map puts in the same order along that axis."""
    ctx, mask, T = data
    res = T.shape[-1]
    p = layout_map.shares(ctx, mask, res, res)
    t = T.float()
    u = (torch.arange(res) + 0.5) / res

    def centres(M):
        s = M.sum((-1, -2)).clamp(min=1e-8)
        return torch.stack([(M.sum(-2) * u).sum(-1) / s, (M.sum(-1) * u).sum(-1) / s], -1)  # (n, L, 2)
    pc, tc = centres(p), centres(t)
    has = t.flatten(2).amax(-1) > 0
    agree = total = 0
    for b in range(ctx.shape[0]):
        idx = has[b].nonzero()[:, 0].tolist()
        for x, i in enumerate(idx):
            for j in idx[x + 1:]:
                d = tc[b, i] - tc[b, j]
                ax = int(d.abs().argmax())
                if abs(float(d[ax])) < 0.15:
                    continue
                total += 1
                agree += bool((pc[b, i, ax] - pc[b, j, ax]) * d[ax] > 0)
    return agree / max(total, 1)


def add_layout_map(model: str, output: str, steps: int = 2500, items: int = 20000, seed: int = 0,
                   strength: float = 3.0, start: float = 400.0, n: int = 8, heads: int = 4,
                   candidates: int = 8) -> tuple:
    """Fit a layout map for the model's text encoder and latent size, and write the model with it
    (and layout guidance on by default at `strength`, with `candidates` initial noises) to
    `output`. Returns (path, held-out side agreement)."""
    from pathlib import Path

    from ..checkpoints import load_model, save_model
    from ..layout import LayoutMap
    from ..text import load_text_encoder
    unet, vae, cfg = load_model(model)
    if cfg.text.kind != "bert":
        raise ValueError("fit-layout fits a map to a BERT-family text encoder's tokens (it needs token offsets)")
    base = Path(model) if Path(model).is_dir() else Path(model).parent
    text = load_text_encoder(cfg.text, base)
    if not getattr(text.tokenizer, "is_fast", False):
        raise ValueError("fit-layout needs a fast tokenizer (for token offsets)")
    res = 64 // vae.cfg.factor
    torch.manual_seed(seed)
    layout_map = LayoutMap(cfg.unet.context_dim, n, heads)
    print(f"fit-layout: encoding {items} Shapes captions", file=sys.stderr)
    fit(layout_map, examples(text, res, items, seed), steps, seed=seed,
        log=lambda s, ground, gate: print(f"fit-layout: step {s}, grounding loss {ground:.4f}, gate {gate:.4f}",
                                          file=sys.stderr))
    agreement = side_agreement(layout_map, examples(text, res, 2000, seed + 7))
    new = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, layout_map=n, layout_heads=heads),
                              defaults=dataclasses.replace(cfg.defaults, layout_guidance=strength,
                                                           layout_start=start, layout_candidates=candidates))
    from ..unet import UNet
    grown = UNet(new.unet)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("layout_map.") for k in missing), (missing, unexpected)
    grown.layout_map.load_state_dict(layout_map.state_dict())
    out = save_model(output, grown, vae, new)
    src = Path(cfg.text.path)
    if not cfg.text.path.startswith("builtin:") and not src.is_absolute() and (base / src).resolve() != (out / src).resolve():
        import shutil  # a text encoder bundled in the model folder goes with the copy
        shutil.copytree(base / src, out / src, dirs_exist_ok=True)
    return out, agreement

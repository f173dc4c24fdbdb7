"""Caption contrast: a training loss that makes the denoiser tell a caption from its swap.

Measured on the shipped model, the denoiser's error with a position caption was no lower than
with the relation inverted (675 of 1,395 cases): the diffusion loss alone barely rewards
reading "left" or which colour goes with which shape, since most of each item's error is
elsewhere. This term asks for it directly: for a two-object caption c and a false caption c'
made from it by one swap (the relation inverted, or the two objects' colours exchanged), the
same noisy latent is denoised under both, and with x0 errors e and e' the loss is
softplus(beta * (e - e')) = -log sigmoid(beta * (e' - e)), the probability that the denoiser,
read as a classifier (Li et al. 2023, "Your diffusion model is secretly a zero-shot
classifier"), picks the true caption. A swapped caption is a true caption of other items, so
the model cannot win by spoiling its predictions for it.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.phrasing import INVERSE, parse_caption
from ..data.shapes import Facts, Named
from .pool import _my_items, offsets_of, pool_size, sharded

_REL_WORDS = {"left": "right", "right": "left", "above": "below", "below": "above",
              "under": "above", "beneath": "above", "underneath": "above"}


def _swap_words(text: str, table: dict[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(table) + r")\b", lambda m: table[m.group(1)], text)


def _article(a: str, word: str) -> str:
    """'a'/'an' (keeping the case of a) for the word after it."""
    return a + ("n " if word[0] in "aeiou" else " ")


def negative_caption(caption: str, key: str) -> str | None:
    """A false caption one swap away from `caption` (a two-object or position caption of the
    Shapes world, any phrasing), or None where no swap changes the meaning. Which swap, where
    both apply, is drawn from `key`. Each result is parsed back and checked."""
    try:
        f = parse_caption(caption)
    except ValueError:
        return None
    if f.kind not in ("two", "position"):
        return None
    a, b = f.objects
    options = []
    if f.kind == "position":
        inverted = Facts("position", (a, b), INVERSE[f.relation], f.background)
        options.append((_swap_words(caption, _REL_WORDS), inverted))
    if a.colour != b.colour and a.shape != b.shape:
        swapped = (Named(b.colour, a.shape, a.size), Named(a.colour, b.shape, b.size))
        text = _swap_words(caption, {a.colour: b.colour, b.colour: a.colour})
        text = re.sub(r"\b([Aa])n? (?=(\w+))", lambda m: _article(m.group(1), m.group(2)), text)
        options.append((text, Facts(f.kind, swapped, f.relation, f.background)))
    if not options:
        return None
    text, want = random.Random(f"contrast/{key}").choice(options)
    try:
        return text if parse_caption(text) == want else None
    except ValueError:
        return None


class Negatives:
    """The swapped captions' embeddings for a pool's items (rows as in pool.Pool)."""

    def __init__(self, pool, tokens: torch.Tensor, offsets: torch.Tensor):
        self.pool, self.tokens, self.offsets = pool, tokens, offsets

    def get(self, indices) -> list[torch.Tensor | None]:
        out = []
        for g in indices:
            r = self.pool.row(g)
            a, b = int(self.offsets[r]), int(self.offsets[r + 1])
            out.append(self.tokens[a:b] if b > a else None)
        return out


@torch.inference_mode()
def _encode(captions: list[str | None], text, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok, lens = [], []
    for k in range(0, len(captions), batch):
        part = captions[k: k + batch]
        real = [c for c in part if c is not None]
        enc = iter(zip(*text.encode_batch(real))) if real else iter(())
        for c in part:
            if c is None:
                lens.append(0)
                continue
            e, m = next(enc)
            tok.append(e[m].float().cpu())
            lens.append(int(m.sum()))
    width = text.dim
    return (torch.cat(tok) if tok else torch.zeros(0, width)), torch.tensor(lens, dtype=torch.int64)


def build_negatives(folder: Path, pool, dataset, text, tc, d, progress: bool = True) -> Negatives:
    """Load (or encode and store, in shards beside the pool's) this rank's swapped captions."""
    size = pool_size(tc.pool, tc.batch, d.world)
    items = _my_items(size, tc.batch, d.world, d.rank)
    meta = {"size": size, "batch": tc.batch, "world": d.world, "rank": d.rank, "seed": tc.seed,
            "image_size": tc.size, "encoder": f"{text.cfg.path}@{text.cfg.layer}"}

    def encode(part):
        caps = [negative_caption(dataset.example(i)[2], f"{tc.seed}/{i}") for i in part]
        tokens, lengths = _encode(caps, text, tc.batch)
        return {"tokens": tokens, "lengths": lengths}
    shards = sharded(folder, "negatives-", "negatives", items, meta, encode,
                     "contrast: encoding swapped captions of items", progress and d.main)
    return Negatives(pool, torch.cat([x["tokens"] for x in shards]),
                     offsets_of(torch.cat([x["lengths"] for x in shards])))


def contrast_loss(err_true: torch.Tensor, err_false: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of -log sigmoid(beta * (e' - e)) over the pairs (x0 errors, one per item)."""
    return F.softplus(beta * (err_true - err_false)).mean()

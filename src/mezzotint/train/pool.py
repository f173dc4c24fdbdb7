"""Encode-once data for UNet training: a fixed pool of items whose latents and caption
embeddings are computed once, stored in the run folder, and then read many times.

Streaming spends over half of a UNet step on the frozen autoencoder and text encoder
(2-core CPU, 64x64, batch 64: 0.26 s VAE + 0.16 s text + 0.05 s rendering against 0.36 s
for the UNet's forward and backward). With a pool of P items, global item g reads pool item
g % P; its noise, timestep and caption dropout stay keyed by g, so every pass over the pool
sees other noise. The first pass equals streaming (tested).

Under torchrun, P is rounded up to a multiple of batch * world, so that rank r only ever
reads the pool items of its own batches and builds just those. The pool is written in shards
of SHARD items (atomic files); a killed build resumes at the first missing shard.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoints import atomic_write
from ..data.shapes import kind_weights
from ..vae import to_unit

SHARD = 8192
VERSION = 1


def pool_size(requested: int, batch: int, world: int) -> int:
    step = batch * world
    return -(-requested // step) * step


class Pool:
    def __init__(self, size: int, batch: int, world: int, latents: torch.Tensor, tokens: torch.Tensor,
                 offsets: torch.Tensor, empty: torch.Tensor):
        self.size, self.batch, self.world = size, batch, world
        self.latents, self.tokens, self.offsets, self.empty = latents, tokens, offsets, empty

    def row(self, g: int) -> int:
        """Global item index -> row in this rank's arrays."""
        p = g % self.size
        return (p // (self.batch * self.world)) * self.batch + p % self.batch

    def get(self, indices, dropped: list[bool], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, context, mask) of global items; dropped captions get the empty prompt's embedding."""
        rows = [self.row(g) for g in indices]
        x0 = self.latents[rows]
        ctx = [self.empty if d else self.tokens[self.offsets[r]: self.offsets[r + 1]] for r, d in zip(rows, dropped)]
        out, mask = pad(ctx)
        return x0.to(device), out.to(device), mask.to(device)


def pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(rows), L, D) context and (len(rows), L) mask from (n_i, D) token rows, L = max n_i."""
    L = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), L, rows[0].shape[1])
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    """Row r's tokens are tokens[offsets[r]: offsets[r + 1]]."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = lengths.cumsum(0)
    return out


def _my_items(size: int, batch: int, world: int, rank: int) -> list[int]:
    """The pool items rank `rank` reads, in row order."""
    span = batch * world
    return [b * span + rank * batch + j for b in range(size // span) for j in range(batch)]


@torch.inference_mode()
def _encode(items: list[int], dataset, vae, text, device, batch: int):
    lat, tok, lens = [], [], []
    for k in range(0, len(items), batch):
        got = [dataset[i] for i in items[k: k + batch]]
        x = torch.stack([im for im, _ in got]).to(device)
        lat.append(vae.encode(to_unit(x)).float().cpu())
        ctx, mask = text.encode_batch([c for _, c in got])
        for c, m in zip(ctx, mask):
            tok.append(c[m].float().cpu())
            lens.append(int(m.sum()))
    return torch.cat(lat), torch.cat(tok), torch.tensor(lens, dtype=torch.int64)


def _fingerprint(vae) -> str:
    """Which encoder made the latents (a pool from another autoencoder must not be reused)."""
    h = hashlib.sha256()
    for t in (vae.encoder.conv_in.weight, vae.quant_conv.weight):
        h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(repr((vae.cfg.scaling_factor, vae.cfg.shift_factor)).encode())
    return h.hexdigest()[:16]


def sharded(folder: Path, name: str, tag: str, items: list[int], meta: dict, encode, what: str,
            progress: bool) -> list[dict]:
    """This rank's shards `name`-rank{r}-NNNNN.safetensors of SHARD items each: loaded where
    present (their metadata under `tag` must equal this run's), else made by encode(items)
    (a dict of tensors) and written atomically, so a killed build resumes at the first missing one."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    n_shards = -(-len(items) // SHARD)
    for s in range(n_shards):
        f = folder / f"{name}rank{meta['rank']}-{s:05d}.safetensors"
        part = items[s * SHARD: (s + 1) * SHARD]
        shard_meta = dict(meta, shard=s, first=part[0], count=len(part))
        if f.is_file():
            with safe_open(str(f), "pt") as fh:
                if json.loads(fh.metadata().get(tag, "{}")) != shard_meta:
                    raise ValueError(f"{f} was built for another pool ({fh.metadata().get(tag)}); "
                                     f"this run wants {json.dumps(shard_meta)}: remove {folder} or use another --run-dir")
                out.append({k: fh.get_tensor(k) for k in fh.keys()})
            continue
        if progress:
            print(f"{what} {s * SHARD}..{s * SHARD + len(part) - 1} of {len(items)} (shard {s + 1}/{n_shards})",
                  file=sys.stderr, flush=True)
        got = encode(part)
        atomic_write(f, lambda p, got=got, m=shard_meta: save_file(got, str(p), metadata={tag: json.dumps(m)}))
        out.append(got)
    return out


def build(folder: Path, requested: int, dataset, vae, text, device, tc, d, progress: bool = True) -> Pool:
    """Load this rank's pool from `folder`, encoding (and storing) the shards not there yet."""
    size = pool_size(requested, tc.batch, d.world)
    items = _my_items(size, tc.batch, d.world, d.rank)
    meta = {"version": VERSION, "size": size, "batch": tc.batch, "world": d.world, "rank": d.rank,
            "data": tc.data, "image_size": tc.size, "seed": tc.seed, "vae": _fingerprint(vae)}
    if tc.kinds:  # only when set, so pools built before --kinds existed stay valid
        meta["kinds"] = ",".join(f"{w:g}" for w in kind_weights(tc.kinds))

    def encode(part):
        a, b, c = _encode(part, dataset, vae, text, device, tc.batch)
        return {"latents": a, "tokens": b, "lengths": c}
    shards = sharded(folder, "", "pool", items, meta, encode, "pool: encoding items", progress and d.main)
    with torch.inference_mode():
        e, m = text.encode_batch([""])
    return Pool(size, tc.batch, d.world, torch.cat([x["latents"] for x in shards]),
                torch.cat([x["tokens"] for x in shards]), offsets_of(torch.cat([x["lengths"] for x in shards])),
                e[0][m[0]].float().cpu())

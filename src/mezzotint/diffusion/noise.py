"""Seeded Gaussian noise, drawn on the CPU so a seed means the same latent on every device.

Row k of a batch comes from its own generator (seed + k), so image k of a batch equals
the single image made with seed + k. This is diffusers' `randn_tensor` with a list of
CPU generators, draw for draw, so diffusers pipelines and ours agree on a seed.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator] | None


def generators(seed: int, n: int) -> list[torch.Generator]:
    """CPU generators seeded seed, seed + 1, ..., seed + n - 1 (one per batch row)."""
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]


def randn(shape, generator: Generator, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of `shape`, drawn on the CPU in `dtype`, then moved to `device`.

    generator: one torch.Generator (draws the whole tensor), a list with one per row
    (row k drawn alone from generator k), or None (torch's global RNG). The draw is
    made in `dtype` because the stream of values depends on it (as diffusers does).
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per row")
        rows = [torch.randn((1, *shape[1:]), generator=g, device="cpu", dtype=dtype) for g in generator]
        out = torch.cat(rows, dim=0)
    else:
        out = torch.randn(shape, generator=generator, device="cpu", dtype=dtype)
    return out.to(device) if device is not None else out

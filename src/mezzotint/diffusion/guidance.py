"""Classifier-free guidance, written once over the denoiser output.

Ho & Salimans 2022, eq. 6: eps~ = eps(x, c_empty) + w (eps(x, c) - eps(x, c_empty)).
For a fixed (x, sigma), x0 = x - sigma * eps is affine in eps with the same coefficients
for both passes, so the same combination on x0 predictions is exactly the same guidance.

Guidance rescale (Lin et al. 2024, sec. 3.4, eq. 15-16; diffusers `guidance_rescale`):
the guided prediction is rescaled per image to the conditional one's standard deviation
and blended with it by phi. It is defined on what the UNet predicts (eps or v), which is
not an affine image of x0 with a shared offset, so it is computed there: the UNet's output
is k * (a(x) - x0) per row (Denoiser.anchor gives a), and k cancels in the ratio.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _pad_dim1(v: Tensor, length: int) -> Tensor:
    # Zeros for embeddings, False for boolean masks: padded tokens are masked out.
    extra = length - v.shape[1]
    if extra == 0:
        return v
    pad = v.new_zeros((v.shape[0], extra, *v.shape[2:]))
    return torch.cat([v, pad], dim=1)


def _expand(v, batch: int):
    # A condition given once (batch 1) applies to every row.
    if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == 1 and batch > 1:
        return v.expand(batch, *v.shape[1:])
    return v


class CFGDenoiser:
    """D_cfg(x, sigma) = D(x, sigma, **uncond) + scale * (D(x, sigma, **cond) - D(x, sigma, **uncond))."""

    def __init__(self, denoiser, cond: dict, uncond: dict, scale: float, batch_together: bool = True,
                 side_by_side=None, side_from: int = 0, rescale: float = 0.0):
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
        self.denoiser = denoiser
        self.cond = dict(cond)
        self.uncond = dict(uncond)
        self.scale = float(scale)
        self.rescale = float(rescale)  # guidance rescale phi, 0 (off) .. 1
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.batch_together = batch_together
        # side_by_side(f, g) -> (f(), g()): runs the two passes at once (graphs.both), instead
        # of as one batch; the same outputs up to rounding
        self.side_by_side = side_by_side
        self.side_from = side_from  # calls made as one batch first (see Pipeline.denoise)
        self.calls = 0
        self._joint_cache: dict[int, dict | None] = {}  # batch size -> joint conditions
        self._halves_cache: dict[int, tuple[dict, dict]] = {}  # batch size -> the side-by-side passes

    def _joint(self, batch: int) -> dict | None:
        """cond and uncond as one 2B-row dict [uncond; cond], or None if they cannot share a pass."""
        joint = {}
        has_mask = any(torch.is_tensor(v) and v.dtype == torch.bool for v in self.cond.values())
        has_mask = has_mask and any(torch.is_tensor(v) and v.dtype == torch.bool for v in self.uncond.values())
        for k in self.cond:
            u, c = _expand(self.uncond[k], batch), _expand(self.cond[k], batch)
            if not (torch.is_tensor(u) and torch.is_tensor(c)):
                if torch.is_tensor(u) or torch.is_tensor(c) or u != c:
                    return None  # non-tensor options that differ: run two passes
                joint[k] = c
                continue
            if u.ndim >= 2 and u.shape[1] != c.shape[1]:
                if not has_mask:
                    return None  # zero padding would be attended to without a mask
                length = max(u.shape[1], c.shape[1])
                u, c = _pad_dim1(u, length), _pad_dim1(c, length)
            if u.shape[1:] != c.shape[1:]:
                raise ValueError(f"cond[{k!r}] {tuple(c.shape)} and uncond[{k!r}] {tuple(u.shape)} do not match")
            joint[k] = torch.cat([u, c], dim=0)
        return joint

    def _halves(self, joint: dict | None, batch: int) -> tuple[dict, dict]:
        """(uncond, cond) for two side-by-side passes: each its rows of the joint batch, padded
        alike, so that its result is the same as theirs (a prompt padded longer rounds otherwise)."""
        if joint is None:
            return tuple({k: _expand(v, batch) for k, v in d.items()} for d in (self.uncond, self.cond))
        return tuple({k: v[rows] if torch.is_tensor(v) else v for k, v in joint.items()}
                     for rows in (slice(0, batch), slice(batch, None)))

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        if self.scale == 1.0:
            # uncond + 1 * (cond - uncond) = cond: skip the unconditional pass.
            return self.denoiser(x, sigma, **{k: _expand(v, batch) for k, v in self.cond.items()})
        self.calls += 1
        joint = None
        if self.batch_together:
            # cond and uncond are fixed for the whole sampling run: pad and concatenate once
            if batch not in self._joint_cache:
                self._joint_cache[batch] = self._joint(batch)
            joint = self._joint_cache[batch]
        if self.side_by_side is not None and self.calls > self.side_from:
            if batch not in self._halves_cache:
                self._halves_cache[batch] = self._halves(joint, batch)
            uncond, cond = self._halves_cache[batch]
            x0_uncond, x0_cond = self.side_by_side(lambda: self.denoiser(x, sigma, **uncond),
                                                   lambda: self.denoiser(x, sigma, **cond))
            return self._combine(x, sigma, x0_uncond, x0_cond)
        if joint is not None:
            out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **joint)
            x0_uncond, x0_cond = out.chunk(2)
        else:
            x0_uncond = self.denoiser(x, sigma, **{k: _expand(v, batch) for k, v in self.uncond.items()})
            x0_cond = self.denoiser(x, sigma, **{k: _expand(v, batch) for k, v in self.cond.items()})
        return self._combine(x, sigma, x0_uncond, x0_cond)

    def _combine(self, x: Tensor, sigma: Tensor, x0_uncond: Tensor, x0_cond: Tensor) -> Tensor:
        out = x0_uncond + self.scale * (x0_cond - x0_uncond)
        if not self.rescale:
            return out
        a = self.denoiser.anchor(x, sigma)
        r, r_cond = a - out, a - x0_cond  # the UNet's outputs, up to a positive factor per row
        dims = tuple(range(1, x.ndim))
        ratio = r_cond.std(dim=dims, keepdim=True) / r.std(dim=dims, keepdim=True)
        return a - (self.rescale * ratio + (1 - self.rescale)) * r

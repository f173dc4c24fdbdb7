"""Inputs of editing: images and masks of any mode, canvases grown for outpainting.

Conventions as in the AUTOMATIC1111 web UI: transparent image pixels are flattened onto
white; in a mask, white means "regenerate" and black "keep", and a transparent mask pixel
keeps; the final image is the generated one only where the blurred mask says so.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

SIDES = ("left", "right", "top", "bottom")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency (RGBA, LA, palette with transparency) over white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale to 8 bits
        a = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def to_mask(mask: Image.Image) -> Image.Image:
    """Any PIL mode -> L, white = regenerate; transparent pixels count as black (keep)."""
    if mask.mode == "P" and "transparency" in mask.info:
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA", "PA"):
        rgba = mask.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        flat.alpha_composite(rgba)
        mask = flat
    return mask.convert("L")


def check_pair(image: Image.Image, mask: Image.Image) -> None:
    if image.size != mask.size:
        raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]} but the image is "
                         f"{image.size[0]}x{image.size[1]}; they must be the same size")


def fit_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """The nearest size the autoencoder can take (multiples of its factor, at least one factor)."""
    return (max(factor, round(width / factor) * factor), max(factor, round(height / factor) * factor))


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == tuple(size) else image.resize(size, Image.Resampling.LANCZOS)


def soft_mask(mask: Image.Image, blur: float) -> np.ndarray:
    """(H, W) float in [0, 1]: the mask after a Gaussian blur of `blur` pixels (the composite's weight)."""
    if blur < 0:
        raise ValueError(f"mask blur must be >= 0 pixels, got {blur}")
    m = mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask
    return np.asarray(m, dtype=np.float32) / 255.0


def latent_mask(mask: Image.Image, factor: int) -> torch.Tensor:
    """(1, 1, H/f, W/f): 1 on every latent cell that any regenerated pixel falls in."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return F.max_pool2d((m > 0.5).float(), factor)


def composite(generated: Image.Image, original: Image.Image, weight: np.ndarray) -> Image.Image:
    """weight * generated + (1 - weight) * original, in 8 bits: exactly the original where weight is 0."""
    g = np.asarray(generated, dtype=np.float32)
    o = np.asarray(original, dtype=np.float32)
    w = weight[..., None]
    out = np.where(w > 0, w * g + (1 - w) * o, o)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def parse_extend(text: str) -> dict[str, int]:
    """'left=16,right=16' -> {'left': 16, 'right': 16, 'top': 0, 'bottom': 0}."""
    out = dict.fromkeys(SIDES, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
        if not m or m.group(1) not in SIDES:
            raise ValueError(f"bad --extend part {part!r}: use SIDE=PIXELS with SIDE in {', '.join(SIDES)}, "
                             "e.g. left=16,right=16")
        out[m.group(1)] = int(m.group(2))
    if not any(out.values()):
        raise ValueError("--extend names no pixels to add")
    return out


def extend(image: Image.Image, sides: dict[str, int]) -> tuple[Image.Image, Image.Image]:
    """Grow the canvas for outpainting: (image with its edge pixels stretched over the new border,
    mask white on the new border)."""
    a = np.asarray(image)
    pad = ((sides["top"], sides["bottom"]), (sides["left"], sides["right"]), (0, 0))
    grown = Image.fromarray(np.pad(a, pad, mode="edge"))
    mask = np.full(grown.size[::-1], 255, dtype=np.uint8)
    h, w = a.shape[:2]
    mask[sides["top"]: sides["top"] + h, sides["left"]: sides["left"] + w] = 0
    return grown, Image.fromarray(mask)

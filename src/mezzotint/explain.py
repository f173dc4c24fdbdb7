"""The X-ray of a generation: the denoising trajectory and where each word went.

Trajectory: after every sampler step, the current latent (as the UNet sees it, x / sqrt(1 +
sigma^2)) and the predicted clean latent, both decoded (Diffusion Explainer's view).

Word heat maps: DAAM (Tang et al. 2023, "What the DAAM"): the cross-attention weights of
each prompt token, from the conditional branch only, upsampled from every layer's
resolution to the image, summed over heads, layers and steps.
"""
from __future__ import annotations

import contextlib
import html
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .pipeline import Pipeline, Request, Result


@contextlib.contextmanager
def record_cross_attention(unet: torch.nn.Module, batch: int, latent_hw: tuple[int, int],
                           image_hw: tuple[int, int]):
    """Yields a (B, L, H, W) float tensor holder: list with one accumulated sum, filled as the
    UNet runs. Rows of a guided pass are [uncond; cond]: the last `batch` rows are kept."""
    total: list[torch.Tensor | None] = [None]
    h, w = latent_hw

    def probe(weights):  # (rows, heads, N, L)
        wts = weights[-batch:].sum(1)  # (B, N, L): heads summed
        n = wts.shape[1]
        lh = round(math.sqrt(n * h / w))
        lw = n // lh
        maps = wts.transpose(1, 2).reshape(batch, -1, lh, lw)  # (B, L, lh, lw)
        up = F.interpolate(maps.float().cpu(), size=image_hw, mode="bicubic", align_corners=False).clamp(min=0)
        if total[0] is None:
            total[0] = up
        else:
            total[0] += up

    attns = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    before = [m.probe for m in attns]  # nested recordings (choose_noise inside explain) restore the outer
    for m in attns:
        m.probe = probe
    try:
        yield total
    finally:
        for m, was in zip(attns, before):
            m.probe = was


BEGIN, END = {"[CLS]", "<|startoftext|>"}, {"[SEP]", "<|endoftext|>"}


def words_of(tokens: list[str], kind: str) -> list[tuple[str, list[int]]]:
    """Group tokens into words: (word, token positions); start/end tokens and the padding
    after the end are left out. WordPiece marks continuations with '##'; CLIP's BPE ends a
    word with '</w>'."""
    words: list[tuple[str, list[int]]] = []
    inside = open_word = False
    for i, t in enumerate(tokens):
        if t in BEGIN or t in END:
            inside, open_word = t in BEGIN, False
            continue
        if not inside:
            continue
        if kind == "clip":
            piece = t.removesuffix("</w>")
            if open_word:
                words[-1] = (words[-1][0] + piece, words[-1][1] + [i])
            else:
                words.append((piece, [i]))
            open_word = not t.endswith("</w>")
        elif t.startswith("##") and words:
            words[-1] = (words[-1][0] + t[2:], words[-1][1] + [i])
        else:
            words.append((t, [i]))
    return words


@dataclass
class Explanation:
    result: Result
    sigmas: list[float]  # the noise level each step ended at
    noisy: list[Image.Image]  # the latent after each step, decoded
    predicted: list[Image.Image]  # the predicted clean image at each step
    words: list[str]
    heatmaps: np.ndarray = field(repr=False)  # (words, H, W), each summed over heads, layers, steps

    def share_left(self, word: str) -> float:
        """The share of `word`'s attention above its own mean (the map's floor left out) that
        lies on the left half of the image."""
        m = self.heatmaps[self.words.index(word)]
        m = np.clip(m - m.mean(), 0, None)
        return float(m[:, : m.shape[1] // 2].sum() / max(m.sum(), 1e-12))

    def save(self, folder, scale: int | None = None) -> Path:
        return write(self, folder, scale)


def explain(pipe: Pipeline, req: Request, on_step=None, trajectory: bool = True) -> Explanation:
    """Generate one image for `req`, recording its trajectory and word heat maps.
    on_step({i, n, sigma, preview}) is called after each step; preview() decodes the predicted
    clean image (for live previews). trajectory=False skips decoding the frames (maps only)."""
    f = pipe.config.vae.factor
    latents, denoised, sig = [], [], []

    def callback(info):
        s = float(info["sigma_next"])
        latents.append((info["x"] / math.sqrt(1 + s * s)).cpu())
        denoised.append(info["denoised"].cpu())
        sig.append(s)
        if on_step is not None:
            z = denoised[-1]
            on_step({"i": info["i"], "n": req.steps, "sigma": s, "preview": lambda: pipe.decode(z)[0]})

    with record_cross_attention(pipe.unet, 1, (req.height // f, req.width // f), (req.height, req.width)) as acc:
        [result] = pipe(req, callback=callback)
    tokens = pipe.text.token_strings(req.prompt)
    groups = words_of(tokens, pipe.text.cfg.kind)
    total = acc[0][0] if acc[0] is not None else torch.zeros(len(tokens), req.height, req.width)
    maps = np.stack([total[idx].sum(0).numpy() for _, idx in groups]) if groups else \
        np.zeros((0, req.height, req.width), np.float32)
    noisy = [pipe.decode(z)[0] for z in latents] if trajectory else []
    predicted = [pipe.decode(z)[0] for z in denoised] if trajectory else []
    return Explanation(result, sig, noisy, predicted, [w for w, _ in groups], maps)


# -- pictures ----------------------------------------------------------------------------------

# a perceptually ordered dark-to-bright ramp (anchors of matplotlib's "inferno")
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def colorize(m: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8."""
    x = np.clip(m, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.6) -> Image.Image:
    m = heat / heat.max() if heat.max() > 0 else heat
    a = np.asarray(image.convert("RGB"), np.float32)
    out = (1 - alpha) * a + alpha * colorize(m).astype(np.float32)
    return Image.fromarray(out.round().astype(np.uint8))


def _big(im: Image.Image, scale: int) -> Image.Image:
    return im if scale == 1 else im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)


def _labelled(im: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (im.width, im.height + 14), "white")
    out.paste(im, (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill="black")
    return out


def write(expl: Explanation, folder, scale: int | None = None) -> Path:
    """Write the X-ray into a new folder (atomically: a temp folder renamed at the end)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder")
    img = expl.result.image
    scale = scale or max(1, 256 // max(img.size))
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _big(img, scale).save(tmp / "image.png")
        pairs = [_pair(n, p, scale) for n, p in zip(expl.noisy, expl.predicted)]
        pairs[0].save(tmp / "trajectory.webp", save_all=True, append_images=pairs[1:], duration=200, loop=0,
                      lossless=True)
        pairs[0].save(tmp / "trajectory.gif", save_all=True, append_images=pairs[1:], duration=200, loop=0)
        _sheet(expl, scale).save(tmp / "contact_sheet.png")
        entries = []
        for k, (word, heat) in enumerate(zip(expl.words, expl.heatmaps)):
            name = f"heatmap-{k:02d}.png"
            _big(overlay(img, heat), scale).save(tmp / name)
            entries.append({"word": word, "file": name, "share_left": expl.share_left(word)})
        np.savez_compressed(tmp / "heatmaps.npz", words=np.array(expl.words), maps=expl.heatmaps)
        meta = {"request": expl.result.request.__dict__, "sigmas": expl.sigmas, "words": entries,
                "frames": len(pairs)}
        (tmp / "explain.json").write_text(json.dumps(meta, indent=1))
        (tmp / "index.html").write_text(_index(expl, entries))
        if folder.exists():
            folder.rmdir()  # empty, checked above
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _pair(noisy: Image.Image, predicted: Image.Image, scale: int) -> Image.Image:
    a, b = _big(noisy, scale), _big(predicted, scale)
    out = Image.new("RGB", (a.width * 2 + 4, a.height), "white")
    out.paste(a, (0, 0))
    out.paste(b, (a.width + 4, 0))
    return out


def _sheet(expl: Explanation, scale: int) -> Image.Image:
    """Two rows (noisy latent, predicted image), one column per step."""
    s = max(1, scale // 2)
    cells = [(_labelled(_big(n, s), f"{i + 1}: s={sg:.2f}"), _big(p, s))
             for i, (n, p, sg) in enumerate(zip(expl.noisy, expl.predicted, expl.sigmas))]
    w, h = cells[0][0].width, cells[0][0].height + cells[0][1].height
    sheet = Image.new("RGB", (w * len(cells), h), "white")
    for i, (a, b) in enumerate(cells):
        sheet.paste(a, (i * w, 0))
        sheet.paste(b, (i * w, a.height))
    return sheet


def _index(expl: Explanation, entries: list[dict]) -> str:
    r = expl.result.request
    cards = "\n".join(
        f'<figure><img src="{e["file"]}" alt="heat map of {html.escape(e["word"])}">'
        f'<figcaption>{html.escape(e["word"])}</figcaption></figure>' for e in entries)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>X-ray: {html.escape(r.prompt)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}} figure{{display:inline-block;margin:.5em}}
img{{image-rendering:pixelated;border:1px solid #ccc}} .sheet{{overflow-x:auto}}</style></head>
<body><h1>{html.escape(r.prompt)}</h1>
<p>seed {r.seed}, {r.steps} steps, sampler {html.escape(r.sampler)}, guidance {r.cfg}, {r.width}x{r.height}</p>
<figure><img src="image.png" alt="final image"><figcaption>the image</figcaption></figure>
<figure><img src="trajectory.webp" alt="denoising trajectory"><figcaption>each step: the latent (left) and
the predicted clean image (right); also as <a href="trajectory.gif">GIF</a></figcaption></figure>
<h2>Where each word went</h2>
<p>Cross-attention of each word, summed over heads, layers and steps (DAAM), over the image.</p>
{cards}
<h2>Every step</h2><div class="sheet"><img src="contact_sheet.png" alt="contact sheet of all steps"></div>
</body></html>
"""

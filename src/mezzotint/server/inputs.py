"""Checking what clients send, before any model work: limits, images, samplers, sizes.

Every problem raises BadInput with a message meant for the client (HTTP 400)."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import secrets
from dataclasses import dataclass, field

from PIL import Image, ImageFilter, ImageOps

from ..metadata import A1111_SAMPLERS
from ..pipeline import Request, check_request, defaults_for

# A1111's own aliases of each sampler (GET /sdapi/v1/samplers lists them)
A1111_ALIASES = {"dpmpp_2m": ["k_dpmpp_2m"], "euler_a": ["k_euler_a", "k_euler_ancestral"],
                 "euler": ["k_euler"], "heun": ["k_heun"], "ddim": [], "ddpm": []}
MAX_INPUT_PIXELS = 4096 * 4096  # decoded input images; guards against decompression bombs


class BadInput(ValueError):
    """A client error: the message goes back as the HTTP 400 detail."""


@dataclass(frozen=True)
class Limits:
    max_queue: int = 16  # pending jobs beyond the running one; more gets 503 + Retry-After
    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_batch: int = 8  # images per job (A1111: batch_size * n_iter)
    max_body_mb: float = 32.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass
class JobSpec:
    """A checked job: the worker runs it without further questions."""
    kind: str  # txt2img | img2img | inpaint | explain
    req: Request
    batch: int = 1  # images per forward pass
    n_iter: int = 1  # passes; image i gets seed + i
    image: Image.Image | None = field(default=None, repr=False)
    mask: Image.Image | None = field(default=None, repr=False)
    strength: float = 1.0
    mask_blur: float | None = None
    edit: dict | None = None  # the record's "edit" entry, as the CLI writes it

    @property
    def count(self) -> int:
        return self.batch * self.n_iter

    @property
    def steps_per_pass(self) -> int:
        s = self.req.steps
        if self.kind in ("img2img", "inpaint") and self.strength < 1:
            return min(int(s * self.strength), s)  # as Pipeline.initial_latent counts them
        return s


def sampler_names() -> list[tuple[str, str, list[str]]]:
    """(our name, A1111 name, aliases) for every sampler."""
    from ..diffusion import SAMPLERS
    return [(n, A1111_SAMPLERS.get(n, n), A1111_ALIASES.get(n, [])) for n in SAMPLERS]


def resolve_sampler(name: str) -> tuple[str, bool | None]:
    """Our name or A1111's ("Euler a", "k_euler_a", old-style "DPM++ 2M Karras") -> (ours, karras or None)."""
    key, karras = str(name).strip().lower(), None
    if key.endswith(" karras"):
        key, karras = key[: -len(" karras")], True
    for ours, a1111, aliases in sampler_names():
        if key in (ours, a1111.lower(), *aliases):
            return ours, karras
    allowed = ", ".join(f"{a} ({o})" for o, a, _ in sampler_names())
    raise BadInput(f"unknown sampler {name!r}; allowed: {allowed}")


def decode_image(data, what: str) -> tuple[Image.Image, bytes]:
    """Base64 (plain or a data: URL, as A1111 clients send) -> (decoded image, its bytes)."""
    if not isinstance(data, str) or not data.strip():
        raise BadInput(f"{what}: expected a base64-encoded image")
    s = data.strip()
    if s.startswith(("http://", "https://")):
        raise BadInput(f"{what}: this server does not fetch URLs; send the image as base64")
    if s.startswith("data:"):
        if "," not in s:
            raise BadInput(f"{what}: a data: URL without data")
        s = s.split(",", 1)[1]
    s = "".join(s.split())
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadInput(f"{what}: not valid base64 ({e})") from None
    try:
        im = Image.open(io.BytesIO(raw))
        if im.width * im.height > MAX_INPUT_PIXELS:  # header only so far: refuse before decoding
            raise BadInput(f"{what}: {im.width}x{im.height} is too large (at most {MAX_INPUT_PIXELS} pixels)")
        im.load()
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 (PIL raises many kinds for bad bytes)
        raise BadInput(f"{what}: not an image we can read (PNG, JPEG, WebP, ...): {e}") from None
    return im, raw


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill=0 ("fill"): masked pixels replaced by ever finer blurs of the
    known ones; known pixels unchanged."""
    out = Image.new("RGBA", image.size)
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def build_spec(cfg, limits: Limits, *, kind: str, prompt: str, negative_prompt: str = "",
               seed: int | None = None, steps: int | None = None, sampler: str | None = None,
               cfg_scale: float | None = None, width: int | None = None, height: int | None = None,
               karras: bool | None = None, eta: float = 0.0, guidance_rescale: float | None = None,
               layout_guidance: float | None = None, layout_candidates: int | None = None,
               batch: int = 1, n_iter: int = 1,
               image: str | None = None, mask: str | None = None, strength: float | None = None,
               mask_blur: float | None = None, fill: int = 1, invert_mask: bool = False) -> JobSpec:
    """Check everything a job needs against the model config `cfg` and the server's limits."""
    from ..edit import fit_size, to_mask, to_rgb
    if kind not in ("txt2img", "img2img", "inpaint", "explain"):
        raise BadInput(f"unknown kind {kind!r}; allowed: txt2img, img2img, inpaint, explain")
    if not isinstance(prompt, str):
        raise BadInput("prompt must be a string")
    for name, v in (("batch", batch), ("n_iter", n_iter)):
        if v < 1:
            raise BadInput(f"{name} must be >= 1, got {v}")
    if kind == "explain" and batch * n_iter != 1:
        raise BadInput("an explain job makes one image: batch must be 1")
    if batch * n_iter > limits.max_batch:
        raise BadInput(f"{batch * n_iter} images asked for; this server allows at most {limits.max_batch} a job "
                       "(--max-batch)")
    if sampler is not None:
        sampler, named_karras = resolve_sampler(sampler)
        karras = named_karras if karras is None else karras
    seed = secrets.randbelow(2**32) if seed is None or seed < 0 else seed  # -1: random, as A1111
    edit, img, msk, img_raw = None, None, None, None
    if kind in ("img2img", "inpaint"):
        if image is None:
            raise BadInput(f"a {kind} job needs an image")
        img, img_raw = decode_image(image, "image")
        img = to_rgb(img)
        if width is None and height is None:
            width, height = fit_size(img.width, img.height, cfg.vae.factor)
        strength = (0.75 if kind == "img2img" else 1.0) if strength is None else strength
        if not 0.0 <= strength <= 1.0:
            raise BadInput(f"strength must be in [0, 1], got {strength}")
        edit = {"mode": kind, "strength": strength, "image_sha256": _sha(img_raw)}
    if kind == "inpaint":
        if mask is None:
            raise BadInput("an inpaint job needs a mask (white = regenerate, black = keep)")
        msk, msk_raw = decode_image(mask, "mask")
        msk = to_mask(msk)
        if msk.size != img.size:  # A1111 resizes the mask to the image; so do we
            msk = msk.resize(img.size, Image.Resampling.LANCZOS)
        if invert_mask:
            msk = ImageOps.invert(msk)
        if mask_blur is not None and mask_blur < 0:
            raise BadInput(f"mask_blur must be >= 0 pixels, got {mask_blur}")
        if not any(msk.getextrema()):
            raise BadInput("the mask is all black: nothing to regenerate")
        if fill == 0:
            img = fill_masked(img, msk)
        edit.update(mask_blur=mask_blur, mask_sha256=_sha(msk_raw))
    for name, v, top in (("width", width, limits.max_width), ("height", height, limits.max_height),
                         ("steps", steps, limits.max_steps)):
        if v is not None and v > top:
            raise BadInput(f"{name} {v} is over this server's limit of {top} (--max-{name})")
    req = defaults_for(cfg, prompt, negative_prompt=negative_prompt or "", seed=seed, steps=steps,
                       sampler=sampler, cfg=cfg_scale, width=width, height=height, karras=karras,
                       eta=eta if eta is not None else 0.0, guidance_rescale=guidance_rescale,
                       layout_guidance=layout_guidance, layout_candidates=layout_candidates)
    for name, v, top in (("width", req.width, limits.max_width), ("height", req.height, limits.max_height),
                         ("steps", req.steps, limits.max_steps)):
        if v > top:  # the model's defaults may exceed a strict server's limits
            raise BadInput(f"{name} {v} is over this server's limit of {top} (--max-{name})")
    try:
        check_request(req, cfg)
    except ValueError as e:
        raise BadInput(str(e)) from None
    return JobSpec(kind, req, batch, n_iter, img, msk, 1.0 if strength is None else strength, mask_blur, edit)

"""Text to image as numbered steps over loaded parts.

img2img and inpainting reuse these step functions rather than copies of them.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import checkpoints, graphs, pages
from .config import ModelConfig
from .diffusion import SAMPLERS, CFGDenoiser, Denoiser, generators, get_sigmas, randn
from .nn import ONEDNN_BF16, drop_packs, prepack
from .request import MAX_CANDIDATES, MAX_SEED, Request, check_request, defaults_for  # noqa: F401 (re-exported)
from .text import TextEncoder, load_text_encoder
from .vae import to_uint8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTEXT_BUCKET = 8  # prompt lengths are padded (masked) to a multiple of this
# A streamed UNet's packed convs are dropped before decoding latents larger than this (cells),
# whose decoder activations would raise the image's peak memory; the next image packs again.
# SD 1.5 float32, AMD Zen 4, streamed: at 256x256 (32x32) keeping them left the peak as it was
# (3186 against 3208 MiB) and the next images took 24 s instead of 29; at 384x384 it raised the
# peak from 3365 to 3758 MiB for 4 s of 59 (and at 512x512, 3621 -> 4324 MiB on an AVX2 VM).
KEEP_PACKS_MAX_LATENT = 32 * 32


def _bucket(ctx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, L, D) embeddings and their (B, L) mask with masked zeros to a multiple of
    CONTEXT_BUCKET tokens: prompts of nearby lengths then share one trace (graphs.py)."""
    extra = -ctx.shape[1] % CONTEXT_BUCKET
    if extra == 0:
        return ctx, mask
    return (torch.cat([ctx, ctx.new_zeros(ctx.shape[0], extra, ctx.shape[2])], dim=1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; allowed: auto, cpu, cuda, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but this PyTorch sees no CUDA device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device mps asked for, but it is not available")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run in hardware here (on a CPU without it they are emulated
    and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return ONEDNN_BF16
    return False


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """None: float32 on CPU, float16 on CUDA. "fast": the fastest precision this device runs
    natively (bfloat16 on CPUs with AVX512-BF16 or AMX, float32 on other CPUs, float16 on
    GPUs): each UNet call within about 1-2% of float32 (benchmarks/sd_vs_diffusers.py)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype == "fast":
        if device.type == "cpu":
            return torch.bfloat16 if native_bf16(device) else torch.float32
        return torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: fast, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_strength(strength: float) -> None:
    if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")


@dataclass
class Result:
    image: Image.Image
    request: Request  # this image's own request (its own seed)
    latent: torch.Tensor = field(repr=False)


class Pipeline:
    def __init__(self, unet, vae, text: TextEncoder, config: ModelConfig, device, dtype,
                 path: str | None = None):
        self.unet, self.vae, self.text, self.config = unet, vae, text, config
        self.device, self.dtype, self.path = torch.device(device), dtype, path
        self.denoiser = Denoiser(unet, config.scheduler)
        self._hash = None
        self.lora_dir: Path | None = None  # where <lora:name:weight> prompt tags are looked up
        self.extra_loras: list[tuple[str, float]] = []  # applied to every generation (--lora FILE:WEIGHT)
        self._applied: list[tuple[tuple[str, float], object]] = []  # ((path, weight), undo handle)
        self._lora_hashes: dict[str, str] = {}
        self.warm = False  # a run has finished: see denoise
        self.streams: dict[str, pages.Stream] = {}  # parts whose weights stream (Pipeline.load)

    # -- LoRA ----------------------------------------------------------------------------------

    def _loras_for(self, prompts: list[str]) -> tuple[list[str], list[tuple[str, float]]]:
        """Prompts without their <lora:name:weight> tags, and the LoRA files they (and
        extra_loras) ask for. One batch shares its weights, so its prompts must agree."""
        from .sd import find_lora, parse_lora_tags
        parsed = [parse_lora_tags(p) for p in prompts]
        tags = {tuple(t) for _, t in parsed}
        if len(tags) > 1:
            raise ValueError("the prompts of one batch name different LoRAs; generate them in separate batches")
        wanted = [(str(Path(f).resolve()), float(w)) for f, w in self.extra_loras]
        for name, weight in next(iter(tags)):
            if self.lora_dir is None:
                raise ValueError(f"the prompt names <lora:{name}> but no LoRA folder is set (--lora-dir)")
            wanted.append((str(find_lora(name, self.lora_dir).resolve()), weight))
        return [clean for clean, _ in parsed], wanted

    def set_loras(self, wanted: list[tuple[str, float]]) -> None:
        """Make exactly these (file, weight) LoRAs merged into the weights (undo in reverse order)."""
        from .sd import apply_lora
        if [w for w, _ in self._applied] == list(wanted):
            return
        while self._applied:
            self._applied.pop()[1].undo()
        for path, weight in wanted:
            self._applied.append(((path, weight), apply_lora(self.unet, self.text, path, weight)))
            if path not in self._lora_hashes:
                self._lora_hashes[path] = checkpoints.model_hash(path)

    @property
    def loras(self) -> list[dict]:
        return [{"path": p, "weight": w, "sha256": self._lora_hashes[p]} for (p, w), _ in self._applied]

    @classmethod
    def load(cls, path, device="auto", dtype: str | None = None) -> "Pipeline":
        from .sd import is_sd_checkpoint, load_sd
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        mode = os.environ.get("MEZZOTINT_STREAM_WEIGHTS", "auto")  # checked before the weights are read
        if mode not in ("auto", "0", "1"):
            raise ValueError(f"MEZZOTINT_STREAM_WEIGHTS={mode!r}: use auto (the default), 1 (always) or 0 (never)")
        if is_sd_checkpoint(path):  # Stable Diffusion single file or diffusers folder
            unet, vae, text, cfg = load_sd(path, dev, dt)
        else:
            unet, vae, cfg = checkpoints.load_model(path, dev, dt)
            base = Path(path) if Path(path).is_dir() else Path(path).parent
            text = load_text_encoder(cfg.text, base, dev, dt if dev.type != "cpu" else torch.float32)
        # fp16 overflows in the autoencoder's decoder (a known SD issue); keep it in fp32
        if dt == torch.float16:
            vae = vae.float()
        streams = {}
        if dev.type == "cpu" and mode != "0":
            # large models: only the part that runs stays resident. auto stops where the page
            # cache does not keep what was given back (it would be read from disk every call)
            for name, m in (("text", text), ("unet", unet), ("vae", vae)):
                s = pages.stream(m, watch=mode == "auto", name=name)
                if s is not None:
                    streams[name] = s
        if dev.type == "cpu":
            pages.keep_freed_memory()  # each call's activations reuse the last call's pages
            if dt == torch.bfloat16 and pages.nbytes(unet) >= pages.STREAM_MIN_BYTES:
                prepack(unet)  # small models (the default one, NCHW at 16x16) keep packing by size
        pipe = cls(unet, vae, text, cfg, dev, dt, str(Path(path).resolve()))
        pipe.streams = streams
        return pipe

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = checkpoints.model_hash(self.path) if self.path else "0" * 64
        return self._hash

    # -- the steps --------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], negative: str):
        """Step 1: conditional and unconditional embeddings (the negative prompt is the latter)."""
        ctx, mask = self.text.encode(prompts)
        uctx, umask = self.text.encode([negative] * len(prompts))
        if graphs.small(self.unet):  # models that may run as traces: one per length bucket
            (ctx, mask), (uctx, umask) = _bucket(ctx, mask), _bucket(uctx, umask)
        cond = {"context": ctx.to(self.device), "context_mask": mask.to(self.device)}
        uncond = {"context": uctx.to(self.device), "context_mask": umask.to(self.device)}
        return cond, uncond

    def sigmas(self, req: Request) -> torch.Tensor:
        """Step 2: the noise levels the sampler walks down, ending at 0."""
        return get_sigmas(self.config.scheduler, req.steps, karras=req.karras).float().to(self.device)

    def initial_latent(self, req: Request, gens: list, sigmas: torch.Tensor, init: torch.Tensor | None = None,
                       strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: the starting latent and the sigmas left to walk.

        Seeded noise, drawn on the CPU so every device starts from the same latent; one
        generator per image, which the sampler goes on drawing from, so image k depends on
        seed + k alone. Text to image (or strength 1): pure noise at sigmas[0]. From an image
        (SDEdit, Meng et al. 2022): its latent plus noise at the level where the last
        int(steps * strength) steps begin, as diffusers counts them; strength 0 runs no step.
        """
        f, c = self.config.vae.factor, self.config.unet.out_channels
        shape = (len(gens), c, req.height // f, req.width // f)
        noise = randn(shape, gens, self.device, torch.float32)
        if init is None or strength >= 1.0:
            # the marginal of unit-variance latents at sigma has std sqrt(1 + sigma^2)
            return noise * math.sqrt(1.0 + float(sigmas[0]) ** 2), sigmas
        sigmas = sigmas[req.steps - min(int(req.steps * strength), req.steps):]
        return init.to(self.device) + noise * sigmas[0], sigmas

    def choose_noise(self, x, sigmas, cond, gens, k: int) -> torch.Tensor:
        """Step 3b (text to image, a layout map): the best of k initial noises (layout.choose_noise)."""
        from .layout import choose_noise
        return choose_noise(self.denoiser, x, sigmas[0], cond, gens, k)

    def denoise(self, x, sigmas, req: Request, cond, uncond, gens, callback=None, extra=None, keep=None):
        """Step 4: run the sampler over the guided denoiser. `keep` = (mask, latent): where the
        latent mask is 0 the clean prediction is replaced by the known latent at every step
        (inpainting with any model, as the A1111 web UI does), so those cells end exactly there."""
        # from the second run on a small model runs as traces, its rows split over two threads;
        # a large model's guidance passes run side by side (graphs.py)
        graphs.allow(self.unet, self.warm)
        self.unet.layout_guidance = (req.layout_guidance, self.config.defaults.layout_start)
        with torch.inference_mode():
            side = graphs.both if graphs.side_by_side(self.unet, x) else None
        # a model's first call packs its convs and reads its weights in: two passes doing that
        # at once took 43 s for SD 1.5's first 512x512 step, against 14 s as one batch
        guided = CFGDenoiser(self.denoiser, cond, uncond, req.cfg, side_by_side=side,
                             side_from=0 if self.warm else 1, rescale=req.guidance_rescale)
        if keep is not None:
            m, known = keep

            def pinned(x, sigma, _d=guided):
                return m * _d(x, sigma) + (1 - m) * known
            guided = pinned
        options = {"eta": req.eta} if req.sampler == "ddim" else {}
        with torch.inference_mode():
            out = SAMPLERS[req.sampler](guided, x, sigmas, extra=extra, generator=gens,
                                        callback=callback, **options)
        self.warm = True
        return out

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """Step 3a (editing): an RGB image -> its latent (1, c, h, w), the mean of q(z|x)."""
        from .vae import to_unit
        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
        with torch.inference_mode():
            vae_dtype = next(self.vae.parameters()).dtype
            return self.vae.encode(to_unit(x).to(self.device, vae_dtype)).float()

    def decode(self, latent: torch.Tensor) -> list[Image.Image]:
        """Step 5: latents to 8-bit RGB images.

        One image at a time: peak memory stays that of one image, and each image's pixels do
        not depend on what else was in the batch (conv kernels differ between batch 1 and 2+).
        """
        with torch.inference_mode():
            vae_dtype = next(self.vae.parameters()).dtype
            x = torch.cat([self.vae.decode(z[None].to(vae_dtype)).float() for z in latent])
        x = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in x]

    # -- the public call ---------------------------------------------------------------------

    def __call__(self, req: Request, prompts: list[str] | None = None, callback=None) -> list[Result]:
        """Text to image. `prompts` (default: [req.prompt]) is the batch; image k gets seed + k."""
        return self._run(req, prompts, callback)

    def img2img(self, req: Request, image: Image.Image, strength: float = 0.75,
                prompts: list[str] | None = None, callback=None) -> list[Result]:
        """Redraw `image` (any mode; resized to req's width x height) with the prompt (SDEdit).
        strength 0 gives back the autoencoder's round trip of the image, 1 ignores it."""
        from . import edit
        _check_strength(strength)
        image = edit.resize(edit.to_rgb(image), (req.width, req.height))
        check_request(req, self.config)
        return self._run(req, prompts, callback, init=self.encode_image(image), strength=strength)

    def inpaint(self, req: Request, image: Image.Image, mask: Image.Image, strength: float = 1.0,
                mask_blur: float | None = None, prompts: list[str] | None = None, callback=None) -> list[Result]:
        """Regenerate `image` where `mask` is white. Outside the mask blurred by `mask_blur` pixels
        (default: 1 per 64 of the shorter side) every output pixel is the input's.

        A UNet with 2c + 1 input channels (an inpainting checkpoint) gets the mask and the
        latent of the masked image as extra channels; any other keeps the known latent cells
        pinned at every step."""
        from . import edit
        _check_strength(strength)
        edit.check_pair(image, mask)
        size = (req.width, req.height)
        image, mask = edit.resize(edit.to_rgb(image), size), edit.resize(edit.to_mask(mask), size)
        check_request(req, self.config)
        blur = max(1, min(size) // 64) if mask_blur is None else mask_blur
        weight = edit.soft_mask(mask, blur)
        f, c = self.config.vae.factor, self.config.unet.out_channels
        m = edit.latent_mask(mask, f).to(self.device)
        init = self.encode_image(image)
        concat, keep = None, (m, init)
        if self.config.unet.in_channels == 2 * c + 1:
            # as diffusers' StableDiffusionInpaintPipeline: masked pixels set to 0 (mid-gray)
            hard = (np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5)[..., None]
            masked = Image.fromarray((np.asarray(image, dtype=np.float32) * (1 - hard) + 127.5 * hard).astype(np.uint8))
            small = torch.nn.functional.interpolate(
                torch.from_numpy(hard[..., 0].astype(np.float32))[None, None], size=m.shape[-2:]).to(self.device)
            concat, keep = torch.cat([small, self.encode_image(masked)], dim=1), None
        elif self.config.unet.in_channels != c:
            raise ValueError(f"this UNet takes {self.config.unet.in_channels} input channels; inpainting "
                             f"knows {c} (any model) and {2 * c + 1} (inpainting models)")
        results = self._run(req, prompts, callback, init=init, strength=strength, keep=keep, concat=concat)
        for r in results:
            r.image = edit.composite(r.image, image, weight)
        return results

    def _run(self, req, prompts, callback, init=None, strength=1.0, keep=None, concat=None) -> list[Result]:
        """The numbered steps, shared by text to image, img2img and inpainting."""
        prompts = [req.prompt] if prompts is None else list(prompts)
        check_request(req, self.config)
        clean, wanted = self._loras_for(prompts)
        self.set_loras(wanted)
        cond, uncond = self.encode_prompts(clean, req.negative_prompt)
        if concat is not None:
            cond["concat"] = uncond["concat"] = concat.expand(len(prompts), *concat.shape[1:])
        if keep is not None:
            keep = tuple(t.to(self.device) for t in keep)
        gens = generators(req.seed, len(prompts))
        x, sigmas = self.initial_latent(req, gens, self.sigmas(req), init, strength)
        if req.layout_candidates > 1 and (init is None or strength >= 1.0) and keep is None and concat is None:
            x = self.choose_noise(x, sigmas, cond, gens, req.layout_candidates)
        # strength below 1 / steps runs no step at all: the image's own latent comes back
        latent = x if len(sigmas) < 2 else self.denoise(x, sigmas, req, cond, uncond, gens, callback, keep=keep)
        unet = self.streams.get("unet")
        if (unet is not None and unet.stopped is None and latent.shape[-1] * latent.shape[-2] > KEEP_PACKS_MAX_LATENT
                and drop_packs(self.unet)):
            pages.trim()  # the decoder's activations take the packs' place, not a place beside them
        images = self.decode(latent)
        return [Result(img, replace(req.for_image(k), prompt=p), latent[k].cpu())
                for k, (img, p) in enumerate(zip(images, prompts))]

    def record(self, req: Request, edit: dict | None = None) -> dict:
        """The JSON record stored in each PNG: enough to make the same image again (with
        `edit`, what img2img / inpainting started from: mode, strength, mask blur, input hashes)."""
        from . import __version__
        extra = {"edit": edit} if edit else {}
        if self._applied:
            extra["loras"] = self.loras
        return {"request": asdict(req), **extra,
                "model": {"name": self.config.name, "path": self.path, "sha256": self.model_hash},
                "device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."),
                "mezzotint": __version__}

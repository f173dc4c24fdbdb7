"""What decides an image, given the model (stored in each PNG), and its checks."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .config import ModelConfig
from .diffusion import SAMPLERS

MAX_SEED = 2**63 - 1
MAX_CANDIDATES = 64


@dataclass(frozen=True)
class Request:
    """Everything that decides an image, given the model. Stored in each PNG."""
    prompt: str
    negative_prompt: str = ""  # replaces the empty prompt as guidance's unconditional branch
    seed: int = 0  # image k of a batch uses seed + k
    steps: int = 20
    sampler: str = "dpmpp_2m"
    cfg: float = 5.0  # guidance scale; 1 disables guidance
    width: int = 64
    height: int = 64
    karras: bool = False  # Karras et al. (2022) sigma spacing instead of the model's own
    eta: float = 0.0  # ddim only: 0 deterministic, 1 ancestral
    guidance_rescale: float = 0.0  # phi of Lin et al. 2024 (diffusers' guidance_rescale), 0 = off
    layout_guidance: float = 0.0  # strength of layout guidance (layout.py; models with a layout map), 0 = off
    layout_candidates: int = 1  # initial noises to choose among by the layout map (choose_noise), 1 = off

    def for_image(self, k: int) -> "Request":
        return replace(self, seed=self.seed + k)


def defaults_for(model: ModelConfig, prompt: str, **overrides) -> Request:
    """A request with the model's defaults where `overrides` gives None."""
    d = model.defaults
    base = dict(sampler=d.sampler, steps=d.steps, cfg=d.cfg, karras=d.karras, width=d.width, height=d.height,
                guidance_rescale=d.guidance_rescale, layout_guidance=d.layout_guidance,
                layout_candidates=d.layout_candidates)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Request(prompt=prompt, **base)


def check_request(req: Request, cfg: ModelConfig) -> None:
    """Raise ValueError naming what is wrong and what is allowed. Cheap: runs before any model work."""
    f = cfg.vae.factor
    if req.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {req.sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if not isinstance(req.steps, int) or req.steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {req.steps!r}")
    if req.steps > cfg.scheduler.num_train_timesteps:
        raise ValueError(f"steps must be <= {cfg.scheduler.num_train_timesteps}, got {req.steps}")
    if not math.isfinite(req.cfg):
        raise ValueError(f"cfg must be a finite number, got {req.cfg}")
    for name in ("width", "height"):
        v = getattr(req, name)
        if not isinstance(v, int) or v < f or v % f:
            raise ValueError(f"{name} must be a positive multiple of {f} (the autoencoder's factor), got {v}")
    if not 0 <= req.seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {req.seed}")
    if not (math.isfinite(req.eta) and req.eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {req.eta}")
    if not (math.isfinite(req.guidance_rescale) and 0 <= req.guidance_rescale <= 1):
        raise ValueError(f"guidance rescale must be in [0, 1], got {req.guidance_rescale}")
    if not (math.isfinite(req.layout_guidance) and req.layout_guidance >= 0):
        raise ValueError(f"layout guidance must be a finite number >= 0, got {req.layout_guidance}")
    if req.layout_guidance and not cfg.unet.layout_map:
        raise ValueError("layout guidance needs a model with a layout map (mezzotint fit-layout adds one); "
                         "this model has none: use --layout-guidance 0")
    if (isinstance(req.layout_candidates, bool) or not isinstance(req.layout_candidates, int)
            or not 1 <= req.layout_candidates <= MAX_CANDIDATES):
        raise ValueError(f"layout candidates must be an integer in [1, {MAX_CANDIDATES}], "
                         f"got {req.layout_candidates!r}")
    if req.layout_candidates > 1 and not cfg.unet.layout_map:
        raise ValueError("layout candidates need a model with a layout map (mezzotint fit-layout adds one); "
                         "this model has none: use --layout-candidates 1")

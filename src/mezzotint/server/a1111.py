"""AUTOMATIC1111-compatible routes (/sdapi/v1), so that existing clients (webuiapi, ...) work
unmodified. They run on the same job queue as the native API, and wait for their job.

Fields we cannot honour with a non-default value are not dropped silently: they come back in
`info` as "mezzotint_ignored", in the X-Mezzotint-Ignored header, and in the log."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..metadata import A1111_SAMPLERS, a1111_parameters
from .inputs import BadInput, build_spec, decode_image, resolve_sampler, sampler_names

router = APIRouter(prefix="/sdapi/v1", tags=["A1111 compatible"])
log = logging.getLogger("mezzotint.server")

SCHEDULERS = {"automatic": ("Automatic", None), "uniform": ("Uniform", False), "karras": ("Karras", True)}
SAMPLER_OPTIONS = {"euler_a": {"uses_ensd": "True"}, "heun": {"second_order": "True"}}


class _Common(BaseModel):
    """What txt2img and img2img share. Absent sizes, steps, cfg and sampler take the model's
    defaults (A1111 would take 512x512 and 50 steps, which suit its models, not ours)."""
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, description="-1: random; image i gets seed + i")
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, description='A1111 names: "DPM++ 2M", "Euler a", ...')
    sampler_index: str | None = None
    scheduler: str | None = Field(None, description="automatic, uniform or karras")
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}


class Txt2ImgRequest(_Common):
    enable_hr: bool = False


class Img2ImgRequest(_Common):
    init_images: list[str] | None = None
    resize_mode: int = 0
    mask: str | None = None
    mask_blur: float | None = Field(None, description="absent: 1 px per 64 of the shorter side")
    inpainting_fill: int = Field(0, description="0 fill, 1 original (2, 3: treated as 1)")
    inpaint_full_res: bool = True
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str


def _ignored(body: dict, sampler: str | None, karras_ok: bool, current_model: set, strength: float,
             img2img: bool) -> dict:
    """The fields set to something we do not do."""
    out = {}
    checks = {"enable_hr": lambda v: not v, "restore_faces": lambda v: not v, "tiling": lambda v: not v,
              "styles": lambda v: not v, "script_name": lambda v: v in (None, "", "None"),
              "script_args": lambda v: not v, "alwayson_scripts": lambda v: not any(
                  (s or {}).get("args") not in (None, [], [False]) for s in v.values()),
              "subseed_strength": lambda v: not v, "seed_resize_from_h": lambda v: v in (-1, 0),
              "seed_resize_from_w": lambda v: v in (-1, 0), "s_churn": lambda v: not v,
              "s_tmin": lambda v: not v, "s_tmax": lambda v: not v or v == float("inf"),
              "s_noise": lambda v: v == 1, "s_min_uncond": lambda v: not v, "save_images": lambda v: not v,
              "refiner_checkpoint": lambda v: v in ("", "None"), "resize_mode": lambda v: v == 0,
              "initial_noise_multiplier": lambda v: v == 1}
    for key, fine in checks.items():
        v = body.get(key)
        if v is not None and not fine(v):
            out[key] = v
    if not karras_ok:
        out["scheduler"] = body.get("scheduler")
    if sampler == "euler_a" and body.get("eta") not in (None, 1, 1.0):
        out["eta"] = body["eta"]  # our ancestral sampler always uses eta 1
    extra = {k: v for k, v in (body.get("override_settings") or {}).items()
             if not (k == "sd_model_checkpoint" and v in current_model)}
    if extra:
        out["override_settings"] = extra
    if img2img:
        if len(body.get("init_images") or []) > 1:
            out["init_images"] = f"{len(body['init_images'])} images: only the first is used"
        if body.get("mask"):
            if body.get("inpaint_full_res"):
                out["inpaint_full_res"] = True  # we always inpaint the whole picture
            if body.get("inpainting_fill") in (2, 3) and strength < 1:
                out["inpainting_fill"] = body["inpainting_fill"]
    return out


async def _generate(request: Request, body: _Common, img2img: bool) -> JSONResponse:
    state = request.app.state
    raw = body.model_dump()
    entry = state.models.entry
    sampler = body.sampler_name or body.sampler_index
    scheduler = (body.scheduler or "automatic").strip().lower()
    karras = SCHEDULERS.get(scheduler, (None, None))[1]
    kind, extra = "txt2img", {}
    if img2img:
        if not body.init_images:
            raise BadInput("img2img needs init_images (a list with one base64 image)")
        kind = "inpaint" if body.mask else "img2img"
        extra = {"image": body.init_images[0], "mask": body.mask,
                 "strength": 0.75 if body.denoising_strength is None else body.denoising_strength,
                 "mask_blur": body.mask_blur if body.mask else None,
                 "fill": 0 if body.inpainting_fill == 0 else 1, "invert_mask": bool(body.inpainting_mask_invert)}
    cfg = state.models.pipe.config
    ours = resolve_sampler(sampler)[0] if sampler else cfg.defaults.sampler
    spec = await asyncio.to_thread(  # decoding images: off the event loop
        build_spec, cfg, state.limits, kind=kind, prompt=body.prompt, negative_prompt=body.negative_prompt,
        seed=body.seed, steps=body.steps, sampler=sampler, cfg_scale=body.cfg_scale, width=body.width,
        height=body.height, karras=karras, eta=body.eta if body.eta is not None and ours == "ddim" else 0.0,
        batch=body.batch_size, n_iter=body.n_iter, **extra)
    ignored = _ignored(raw, spec.req.sampler, scheduler in SCHEDULERS, {entry.title, entry.name},
                       spec.strength, img2img)
    if ignored:
        log.warning("A1111 %s: ignored fields we cannot honour: %s", kind, ignored)
    job = state.queue.submit(spec, {"ignored": ignored})
    while not job.done_event.is_set():  # A1111 answers when the images are done
        await asyncio.sleep(0.05)
    if job.status == "failed":
        raise HTTPException(500, f"generation failed: {job.error}")
    r = spec.req
    seeds = [r.seed + i for i in range(spec.count)]
    info = {"prompt": r.prompt, "all_prompts": [r.prompt] * spec.count, "negative_prompt": r.negative_prompt,
            "all_negative_prompts": [r.negative_prompt] * spec.count, "seed": r.seed, "all_seeds": seeds,
            "subseed": r.seed, "all_subseeds": seeds, "subseed_strength": 0, "width": r.width, "height": r.height,
            "sampler_name": A1111_SAMPLERS.get(r.sampler, r.sampler), "cfg_scale": r.cfg, "steps": r.steps,
            "batch_size": spec.batch, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": entry.name, "sd_model_hash": entry.sha256[:10], "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": spec.strength if img2img else None,
            "extra_generation_params": {"Schedule type": "Karras" if r.karras else "Automatic"},
            "index_of_first_image": 0, "infotexts": [a1111_parameters(rec) for rec in job.records],
            "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": f"mezzotint {__version__}",
            "interrupted": job.status == "cancelled", "mezzotint_job": job.id, "mezzotint_ignored": ignored}
    if img2img and not body.include_init_images:
        raw["init_images"], raw["mask"] = None, None  # as A1111: not echoed unless asked
    images = [base64.b64encode(png).decode() for png in job.images] if body.send_images else []
    headers = {"X-Mezzotint-Ignored": ", ".join(ignored)} if ignored else None
    return JSONResponse({"images": images, "parameters": raw, "info": json.dumps(info)}, headers=headers)


@router.post("/txt2img", summary="Text to image, answered when done")
async def txt2img(body: Txt2ImgRequest, request: Request):
    return await _generate(request, body, img2img=False)


@router.post("/img2img", summary="Image to image; with `mask`, inpainting")
async def img2img(body: Img2ImgRequest, request: Request):
    return await _generate(request, body, img2img=True)


@router.get("/progress", summary="The running job: progress, ETA, preview")
def progress(request: Request, skip_current_image: bool = False):
    q = request.app.state.queue
    job = q.running
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                          "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                          "sampling_steps": 0, "mezzotint_queue": q.active()}}
    per = max(job.spec.steps_per_pass, 1)
    job_no = min(job.step // per, job.spec.n_iter - 1)
    png = None if skip_current_image else job.preview_png()
    return {"progress": job.step / job.total if job.total else 0.0, "eta_relative": job.eta or 0.0,
            "current_image": base64.b64encode(png).decode() if png else None, "textinfo": None,
            "state": {"skipped": False, "interrupted": job.cancel_event.is_set(), "stopping_generation": False,
                      "job": f"mezzotint {job.id}", "job_count": job.spec.n_iter,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                      "job_no": job_no, "sampling_step": job.step - job_no * per,
                      "sampling_steps": job.spec.steps_per_pass, "mezzotint_queue": q.active()}}


@router.post("/interrupt", summary="Stop the running job (its finished images are kept)")
def interrupt(request: Request):
    q = request.app.state.queue
    if q.running is not None:
        q.cancel(q.running)
    return {}


router.post("/skip", summary="As interrupt: a batch here is one pass")(interrupt)


@router.get("/samplers")
def samplers():
    return [{"name": a, "aliases": aliases, "options": SAMPLER_OPTIONS.get(n, {})} for n, a, aliases in sampler_names()]


@router.get("/schedulers")
def schedulers():
    return [{"name": k, "label": label, "aliases": None, "default_rho": 7.0 if k == "karras" else -1,
             "need_inner_model": False} for k, (label, _) in SCHEDULERS.items()]


@router.get("/sd-models")
def sd_models(request: Request):
    return [e.a1111() for e in request.app.state.models.entries()]


@router.get("/options")
def get_options(request: Request):
    e = request.app.state.models.entry
    return {**request.app.state.a1111_options, "sd_model_checkpoint": e.title, "sd_checkpoint_hash": e.sha256,
            "samples_format": "png", "CLIP_stop_at_last_layers": 1}


@router.post("/options", summary="Set options; sd_model_checkpoint switches the model")
def set_options(body: dict[str, Any], request: Request):
    state = request.app.state
    if "sd_model_checkpoint" in body:
        try:
            state.models.switch(body["sd_model_checkpoint"])
        except KeyError as e:
            raise BadInput(e.args[0]) from None
    others = {k: v for k, v in body.items() if k != "sd_model_checkpoint"}
    if others:
        log.warning("A1111 options stored but not used: %s", sorted(others))
        state.a1111_options.update(others)


@router.post("/png-info", summary="The parameters of a PNG (ours or A1111's)")
def png_info(body: PngInfoRequest):
    im, _ = decode_image(body.image, "image")
    text = {k: v for k, v in getattr(im, "text", {}).items()}
    geninfo = text.pop("parameters", None)
    return {"info": geninfo or "", "items": text, "parameters": parse_parameters(geninfo) if geninfo else {}}


@router.post("/interrogate", summary="Not supported: no captioning model")
def interrogate():
    raise HTTPException(501, "interrogate is not supported by mezzotint (no captioning model)")


@router.get("/cmd-flags")
def cmd_flags(request: Request):
    return request.app.state.cmd_flags


@router.get("/scripts")
def scripts():
    return {"txt2img": [], "img2img": []}


@router.get("/upscalers")
def upscalers():
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/embeddings")
def embeddings():
    return {"loaded": {}, "skipped": {}}


@router.get("/memory")
def memory():
    return {"ram": {}, "cuda": {}}


def _empty():
    return []


for _path in ("script-info", "loras", "prompt-styles", "sd-vae", "hypernetworks", "face-restorers",
              "realesrgan-models", "latent-upscale-modes"):
    router.get(f"/{_path}", summary="Nothing of this kind here")(_empty)
for _path in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):
    router.post(f"/{_path}", summary="Nothing to refresh: model folders are listed on each call")(lambda: None)


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """A1111's `parameters` text -> its fields, as A1111's PNG Info parses them."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(_PARAM.findall(lines[-1])) >= 3 else None
    if last is not None:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last or ""):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        m = re.fullmatch(r"(\d+)x(\d+)", value)
        if m:
            out[f"{key}-1"], out[f"{key}-2"] = m.group(1), m.group(2)
        else:
            out[key] = value
    return out


"""`mezzotint serve`: the FastAPI app. Native JSON API on the job queue, the A1111-compatible
routes (a1111.py), and the web page (static/)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from .inputs import BadInput, Limits, build_spec, sampler_names
from .jobs import TERMINAL, Job, JobQueue, QueueFull

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("mezzotint.server")


class JobRequest(BaseModel):
    """A job for the native API. Unknown fields are an error (a typo is not a default)."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"kind": "txt2img", "prompt": "a red circle to the left of a blue square", "seed": 7, "steps": 20}]})
    kind: Literal["txt2img", "img2img", "inpaint", "explain"] = Field(
        "txt2img", description="explain: one image plus its X-ray (trajectory and per-word heat maps)")
    prompt: str = Field(..., description="what to draw")
    negative_prompt: str = Field("", description="what to steer away from")
    seed: int | None = Field(None, description="image k of the job gets seed + k; absent or -1: random")
    steps: int | None = Field(None, ge=1, description="denoising steps (model default)")
    sampler: str | None = Field(None, description="our name (dpmpp_2m) or A1111's (DPM++ 2M); model default")
    cfg: float | None = Field(None, allow_inf_nan=False, description="guidance scale; 1 = none (model default)")
    width: int | None = Field(None, ge=1, description="pixels, a multiple of the autoencoder factor "
                              "(default: the model's, or the input image's for edits)")
    height: int | None = Field(None, ge=1, description="see width")
    karras: bool | None = Field(None, description="Karras sigma spacing (model default)")
    eta: float = Field(0.0, ge=0, allow_inf_nan=False, description="ddim noise, 0..1")
    guidance_rescale: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                           description="guidance rescale phi, 0..1 (model default)")
    layout_guidance: float | None = Field(None, ge=0, allow_inf_nan=False,
                                          description="layout guidance strength (models with a layout map; "
                                          "0 = off; model default)")
    layout_candidates: int | None = Field(None, ge=1, description="initial noises per image to choose among "
                                          "by the layout map (models with one; 1 = off; model default)")
    batch: int = Field(1, ge=1, description="images, in one forward pass")
    strength: float | None = Field(None, ge=0, le=1, description="edits: how much to change, 0..1 "
                                   "(default 0.75 img2img, 1 inpaint)")
    mask_blur: float | None = Field(None, ge=0, description="inpaint: soft edge in pixels")
    image: str | None = Field(None, description="img2img / inpaint input: base64 image or data: URL")
    mask: str | None = Field(None, description="inpaint: base64 mask, white = regenerate, black = keep")


# -- middleware: pure ASGI, so that they run before any body is read ---------------------------

def _json_response(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class TokenAuth:
    """With --token, /api/ and /sdapi/ need `Authorization: Bearer TOKEN`, or HTTP basic auth
    with the token as password (webuiapi's set_auth). The page and its files stay public."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    def _ok(self, header: str) -> bool:
        scheme, _, cred = header.partition(" ")
        if scheme.lower() == "bearer":
            return secrets.compare_digest(cred.strip().encode(), self.token)
        if scheme.lower() == "basic":
            try:
                password = base64.b64decode(cred.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
            return secrets.compare_digest(password, self.token)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(("/api/", "/sdapi/")):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self._ok(header):
                resp = _json_response(401, "missing or wrong token: send `Authorization: Bearer TOKEN`",
                                      {"WWW-Authenticate": 'Bearer realm="mezzotint"'})
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over --max-body-mb: by Content-Length up front, or while streaming in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = f"request body over this server's limit of {self.max / 2**20:g} MB (--max-body-mb)"
        if length is not None and not length.isdigit():
            return await _json_response(400, "bad Content-Length header")(scope, receive, send)
        if length is not None and int(length) > self.max:
            return await _json_response(413, too_big)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max:
                raise HTTPException(413, too_big)
            return message
        return await self.app(scope, counted, send)


def host_warning(host: str, token: str | None) -> str | None:
    if token or host in ("127.0.0.1", "::1", "localhost") or host.startswith("127."):
        return None
    return (f"warning: serving on {host} without --token: anyone who can reach this port can use the "
            "server (add --token, or keep --host 127.0.0.1)")


# -- the app -----------------------------------------------------------------------------------

def create_app(models, limits: Limits | None = None, token: str | None = None,
               workdir: Path | None = None) -> FastAPI:
    import contextlib
    import tempfile
    limits = limits or Limits()
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="mezzotint-serve-")) if own_tmp else Path(workdir)
    queue = JobQueue(models, limits, workdir)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        queue.start()
        yield
        await asyncio.to_thread(queue.stop)
        if own_tmp:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)

    app = FastAPI(title="mezzotint", version=__version__, lifespan=lifespan,
                  description="Text-to-image latent diffusion: a native job API (/api/v1), "
                  "AUTOMATIC1111-compatible routes (/sdapi/v1) and a web page (/).")
    app.state.queue, app.state.models, app.state.limits = queue, models, limits
    app.state.a1111_options = {}  # options A1111 clients set that we keep but do not use
    app.state.cmd_flags = {"api": True, "nowebui": False, "ckpt": str(models.entry.path),
                           "ckpt_dir": str(models.models_dir) if models.models_dir else None}
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if token:
        app.add_middleware(TokenAuth, token=token)  # added last: runs first

    @app.exception_handler(BadInput)
    async def _bad_input(request, exc: BadInput):
        return _json_response(400, str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request, exc: QueueFull):
        return _json_response(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        bad_json = [e for e in errors if e["type"] == "json_invalid"]
        if bad_json:
            return _json_response(400, f"malformed JSON: {bad_json[0]['msg']}")
        text = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                         for e in errors)
        return JSONResponse({"detail": text, "errors": jsonable_encoder(errors)}, status_code=422)

    def job_or_404(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (unknown, or old and forgotten)")
        return job

    def job_json(job: Job) -> dict:
        return job.to_json(queue.position(job) if job.status == "queued" else None)

    @app.get("/api/v1/info", tags=["native"], summary="The loaded model, its defaults, samplers, limits")
    def info():
        cfg, e = models.pipe.config, models.entry
        return {"version": __version__, "model": {"name": e.name, "title": e.title, "config_name": cfg.name},
                "defaults": asdict(cfg.defaults), "factor": cfg.vae.factor,
                "limits": asdict(limits) | {"max_body_bytes": limits.max_body_bytes},
                "samplers": [{"name": n, "a1111": a} for n, a, _ in sampler_names()],
                "queue": {"pending": queue.active() - (queue.running is not None),
                          "running": queue.running.id if queue.running else None}}

    @app.post("/api/v1/jobs", status_code=202, tags=["native"], summary="Queue a job; returns its id")
    def submit(body: JobRequest, response: Response):
        spec = build_spec(models.pipe.config, limits, kind=body.kind, prompt=body.prompt,
                          negative_prompt=body.negative_prompt, seed=body.seed, steps=body.steps,
                          sampler=body.sampler, cfg_scale=body.cfg, width=body.width, height=body.height,
                          guidance_rescale=body.guidance_rescale, layout_guidance=body.layout_guidance,
                          layout_candidates=body.layout_candidates,
                          karras=body.karras, eta=body.eta, batch=body.batch, image=body.image,
                          mask=body.mask, strength=body.strength, mask_blur=body.mask_blur)
        job = queue.submit(spec)
        response.headers["Location"] = f"/api/v1/jobs/{job.id}"
        return job_json(job)

    @app.get("/api/v1/jobs", tags=["native"], summary="Recent jobs, oldest first")
    def list_jobs():
        return [job_json(j) for j in queue.jobs()]

    @app.get("/api/v1/jobs/{job_id}", tags=["native"], summary="Status: step i of n, ETA, error, results")
    def status(job_id: str):
        return job_json(job_or_404(job_id))

    def cancel(job_id: str):
        job = job_or_404(job_id)
        if not queue.cancel(job):
            raise HTTPException(409, f"job {job_id} already {job.status}")
        return job_json(job)

    app.delete("/api/v1/jobs/{job_id}", tags=["native"], summary="Cancel a job")(cancel)
    app.post("/api/v1/jobs/{job_id}/cancel", tags=["native"], summary="Cancel a job")(cancel)

    @app.get("/api/v1/jobs/{job_id}/preview", tags=["native"], response_class=Response,
             summary="PNG of the latest predicted image (a finished job: its first image)")
    def preview(job_id: str):
        png = job_or_404(job_id).preview_png()
        if png is None:
            raise HTTPException(404, "no preview yet: no denoising step has finished")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/v1/jobs/{job_id}/images/{k}", tags=["native"], response_class=Response,
             summary="Result image k: PNG with the CLI's metadata chunks (parameters, mezzotint)")
    def image(job_id: str, k: int):
        job = job_or_404(job_id)
        if not 0 <= k < len(job.images):
            raise HTTPException(404, f"job {job_id} has {len(job.images)} images ({job.status}); no image {k}")
        return Response(job.images[k], media_type="image/png")

    @app.get("/api/v1/jobs/{job_id}/explain", tags=["native"],
             summary="An explain job's X-ray: explain.json plus the URLs of its files")
    def explain_index(job_id: str):
        job = job_or_404(job_id)
        if job.explain_dir is None:
            raise HTTPException(404, f"job {job_id} has no X-ray ({job.kind}, {job.status})")
        meta = json.loads((job.explain_dir / "explain.json").read_text())
        base = f"/api/v1/jobs/{job_id}/explain/"
        meta["files"] = {p.name: base + p.name for p in sorted(job.explain_dir.iterdir())}
        for w in meta.get("words", []):
            w["url"] = base + w["file"]
        return meta

    @app.get("/api/v1/jobs/{job_id}/explain/{name}", tags=["native"], summary="One file of the X-ray folder")
    def explain_file(job_id: str, name: str):
        job = job_or_404(job_id)
        path = job.explain_dir / name if job.explain_dir and re.fullmatch(r"[\w-]+\.\w+", name) else None
        if path is None or not path.is_file():
            raise HTTPException(404, f"no X-ray file {name!r} for job {job_id}")
        return FileResponse(path)

    @app.get("/api/v1/jobs/{job_id}/events", tags=["native"],
             summary="Progress as Server-Sent Events (queued, progress, then done / failed / cancelled)")
    async def events(job_id: str, preview: bool = False):
        job = job_or_404(job_id)

        async def stream():
            seen, sent_step, quiet = -1, -1, 0.0
            while True:
                if job.version != seen:
                    seen, quiet = job.version, 0.0
                    data = job_json(job)  # a snapshot: the job moves on while we decode a preview
                    status = data["status"]
                    if preview and status == "running" and data["step"] != sent_step:
                        png = await asyncio.to_thread(job.preview_png)
                        if png is not None:
                            data["preview"], sent_step = base64.b64encode(png).decode(), data["step"]
                    kind = status if status in TERMINAL else ("progress" if status == "running" else "queued")
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if status in TERMINAL:
                        return
                await asyncio.sleep(0.05)
                quiet += 0.05
                if quiet > 15:  # a comment keeps proxies from closing an idle stream
                    quiet = 0.0
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    from .a1111 import router
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app

"""The job queue: one worker thread runs jobs in order, since a generation already uses every
core (or the GPU); the queue in front of it is bounded so that overload gets a 503, not a crash."""
from __future__ import annotations

import io
import logging
import math
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict
from pathlib import Path

from ..metadata import a1111_parameters, png_bytes
from .inputs import JobSpec

log = logging.getLogger("mezzotint.server")
TERMINAL = ("done", "failed", "cancelled")


class Cancelled(Exception):
    """Raised inside the sampler's callback: aborts the run at the next step."""


class QueueFull(Exception):
    def __init__(self, retry_after: int, pending: int):
        super().__init__(f"the queue is full ({pending} jobs waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class Job:
    def __init__(self, spec: JobSpec, meta: dict | None = None):
        self.id = uuid.uuid4().hex[:16]
        self.spec, self.kind, self.meta = spec, spec.kind, meta or {}
        self.status, self.error = "queued", None
        self.step, self.total = 0, spec.steps_per_pass * spec.n_iter
        self.created, self.started, self.finished = time.time(), None, None
        self.images: list[bytes] = []  # PNGs with their metadata chunks, as the CLI writes them
        self.records: list[dict] = []
        self.explain_dir: Path | None = None
        self.cancel_event, self.done_event = threading.Event(), threading.Event()
        self.version = 0  # bumped on every change; event streams poll it
        self._preview_src = None  # (step, callable making the PIL preview)
        self._preview_png = None  # (step, PNG bytes)

    def touch(self) -> None:
        self.version += 1

    @property
    def eta(self) -> float | None:
        if self.status != "running" or not self.step:
            return None
        return (time.time() - self.started) / self.step * max(self.total - self.step, 0)

    def preview_png(self) -> bytes | None:
        """The latest predicted clean image (first of the batch); a finished job's first image."""
        if self.status in TERMINAL:
            return self.images[0] if self.images else None
        src = self._preview_src
        if src is None:
            return None
        cached = self._preview_png
        if cached is not None and cached[0] == src[0]:
            return cached[1]
        buf = io.BytesIO()
        src[1]().save(buf, format="PNG")
        self._preview_png = (src[0], buf.getvalue())
        return self._preview_png[1]

    def to_json(self, position: int | None = None) -> dict:
        base = f"/api/v1/jobs/{self.id}"
        status, step = self.status, self.step  # read once: the worker moves on meanwhile
        now = self.finished or time.time()
        return {
            "id": self.id, "kind": self.kind, "status": status, "position": position,
            "step": step, "steps": self.total,
            "progress": 1.0 if status == "done" else (step / self.total if self.total else 0.0),
            "eta": self.eta, "elapsed": None if self.started is None else now - self.started,
            "error": self.error, "request": asdict(self.spec.req), "count": self.spec.count,
            "edit": self.spec.edit, "images": [f"{base}/images/{k}" for k in range(len(self.images))],
            "seeds": [r["request"]["seed"] for r in self.records],
            "parameters": [a1111_parameters(r) for r in self.records],
            "explain": f"{base}/explain" if self.explain_dir else None,
            "ignored": self.meta.get("ignored") or None,
        }


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


class JobQueue:
    def __init__(self, models, limits, workdir: Path, keep: int = 200):
        self.models, self.limits, self.workdir, self.keep = models, limits, Path(workdir), keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._durations: deque[float] = deque(maxlen=20)
        self.running: Job | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- the client side ------------------------------------------------------------------

    def submit(self, spec: JobSpec, meta: dict | None = None) -> Job:
        with self._cv:
            if len(self._pending) >= self.limits.max_queue:
                raise QueueFull(self.retry_after(), len(self._pending))
            job = Job(spec, meta)
            self._jobs[job.id] = job
            self._pending.append(job)
            self._cv.notify()
            return job

    def retry_after(self) -> int:
        """Seconds until a place frees, from the recent job durations."""
        avg = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return int(min(600, max(1, math.ceil(avg))))

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._cv:  # the worker prunes old jobs
            return list(self._jobs.values())

    def position(self, job: Job) -> int | None:
        with self._cv:
            try:
                return self._pending.index(job)
            except ValueError:
                return None

    def active(self) -> int:
        return len(self._pending) + (self.running is not None)

    def cancel(self, job: Job) -> bool:
        """True if the job is (or will shortly be) cancelled; False if it had already finished."""
        with self._cv:
            if job.status == "queued":
                self._pending.remove(job)
                self._finish(job, "cancelled", None)
                return True
            if job.status == "running":
                job.cancel_event.set()
                return True
            return job.status == "cancelled"

    # -- the worker -------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="mezzotint-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        with self._cv:
            self._stop = True
            if self.running is not None:
                self.running.cancel_event.set()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._pending.popleft()
                job.status, job.started, self.running = "running", time.time(), job
                job.touch()
            status, error = "done", None
            try:
                self._run(job)
            except Cancelled:
                status = "cancelled"
            except Exception as e:  # a failing job must never take the worker down
                log.exception("job %s failed", job.id)
                status, error = "failed", _message(e)
            with self._cv:
                self.running = None
                self._finish(job, status, error)
                if status == "done":
                    self._durations.append(job.finished - job.started)

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        job.spec.image = job.spec.mask = None  # inputs are no longer needed
        job._preview_src = None
        job.touch()
        job.done_event.set()
        done = [j for j in self._jobs.values() if j.status in TERMINAL]
        for old in done[: max(0, len(done) - self.keep)]:
            del self._jobs[old.id]
            if old.explain_dir is not None:
                shutil.rmtree(old.explain_dir, ignore_errors=True)

    def _run(self, job: Job) -> None:
        pipe, spec = self.models.pipe, job.spec

        def step(make_preview) -> None:
            job.step += 1
            job._preview_src = (job.step, make_preview)
            job.touch()
            if job.cancel_event.is_set():
                raise Cancelled()

        if spec.kind == "explain":
            from ..explain import explain
            expl = explain(pipe, spec.req, on_step=lambda info: step(info["preview"]))
            folder = expl.save(self.workdir / job.id)
            self._add(job, expl.result.image, pipe.record(expl.result.request))
            job.explain_dir = folder
            return

        def callback(info) -> None:
            z = info["denoised"][:1].detach().clone()
            step(lambda: pipe.decode(z)[0])

        for j in range(spec.n_iter):
            if job.cancel_event.is_set():
                raise Cancelled()
            req = spec.req.for_image(j * spec.batch)  # image i always gets seed + i
            prompts = [req.prompt] * spec.batch
            if spec.kind == "txt2img":
                results = pipe(req, prompts, callback)
            elif spec.kind == "img2img":
                results = pipe.img2img(req, spec.image, spec.strength, prompts, callback)
            else:
                results = pipe.inpaint(req, spec.image, spec.mask, spec.strength, spec.mask_blur, prompts, callback)
            for res in results:
                self._add(job, res.image, pipe.record(res.request, spec.edit))

    def _add(self, job: Job, image, record: dict) -> None:
        job.images.append(png_bytes(image, record))
        job.records.append(record)
        job.touch()

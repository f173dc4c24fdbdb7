"""The models a server offers: the one it started with plus any in --models-dir; one is loaded."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("mezzotint.server")


@dataclass
class ModelEntry:
    name: str
    path: Path
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:  # hashing reads every weight: once per entry
            from ..checkpoints import model_hash
            self._sha256 = model_hash(self.path)
        return self._sha256

    @property
    def title(self) -> str:  # A1111's checkpoint title: "name [first 10 hex of sha256]"
        return f"{self.name} [{self.sha256[:10]}]"

    def a1111(self) -> dict:
        return {"title": self.title, "model_name": self.name, "hash": self.sha256[:10],
                "sha256": self.sha256, "filename": str(self.path), "config": None}


class Models:
    """Holds the loaded Pipeline. A switch loads the new model first and swaps the reference,
    so a job already running keeps the pipeline it started with."""

    def __init__(self, default: Path, models_dir: Path | None = None, device: str = "cpu",
                 dtype: str | None = None, pipe=None):
        """`pipe`: `default` already loaded (tests share one)."""
        from ..pipeline import Pipeline
        self.device, self.dtype, self.models_dir = device, dtype, models_dir
        self._known: dict[Path, ModelEntry] = {}
        self._lock = threading.Lock()
        self.entry = self.default = self._entry(Path(default))
        self.pipe = pipe or Pipeline.load(self.entry.path, device=device, dtype=dtype)
        self.entry._sha256 = self.pipe.model_hash  # hashed once, here, not on a request

    def _entry(self, path: Path) -> ModelEntry:
        path = path.resolve()
        if path not in self._known:
            name = path.stem if path.is_file() else path.name
            self._known[path] = ModelEntry(name, path)
        return self._known[path]

    def entries(self) -> list[ModelEntry]:
        from ..checkpoints import ModelError, read_config
        from ..sd import is_sd_checkpoint, read_sd_config
        out = [self.default]
        if self.models_dir and self.models_dir.is_dir():
            for p in sorted(self.models_dir.iterdir()):
                ours = p.suffix == ".safetensors" or (p / "model.json").is_file()
                if not ours and p.suffix != ".ckpt" and not (p / "model_index.json").is_file():
                    continue
                try:  # headers only: skips broken or foreign checkpoints
                    read_sd_config(p) if is_sd_checkpoint(p) else read_config(p)
                except (ModelError, ValueError, OSError) as e:
                    log.warning("models dir: skipping %s (%s)", p, e)
                    continue
                e = self._entry(p)
                if e is not self.default:
                    out.append(e)
        return out

    def find(self, key: str) -> ModelEntry:
        """By title, name, file name, full or short hash (A1111's checkpoint aliases)."""
        key = str(key).strip()
        for e in self.entries():
            if key in (e.title, e.name, str(e.path), e.path.name) or key.lower() in (e.sha256, e.sha256[:10]):
                return e
        names = ", ".join(e.title for e in self.entries())
        raise KeyError(f"model {key!r} not found; available: {names}")

    def switch(self, key: str) -> ModelEntry:
        from ..pipeline import Pipeline
        entry = self.find(key)
        with self._lock:
            if entry is not self.entry:
                log.info("loading model %s", entry.path)
                pipe = Pipeline.load(entry.path, device=self.device, dtype=self.dtype)
                entry._sha256 = pipe.model_hash
                self.pipe, self.entry = pipe, entry
        return entry

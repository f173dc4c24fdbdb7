"""Reading weight files: safetensors (memory-mapped) and .ckpt / .pt / .bin through
torch.load(weights_only=True, mmap=True), which refuses pickled code."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from ..checkpoints import ModelError

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_tensors(path, cast: torch.dtype | None = None, keep: tuple[str, ...] = ()
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """(name -> memory-mapped tensor, extras) of a .safetensors or a weights-only .ckpt.

    extras: "metadata" (safetensors header strings) and "global_step" (.ckpt, if saved).
    cast: a .safetensors file's floating tensors (but those named with a prefix in `keep`)
    are read one by one with plain reads and converted: the file's pages are never mapped,
    so a float32 file loaded as bfloat16 never holds both copies.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            if cast is not None:
                return _read_cast(path, cast, keep), {"metadata": meta}
            return load_file(path), {"metadata": meta}
        except Exception as e:  # safetensors raises its own error types
            raise ModelError(f"{path}: corrupt safetensors file ({e})") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise ModelError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors or .ckpt")
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        # weights_only refuses any pickled class or call: loading it would run code
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        first = f"it names {found[1]}" if found else str(e).strip().splitlines()[-1][:200]
        raise ModelError(f"{path}: refusing to load: the file holds pickled Python objects, not only tensors, "
                         f"and unpickling them can run code ({first}). Convert it to .safetensors with a "
                         "tool you trust.") from None
    except Exception as e:
        raise ModelError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: not a state dict (a {type(obj).__name__})")
    extras = {"global_step": obj.get("global_step")}
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise ModelError(f"{path}: 'state_dict' is not a dict")
    return {k: v for k, v in sd.items() if isinstance(k, str) and torch.is_tensor(v)}, extras


_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def _read_cast(path: Path, cast: torch.dtype, keep: tuple[str, ...]) -> dict[str, torch.Tensor]:
    import json
    import struct
    out = {}
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        items = [(k, v) for k, v in header.items() if k != "__metadata__"]
        # one read buffer for all tensors: fresh pages cost a fault each (on these VMs about
        # 6 us per 4 KiB once the page cache is full), reused ones nothing
        buf = bytearray(max((b - a for a, b in (v["data_offsets"] for _, v in items)), default=0))
        for name, info in items:
            a, b = info["data_offsets"]
            view = memoryview(buf)[:b - a]
            fh.seek(8 + n + a)
            if fh.readinto(view) != len(view):
                raise ValueError(f"{name} runs past the end of the file")
            dtype = _SAFE_DTYPES[info["dtype"]]
            t = torch.frombuffer(view, dtype=dtype).reshape(info["shape"]) if len(view) else \
                torch.empty(info["shape"], dtype=dtype)
            # the buffer is read over by the next tensor: whatever is kept is a copy
            out[name] = t.to(cast, copy=True) if t.is_floating_point() and not name.startswith(keep) else t.clone()
    return out


class _Dropped:
    """Stands in for a Lightning object in a training .ckpt (SD 1.x files key their callback
    state by the ModelCheckpoint class): built from nothing, runs nothing, thrown away."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _torch_load(path: Path):
    """torch.load(weights_only=True, mmap=True), plus what SD-era checkpoints hold besides
    tensors and that is only data: numpy scalars/arrays, and Lightning classes as stand-ins
    (A1111's safe unpickler allows the same). Any other global is still refused."""
    import codecs

    import numpy as np
    core = np._core if hasattr(np, "_core") else np.core
    allowed = [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray"), (codecs.encode, "_codecs.encode")]
    for mod in ("numpy.core", "numpy._core"):
        allowed += [(core.multiarray.scalar, f"{mod}.multiarray.scalar"),
                    (core.multiarray._reconstruct, f"{mod}.multiarray._reconstruct")]
    if hasattr(np, "dtypes"):  # numpy >= 1.25 builds each dtype as its own class
        allowed += [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # unreadable: torch.load below says why
        names = []
    for name in names:
        if name.startswith(("pytorch_lightning.", "lightning.")):
            allowed.append((_Dropped, name))
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class _Shape:
    """Stands in for a tensor where only its shape is read (configs from a file header)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)
        self.ndim = len(self.shape)


def read_header(path: Path) -> tuple[dict, dict]:
    """Names -> shapes without reading weights (safetensors header; a .ckpt is memory-mapped)."""
    if path.suffix != ".safetensors":
        return read_tensors(path)
    from safetensors import safe_open
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            return {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}, {"metadata": f.metadata() or {}}
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"{path}: corrupt safetensors file ({e})") from None

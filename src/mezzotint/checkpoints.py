"""Our model format: data only (safetensors + JSON), never pickle.

A model is a folder:
    model.json          {"format": "mezzotint/1", "config": ModelConfig as a dict}
    unet.safetensors    UNet weights
    vae.safetensors     autoencoder weights
    text_encoder/       optional: a bundled text encoder (config.text.path may point here)
or one .safetensors file with keys "unet.*" and "vae.*" and the same JSON in its
metadata under "mezzotint". Weights are memory-mapped and assigned into modules
built on the meta device, so loading never holds two copies.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .unet import UNet
from .vae import AutoencoderKL

FORMAT = "mezzotint/1"
PARTS = ("unet", "vae")


class ModelError(ValueError):
    """A model path that is missing, corrupt, or not in a format we read."""


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename over `path`, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # unwrap DDP / torch.compile so keys carry no "module." or "_orig_mod." prefix
    module = getattr(module, "module", module)
    module = getattr(module, "_orig_mod", module)
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_model(path, unet, vae, config: ModelConfig) -> Path:
    path = Path(path)
    meta = json.dumps({"format": FORMAT, "config": config.to_dict()}, indent=1)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{k}": v for name, m in zip(PARTS, (unet, vae)) for k, v in _state(m).items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"mezzotint": meta}))
        return path
    path.mkdir(parents=True, exist_ok=True)
    for name, m in zip(PARTS, (unet, vae)):
        atomic_write(path / f"{name}.safetensors", lambda tmp, m=m: save_file(_state(m), tmp))
    atomic_write(path / "model.json", lambda tmp: Path(tmp).write_text(meta))
    return path


def _parse_meta(text: str, where) -> ModelConfig:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{where}: corrupt model config ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{where}: not a {FORMAT} model (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    try:
        return ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{where}: bad model config: {e}") from None


def _check_tensors(file: Path) -> None:
    """Open the safetensors header: cheap, and catches truncated or foreign files."""
    if not file.is_file():
        raise ModelError(f"missing model file: {file}")
    try:
        with safe_open(file, "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"{file}: corrupt safetensors file ({e})") from None


def read_config(path) -> ModelConfig:
    """The model's config, after checking that its files are all there and readable. No weights are read."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    if path.is_file():
        _check_tensors(path)
        with safe_open(path, "pt") as f:
            text = (f.metadata() or {}).get("mezzotint")
        if text is None:
            raise ModelError(f"{path}: no mezzotint config in the file's metadata "
                             "(a Stable Diffusion checkpoint? convert it first)")
        return _parse_meta(text, path)
    meta = path / "model.json"
    if not meta.is_file():
        raise ModelError(f"{path}: no model.json: not a mezzotint model folder")
    cfg = _parse_meta(meta.read_text(), meta)
    for name in PARTS:
        _check_tensors(path / f"{name}.safetensors")
    return cfg


ALIGN = 64  # bytes: what PyTorch's CPU allocator gives


def _aligned(state: dict, device, dtype) -> dict:
    """The state with each tensor that would be used in place (CPU, its own dtype) at an
    ALIGN-byte address: a safetensors file packs tensors back to back, and on the CPU the GEMM
    and conv kernels take other paths (and round differently) for weights that are not aligned,
    so the same weights in two files (a model and its fit-layout copy) gave images 1e-6 apart.
    Parts as large as those that stream (pages.STREAM_MIN_BYTES) keep their mapping: no second
    copy of a large model, and streaming needs file pages."""
    from . import pages
    if torch.device(device).type != "cpu" or sum(v.nbytes for v in state.values()) >= pages.STREAM_MIN_BYTES:
        return state
    return {k: v.clone() if v.dtype == dtype and v.data_ptr() % ALIGN else v for k, v in state.items()}


def _build(cls, cfg, state: dict, name: str, where, device, dtype, align: bool = False):
    """align: our own format (see _aligned); Stable Diffusion files are left mapped."""
    if align:
        state = _aligned(state, device, dtype)
    with torch.device("meta"):
        module = cls(cfg)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"{where}: {name} weights do not fit its config: {str(e).splitlines()[0]}") from None
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_model(path, device="cpu", dtype=torch.float32) -> tuple[UNet, AutoencoderKL, ModelConfig]:
    path = Path(path)
    cfg = read_config(path)
    if path.is_file():
        flat = load_file(path)  # memory-mapped
        states = {n: {k[len(n) + 1:]: v for k, v in flat.items() if k.startswith(n + ".")} for n in PARTS}
    else:
        states = {n: load_file(path / f"{n}.safetensors") for n in PARTS}
    unet = _build(UNet, cfg.unet, states["unet"], "UNet", path, device, dtype, align=True)
    vae = _build(AutoencoderKL, cfg.vae, states["vae"], "VAE", path, device, dtype, align=True)
    return unet, vae, cfg


def model_hash(path) -> str:
    """sha256 of the weight files (A1111 shows the first 10 hex digits as "Model hash")."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / "unet.safetensors").is_file():
        files = [path / f"{n}.safetensors" for n in PARTS]
    else:  # a diffusers folder: every weight file, in a fixed order
        files = sorted(f for f in path.rglob("*") if f.suffix in (".safetensors", ".bin") and f.is_file())
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def save_vae(folder, vae, cfg) -> Path:
    """An autoencoder on its own (what `train-vae` makes): vae.json + vae.safetensors."""
    import dataclasses
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "vae.safetensors", lambda tmp: save_file(_state(vae), tmp))
    meta = json.dumps({"format": FORMAT + "-vae", "config": dataclasses.asdict(cfg)}, indent=1)
    atomic_write(folder / "vae.json", lambda tmp: Path(tmp).write_text(meta))
    return folder


def load_vae(path, device="cpu", dtype=torch.float32) -> AutoencoderKL:
    """The autoencoder of a model folder, or of a folder written by save_vae."""
    from .config import VAEConfig, from_dict
    path = Path(path)
    if (path / "vae.json").is_file():
        text = (path / "vae.json").read_text()
        try:
            cfg = from_dict(VAEConfig, json.loads(text)["config"])
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{path / 'vae.json'}: bad autoencoder config: {e}") from None
    else:
        cfg = read_config(path).vae
    file = path / "vae.safetensors"
    _check_tensors(file)
    return _build(AutoencoderKL, cfg, load_file(file), "VAE", path, device, dtype, align=True)

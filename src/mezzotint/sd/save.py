"""Writing Stable Diffusion models: a diffusers folder, our own folder with the CLIP text
encoder bundled, or an original-layout single file; and `convert` between them.

Every writer fills a temporary folder beside the target and renames it into place, so a
failed conversion leaves nothing half written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import checkpoints
from ..checkpoints import ModelError, _state
from ..config import ModelConfig
from . import keys as K
from .dconfig import DIFFUSERS_VERSION, diffusers_configs
from .tokenizer import save_tokenizer

TEXT_FOLDER = "text_encoder"


def _fresh(dst: Path) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ModelError(f"output {dst} exists and is not an empty folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder it becomes should not be
    return tmp


def _publish(tmp: Path, dst: Path) -> Path:
    if dst.exists():
        dst.rmdir()  # checked empty by _fresh
    os.replace(tmp, dst)
    return dst


def _writing(dst, fill) -> Path:
    dst = Path(dst)
    tmp = _fresh(dst)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, dst)


def _clip_only(text, what: str):
    if text.cfg.kind != "clip" or text.cfg.layer != -1:
        raise ModelError(f"{what} needs a CLIP text encoder used at its last layer "
                         f"(this model's: kind={text.cfg.kind!r}, layer={text.cfg.layer})")


def _dump(file: Path, data: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2) + "\n")


def save_diffusers(folder, unet, vae, text, cfg: ModelConfig) -> Path:
    """A folder that diffusers' StableDiffusionPipeline.from_pretrained loads."""
    _clip_only(text, "a diffusers StableDiffusionPipeline")
    configs = diffusers_configs(cfg)

    def fill(tmp: Path):
        _dump(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]})
        for name, module in (("unet", unet), ("vae", vae)):
            _dump(tmp / name / "config.json", configs[name])
            save_file(_state(module), tmp / name / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        _dump(tmp / "scheduler" / "scheduler_config.json", configs["scheduler"])
        text.model.save_pretrained(tmp / "text_encoder")
        save_tokenizer(text.tokenizer, tmp / "tokenizer")

    return _writing(folder, fill)


def save_mezzotint(folder, unet, vae, text, cfg: ModelConfig) -> Path:
    """Our model folder with the text encoder (model + tokenizer) bundled in text_encoder/,
    which config.text.path names relative to the folder; Pipeline.load reads it as is."""
    cfg = replace(cfg, text=replace(cfg.text, path=TEXT_FOLDER))

    def fill(tmp: Path):
        checkpoints.save_model(tmp, unet, vae, cfg)
        text.model.save_pretrained(tmp / TEXT_FOLDER)
        save_tokenizer(text.tokenizer, tmp / TEXT_FOLDER)

    return _writing(folder, fill)


def original_state_dict(unet, vae, text, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights under the CompVis / Stability single-file names (SD 1.x CLIP or, for a
    gelu text encoder, SD 2.x OpenCLIP layout)."""
    _clip_only(text, "the original single-file layout")
    out = {K.UNET_PREFIX + K.unet_key(k, cfg.unet)[0]: v for k, v in _state(unet).items()}
    for k, v in _state(vae).items():
        name = K.vae_key(k, cfg.vae)[0]
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original autoencoder attends with 1x1 convs
        out[K.VAE_PREFIX + name] = v
    openclip = text.model.config.hidden_act == "gelu"
    if not openclip:
        out.update({K.CLIP_PREFIX + K.clip_key(k)[0]: v for k, v in _state(text.model).items()})
        return out
    parts: dict[str, list] = {}
    for k, v in _state(text.model).items():
        name, part = K.openclip_key(k)
        if part is None:
            out[K.OPENCLIP_PREFIX + name] = v
        else:
            parts.setdefault(name, [None] * part[1])[part[0]] = v
    out.update({K.OPENCLIP_PREFIX + n: torch.cat(p) for n, p in parts.items()})
    # SD 2.x reads the penultimate layer: OpenCLIP's last resblock is unused. Written as a
    # copy of the one before, so the file has the shape the original code builds.
    n = text.model.config.num_hidden_layers
    last = f"{K.OPENCLIP_PREFIX}transformer.resblocks.{n - 1}."
    for k in [k for k in out if k.startswith(last)]:
        out[k.replace(last, f"{K.OPENCLIP_PREFIX}transformer.resblocks.{n}.")] = out[k].clone()
    return out


def save_single_file(path, unet, vae, text, cfg: ModelConfig) -> Path:
    """An original-layout .safetensors that SD tools (A1111, ComfyUI, diffusers' from_single_file) read."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: a single-file checkpoint is written as .safetensors")
    if path.exists():
        raise ModelError(f"output {path} exists")
    tensors = original_state_dict(unet, vae, text, cfg)
    meta = {"modelspec.prediction_type": {"eps": "epsilon", "v": "v"}[cfg.scheduler.prediction_type]}
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


TARGETS = ("mezzotint", "diffusers", "original")


def convert(src, dst, to: str = "mezzotint", prediction: str | None = None) -> Path:
    """Convert a model: SD single file, diffusers folder or mezzotint model -> `to` at dst.

    to: "mezzotint" (our folder + text_encoder/), "diffusers" (a StableDiffusionPipeline
    folder) or "original" (one .safetensors in the CompVis layout). Weights keep their dtype.
    `prediction` overrides an SD source's eps / v (see load_sd).
    """
    from ..text import load_text_encoder
    from .load import is_sd_checkpoint, load_sd
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; allowed: {', '.join(TARGETS)}")
    src, dst = Path(src), Path(dst)
    if is_sd_checkpoint(src):
        unet, vae, text, cfg = load_sd(src, "cpu", None, prediction)
    else:
        unet, vae, cfg = checkpoints.load_model(src, "cpu", None)
        if prediction is not None:
            raise ValueError("prediction applies to Stable Diffusion sources only")
        text = load_text_encoder(cfg.text, src if src.is_dir() else src.parent)
    writer = {"mezzotint": save_mezzotint, "diffusers": save_diffusers, "original": save_single_file}[to]
    return writer(dst, unet, vae, text, cfg)

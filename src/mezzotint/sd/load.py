"""Stable Diffusion 1.x / 2.x checkpoints: original single files and diffusers folders.

Weights are memory-mapped (safetensors, or torch.load(mmap=True, weights_only=True) for
.ckpt) and assigned into modules built on the meta device, so one copy exists at most.
The architecture comes from the tensors (single files) or the config.json files
(diffusers folders); what the tensors cannot tell follows diffusers' choices.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoints import ModelError, _build
from ..config import ModelConfig, SampleDefaults, SchedulerConfig, UNetConfig, VAEConfig
from ..text import TextEncoder
from ..unet import UNet
from ..vae import AutoencoderKL
from . import clip
from . import keys as K
from .dconfig import (
    PREDICTIONS,
    scheduler_from_diffusers,
    unet_config_from_diffusers,
    vae_config_from_diffusers,
)
from .tensors import TORCH_SUFFIXES, read_header, read_tensors
from .tokenizer import PAD_SD1, PAD_SD2, clip_tokenizer


def _prediction(value) -> str | None:
    if value is None:
        return None
    if value not in PREDICTIONS:
        raise ValueError(f"unknown prediction {value!r}; allowed: eps, v")
    return PREDICTIONS[value]


def _strip(sd: dict, prefix: str) -> dict:
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if prefix == K.CLIP_PREFIX and out and not any(k.startswith("text_model.") for k in out):
        # some SD 1.x files lack this level (A1111 renames them too)
        out = {"text_model." + k: v for k, v in out.items()}
    return out


def assemble(module: torch.nn.Module, table, src: dict, where, name: str, ignore=()) -> dict:
    """Our state dict for `module` (on meta) from `src` (original names), via `table`.

    Every parameter must be found with its shape, and every source key used or ignored:
    a key left over means an architecture this loader does not know.
    """
    state, used, missing = {}, set(), []
    for key, target in module.state_dict().items():
        okey, part = table(key)
        t = src.get(okey)
        if t is None:
            missing.append(okey)
            continue
        used.add(okey)
        if part is not None:
            t = t.chunk(part[1], dim=0)[part[0]].clone()  # a fused q/k/v: own storage per part
        if t.shape != target.shape:
            if t.numel() == target.numel() and t.ndim == 4 and target.ndim == 2:
                t = t.reshape(target.shape)  # 1x1 conv stored for a linear layer
            else:
                raise ModelError(f"{where}: {name} tensor {okey} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(target.shape)}")
        state[key] = t
    extra = sorted(k for k in src if k not in used and not any(re.fullmatch(p, k) for p in ignore))
    if missing or extra:
        what = (f"missing {len(missing)} tensors, e.g. {missing[:3]}" if missing else "") + \
               ("; " if missing and extra else "") + \
               (f"{len(extra)} unknown tensors, e.g. {extra[:3]}" if extra else "")
        raise ModelError(f"{where}: {name} does not match a supported architecture: {what}")
    return state


def build_clip(config_kwargs: dict, state_fn, device, dtype):
    """Our CLIPTextModel (sd/clip.py) filled by state_fn(model) -> its state dict."""
    model = clip.build(clip.config(**config_kwargs), state_fn)
    return model.to(device=device, dtype=dtype)


def _text_dtype(device, dtype):
    # as Pipeline.load: the text encoder stays float32 on the CPU; None keeps the stored dtype
    return dtype if dtype is None or torch.device(device).type != "cpu" else torch.float32


# -- single files -------------------------------------------------------------------------

def _sidecar_prediction(path: Path, extras: dict) -> str | None:
    """v or eps where the files say so: an A1111-style .yaml beside it (the user's word,
    first), or the file's modelspec metadata."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():  # the original config: parameterization defaults to eps there
        return "v" if re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", yaml.read_text(), re.MULTILINE) else "eps"
    meta = extras.get("metadata") or {}
    spec = meta.get("modelspec.prediction_type")
    if spec in PREDICTIONS:
        return PREDICTIONS[spec]
    if meta.get("modelspec.architecture", "").endswith("-v"):
        return "v"
    return None


def detect(sd: dict, where) -> str:
    """"sd1" or "sd2" from the tensor names and shapes, or a ModelError saying why not."""
    if any(k.startswith("conditioner.embedders.") for k in sd) or K.UNET_PREFIX + "label_emb.0.0.weight" in sd:
        raise ModelError(f"{where}: an SDXL (or other class-conditioned) checkpoint: not supported; "
                         "Stable Diffusion 1.x and 2.x are")
    if not any(k.startswith(K.UNET_PREFIX) for k in sd):
        raise ModelError(f"{where}: not a Stable Diffusion checkpoint (no {K.UNET_PREFIX}* tensors)")
    openclip = any(k.startswith(K.OPENCLIP_PREFIX) for k in sd)
    if not openclip and not any(k.startswith(K.CLIP_PREFIX) for k in sd):
        raise ModelError(f"{where}: no text encoder in the file (cond_stage_model.*): not supported")
    if not any(k.startswith(K.VAE_PREFIX) for k in sd):
        raise ModelError(f"{where}: no autoencoder in the file ({K.VAE_PREFIX}*): not supported")
    return "sd2" if openclip else "sd1"


def _sd_config(unet: UNetConfig, vae: VAEConfig, sd2: bool, prediction: str, name: str,
               size: int | None = None, scheduler: SchedulerConfig | None = None) -> ModelConfig:
    size = size or (768 if sd2 and prediction == "v" else 512)
    sched = scheduler or SchedulerConfig(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction, timestep_spacing="leading", steps_offset=1)  # SD's scheduler configs
    return ModelConfig(unet=unet, vae=vae, text=K.text_config(), scheduler=sched,
                       defaults=SampleDefaults(sampler="dpmpp_2m", steps=20, cfg=7.5, karras=True,
                                               width=size, height=size), name=name)


def _plan_single_file(path: Path, sd: dict, extras: dict, prediction):
    """(sd2?, CLIPTextConfig kwargs, ModelConfig) from tensor names and shapes alone."""
    sd2 = detect(sd, path) == "sd2"
    try:
        ucfg, vcfg = K.unet_config(_strip(sd, K.UNET_PREFIX), sd2), K.vae_config(_strip(sd, K.VAE_PREFIX))
        tkw = K.clip_config(_strip(sd, K.OPENCLIP_PREFIX if sd2 else K.CLIP_PREFIX), sd2)
    except (KeyError, ValueError, IndexError) as e:
        raise ModelError(f"{path}: unsupported Stable Diffusion layout ({type(e).__name__}: {e})") from None
    if ucfg.context_dim != tkw["hidden_size"]:
        raise ModelError(f"{path}: UNet cross-attention width {ucfg.context_dim} does not match the text "
                         f"encoder's {tkw['hidden_size']}")
    pred = _prediction(prediction) or _sidecar_prediction(path, extras)
    if pred is None:  # as diffusers: SD 2.x is the 768-v model unless it is 2.x-base's last step
        pred = "eps" if not sd2 or extras.get("global_step") == 875000 else "v"
    return sd2, tkw, _sd_config(ucfg, vcfg, sd2, pred, path.stem)


def _cast(dtype):
    """What to convert weights to while reading (None: keep the file's, memory-mapped)."""
    return None if dtype in (None, torch.float32) else dtype


def load_single_file(path, device="cpu", dtype=torch.float32, prediction=None):
    path = Path(path)
    # the text encoder's weights are left as stored when it stays float32 (see _text_dtype)
    keep = (K.CLIP_PREFIX, K.OPENCLIP_PREFIX) if _text_dtype(device, dtype) == torch.float32 else ()
    sd, extras = read_tensors(path, _cast(dtype), keep)
    sd2, tkw, cfg = _plan_single_file(path, sd, extras, prediction)
    ucfg, vcfg = cfg.unet, cfg.vae
    unet_src, vae_src = _strip(sd, K.UNET_PREFIX), _strip(sd, K.VAE_PREFIX)
    text_src = _strip(sd, K.OPENCLIP_PREFIX if sd2 else K.CLIP_PREFIX)
    del sd

    def unet_table(k):
        return K.unet_key(k, ucfg)

    def vae_table(k):
        return K.vae_key(k, vcfg)

    with torch.device("meta"):
        unet_meta, vae_meta = UNet(ucfg), AutoencoderKL(vcfg)
    unet = _build(UNet, ucfg, assemble(unet_meta, unet_table, unet_src, path, "UNet"), "UNet", path, device, dtype)
    vae = _build(AutoencoderKL, vcfg, assemble(vae_meta, vae_table, vae_src, path, "VAE", ignore=[r"loss\..*"]),
                 "VAE", path, device, dtype)
    if sd2:
        last = tkw["num_hidden_layers"]  # the dropped final resblock, and CLIP-training leftovers
        table, ignore = K.openclip_key, [rf"transformer\.resblocks\.{last}\..*", "text_projection", "logit_scale",
                                         "attn_mask"]
    else:
        table, ignore = K.clip_key, [r"text_model\.embeddings\.position_ids"]
    model = build_clip(tkw, lambda m: assemble(m, table, text_src, path, "text encoder", ignore),
                       device, _text_dtype(device, dtype))
    text = TextEncoder(cfg.text, clip_tokenizer(PAD_SD2 if sd2 else PAD_SD1), model)
    return unet, vae, text, cfg


# -- diffusers folders --------------------------------------------------------------------

def _json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelError(f"missing {file}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{file}: corrupt JSON ({e.msg})") from None


def _weights_in(folder: Path, stem: str = "diffusion_pytorch_model", cast=None) -> dict:
    """The weights of one diffusers component: plain, fp16 variant, sharded, or .bin."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return read_tensors(folder / name, cast)[0]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        out = {}
        for shard in sorted(set(_json(index).get("weight_map", {}).values())):
            out.update(read_tensors(folder / shard)[0])
        return out
    raise ModelError(f"{folder}: no {stem}.safetensors")


def _plan_diffusers(path: Path, prediction) -> tuple[dict, ModelConfig]:
    """(text encoder config.json, ModelConfig) of a diffusers folder, from its JSON files alone."""
    index = _json(path / "model_index.json")
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise ModelError(f"{path}: an SDXL pipeline: not supported; Stable Diffusion 1.x and 2.x are")
    uc = _json(path / "unet" / "config.json")
    ucfg = unet_config_from_diffusers(uc, path / "unet")
    vcfg = vae_config_from_diffusers(_json(path / "vae" / "config.json"), path / "vae")
    sched = scheduler_from_diffusers(_json(path / "scheduler" / "scheduler_config.json"), path / "scheduler",
                                     _prediction(prediction))
    tc = _json(path / "text_encoder" / "config.json")
    if tc.get("model_type") != "clip_text_model":
        raise ModelError(f"{path / 'text_encoder'}: a {tc.get('model_type')!r} text encoder: only CLIP is supported")
    if tc.get("hidden_size") != ucfg.context_dim:
        raise ModelError(f"{path}: UNet cross-attention width {ucfg.context_dim} does not match the text "
                         f"encoder's {tc.get('hidden_size')}")
    size = uc.get("sample_size", 64) * vcfg.factor
    return tc, _sd_config(ucfg, vcfg, False, sched.prediction_type, path.name, size=size, scheduler=sched)


def load_diffusers(path, device="cpu", dtype=torch.float32, prediction=None):
    path = Path(path)
    tc, cfg = _plan_diffusers(path, prediction)
    unet = _build(UNet, cfg.unet, _weights_in(path / "unet", cast=_cast(dtype)), "UNet", path / "unet", device, dtype)
    vae = _build(AutoencoderKL, cfg.vae, _weights_in(path / "vae", cast=_cast(dtype)), "VAE", path / "vae", device,
                 dtype)
    try:
        model = clip.from_folder(path / "text_encoder", _weights_in(path / "text_encoder", "model"))
        model = model.to(device=device, dtype=_text_dtype(device, dtype))
        tok_dir = path / "tokenizer"
        sd2 = tc.get("hidden_act") == "gelu"  # OpenCLIP-derived (SD 2.x) pads with "!"
        tok = (clip.CLIPTokenizer.from_folder(tok_dir) if tok_dir.is_dir()
               else clip_tokenizer(PAD_SD2 if sd2 else PAD_SD1))
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: cannot load the text encoder or tokenizer ({type(e).__name__}: {e})") from None
    return unet, vae, TextEncoder(cfg.text, tok, model), cfg


# -- entry points -------------------------------------------------------------------------

def is_sd_checkpoint(path) -> bool:
    """True for a diffusers folder or a Stable Diffusion single file (a .ckpt is assumed one:
    reading it is left to load_sd, which refuses pickled code with a clear error)."""
    path = Path(path)
    if path.is_dir():
        return (path / "model_index.json").is_file()
    if path.suffix in TORCH_SUFFIXES:
        return path.is_file()
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            if "mezzotint" in (f.metadata() or {}):
                return False
            return any(k.startswith(K.UNET_PREFIX) for k in f.keys())
    except Exception:
        return False


def read_sd_config(path, prediction=None) -> ModelConfig:
    """The ModelConfig load_sd would return, from JSON files or tensor headers: no weights read
    (a .ckpt is memory-mapped). Raises ModelError as load_sd does for unsupported models."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path}: no model_index.json: not a diffusers folder")
        return _plan_diffusers(path, prediction)[1]
    return _plan_single_file(path, *read_header(path), prediction)[2]


def load_sd(path, device="cpu", dtype=torch.float32, prediction=None):
    """(unet, vae, text_encoder, ModelConfig) of a Stable Diffusion 1.x / 2.x checkpoint.

    `prediction` ("eps" | "v") overrides what the files say or the default (diffusers':
    eps for 1.x, v for 2.x single files unless the file says otherwise).
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path}: no model_index.json: not a diffusers folder")
        return load_diffusers(path, device, dtype, prediction)
    return load_single_file(path, device, dtype, prediction)

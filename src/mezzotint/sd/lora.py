"""LoRA (Hu et al. 2021) for Stable Diffusion models, merged into the weights in place.

    undo = apply_lora(unet, text_encoder, "styles/ink.safetensors", 0.8)
    ...                  # generate
    undo()               # exact original weights back (a server switching LoRAs)

W += weight * scale * (up @ down), scale = alpha / rank (alpha defaults to rank). Read
layouts: kohya / A1111 (lora_unet_<module>.lora_down.weight, .lora_up.weight, .alpha;
lora_te_<module> for the text encoder; UNet modules by diffusers' or the original LDM
names), and diffusers / PEFT (unet.<module>.lora_A.weight / lora_B.weight,
text_encoder.<module>..., alpha from the file's lora_adapter_metadata), plus diffusers'
older attention-processor names. Linear, 1x1 and 3x3 conv layers.
Several LoRAs stack; undo them in reverse order (each restores what it found).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..checkpoints import ModelError
from . import keys as K
from .tensors import read_tensors

EXTS = (".safetensors", ".pt", ".ckpt", ".bin")
# key suffix -> which tensor of a LoRA pair it is
SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
            "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
            "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
_SUFFIX_RE = "|".join(re.escape(s) for s in sorted(SUFFIXES, key=len, reverse=True))
# diffusers' old attention-processor names -> module names
_PROCESSOR = [(r"\.processor\.(to_q|to_k|to_v)_lora\.", r".\1.lora."), (r"\.processor\.to_out_lora\.", ".to_out.0.lora."),
              (r"\.self_attn\.to_(q|k|v)_lora\.", r".self_attn.\1_proj.lora."),
              (r"\.self_attn\.to_out_lora\.", ".self_attn.out_proj.lora.")]


class LoraError(ModelError):
    """A LoRA file that does not fit the model, or that we cannot read."""


class LoraHandle:
    """Undoes one apply_lora: puts back the exact weights it changed."""

    def __init__(self, saved: list, path: Path, weight: float):
        self._saved, self.path, self.weight = saved, path, weight
        self.modules = len(saved)

    @torch.no_grad()
    def undo(self) -> None:
        for param, original in self._saved:
            param.copy_(original)
        self._saved = []

    __call__ = undo


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _targets(unet, text_model) -> tuple[dict, dict]:
    """(dotted names, kohya flat names) -> (component, module name, module)."""
    dotted, flat = {}, {}

    def layers(model):
        return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    if unet is not None:
        for n, m in layers(unet):
            entry = ("unet", n, m)
            dotted[("unet", n)] = entry
            flat[("unet", _flat(n))] = entry
            if hasattr(unet, "cfg"):  # LoRAs named after the original LDM modules
                try:
                    flat[("unet", _flat(K.unet_key(n + ".weight", unet.cfg)[0][: -len(".weight")]))] = entry
                except KeyError:
                    pass
    if text_model is not None:
        for n, m in layers(text_model):
            canon = K.canonical_clip_key(n)
            entry = ("text_encoder", n, m)
            dotted[("text_encoder", canon)] = entry
            flat[("text_encoder", _flat(canon))] = entry
    return dotted, flat


def _parse(key: str):
    """LoRA key -> (component or None, name, dotted?, part), or None if not a LoRA key."""
    for pattern, repl in _PROCESSOR:
        key = re.sub(pattern, repl, key)
    m = re.fullmatch(rf"lora_(unet|te)_(.+?)\.({_SUFFIX_RE})", key)
    if m:
        return ("unet" if m[1] == "unet" else "text_encoder"), m[2], False, SUFFIXES[m[3]]
    m = re.fullmatch(rf"(?:(unet|text_encoder)\.)?(?:base_model\.model\.)?(.+?)\.({_SUFFIX_RE})", key)
    if m and not key.startswith("lora_"):
        return m[1], m[2], True, SUFFIXES[m[3]]
    return None


def _peft_alpha(meta: dict, component: str, name: str, rank: int) -> float | None:
    """alpha / rank from diffusers' lora_adapter_metadata (a PEFT LoraConfig per component)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    conf = {k.split(".", 1)[1]: v for k, v in json.loads(raw).items() if k.startswith(component + ".")}
    if not conf:
        return None
    if conf.get("use_dora"):
        raise LoraError("DoRA LoRAs are not supported")
    alpha = conf.get("lora_alpha", rank)
    for pattern, value in (conf.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
            alpha = value
    return alpha / (math.sqrt(rank) if conf.get("use_rslora") else rank)


def _groups(tensors: dict, meta: dict, unet, text_model, where):
    dotted, flat = _targets(unet, text_model)
    groups, unknown, unmatched = {}, [], []
    for key, t in tensors.items():
        parsed = _parse(key)
        if parsed is None:
            unknown.append(key)
            continue
        comp, name, is_dotted, part = parsed
        if comp == "text_encoder" and text_model is None:
            raise LoraError(f"{where}: has text-encoder layers ({key}) but no text encoder was given")
        entry = None
        for c in ([comp] if comp else ["unet", "text_encoder"]):
            look = K.canonical_clip_key(name) if c == "text_encoder" and is_dotted else name
            entry = (dotted if is_dotted else flat).get((c, look))
            if entry:
                break
        if entry is None:
            unmatched.append(key)
            continue
        groups.setdefault((entry[0], entry[1]), {"entry": entry})[part] = t
    if unknown or unmatched:
        msg = []
        if unknown:
            msg.append(f"{len(unknown)} keys of no known LoRA layout, e.g. {sorted(unknown)[:3]}")
        if unmatched:
            msg.append(f"{len(unmatched)} keys name no layer of this model, e.g. {sorted(unmatched)[:3]}")
        raise LoraError(f"{where}: " + "; ".join(msg))
    out = []
    for (comp, name), g in groups.items():
        if "down" not in g or "up" not in g:
            raise LoraError(f"{where}: layer {comp}.{name} has only {sorted(k for k in g if k != 'entry')}")
        rank = g["down"].shape[0]
        if "alpha" in g:
            scale = float(g["alpha"]) / rank
        else:
            scale = _peft_alpha(meta, comp, name, rank)
            scale = 1.0 if scale is None else scale
        out.append((comp, name, g["entry"][2], g["down"], g["up"], scale))
    return out


@torch.no_grad()
def apply_lora(unet, text_encoder, path, weight: float = 1.0) -> LoraHandle:
    """Merge the LoRA at `path` into `unet` and the text encoder (a TextEncoder, its
    transformers model, or None), scaled by `weight`. Returns the handle that undoes it."""
    path = Path(path)
    tensors, extras = read_tensors(path)
    text_model = getattr(text_encoder, "model", text_encoder)
    if not tensors:
        raise LoraError(f"{path}: no tensors")
    groups = _groups(tensors, extras.get("metadata") or {}, unet, text_model, path)
    deltas = []
    for comp, name, module, down, up, scale in groups:  # check everything before changing anything
        W = module.weight
        d, u = down.flatten(1), up.flatten(1)
        if u.shape[1] != d.shape[0] or u.shape[0] != W.shape[0] or d.shape[1] != W[0].numel():
            raise LoraError(f"{path}: LoRA for {comp}.{name} has shapes {tuple(down.shape)} / {tuple(up.shape)}, "
                            f"which do not fit the layer's {tuple(W.shape)}: a LoRA for another model?")
        deltas.append((W, d, u, scale))
    saved, seen = [], set()
    for W, d, u, scale in deltas:
        if id(W) not in seen:
            seen.add(id(W))
            saved.append((W, W.detach().to("cpu", copy=True)))
        delta = (u.to(W.device, torch.float32) @ d.to(W.device, torch.float32)).reshape(W.shape)
        W.add_((delta * (weight * scale)).to(W.dtype))
    return LoraHandle(saved, path, weight)


_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's <lora:name:weight> tags (weight optional, default 1.0) -> (prompt without
    them, [(name, weight)]). A1111's extra fields (te=..., unet=..., a second number) are refused."""
    found = []
    for m in _TAG.finditer(prompt):
        name, rest = m[1].strip(), m[2]
        try:
            weight = 1.0 if rest is None or rest.strip() == "" else float(rest)
        except ValueError:
            raise ValueError(f"bad LoRA tag {m[0]!r}: weight must be a number, as <lora:name:0.8>") from None
        if not name:
            raise ValueError(f"bad LoRA tag {m[0]!r}: no name")
        found.append((name, weight))
    clean = re.sub(r"[ \t]*" + _TAG.pattern, "", prompt)  # with the space before it: "x <lora:a>, y" -> "x, y"
    clean = re.sub(r"[ \t]{2,}", " ", clean).strip()
    return clean, found


def find_lora(name: str, folder) -> Path:
    """The LoRA file called `name` (no extension; may hold subfolders) under `folder`."""
    folder = Path(folder)
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not name.strip():
        raise ValueError(f"bad LoRA name {name!r}: a name inside the LoRA folder, without '..'")
    files = [p for p in folder.rglob("*") if p.suffix in EXTS and p.is_file()] if folder.is_dir() else []

    def stem(p):
        return p.relative_to(folder).with_suffix("").as_posix()

    exact = [p for p in files if stem(p) == rel.as_posix()] or [p for p in files if p.stem == name]
    loose = [p for p in files if name.lower() in (stem(p).lower(), p.stem.lower())]
    for hits in (exact, loose):
        hits.sort(key=lambda p: EXTS.index(p.suffix))  # one name in two formats: safetensors first
        if len({stem(p) for p in hits}) == 1:
            return hits[0]
        if hits:
            raise FileNotFoundError(f"LoRA name {name!r} is ambiguous: {sorted({stem(p) for p in hits})[:5]}")
    have = sorted(stem(p) for p in files)[:10]
    raise FileNotFoundError(f"no LoRA {name!r} in {folder} (have: {', '.join(have) or 'none'})")

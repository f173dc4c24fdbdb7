"""PNG output: an A1111-style `parameters` chunk plus our full JSON record.

`parameters` is what other tools of the field read (AUTOMATIC1111's PNG Info,
sd-parsers, civitai); `mezzotint` holds the JSON record that regenerates the image.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from .checkpoints import atomic_write

# our sampler names -> the names AUTOMATIC1111 writes
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a",
                  "heun": "Heun", "dpmpp_2m": "DPM++ 2M"}
RECORD_KEY = "mezzotint"


def _value(v) -> str:
    # A1111 quotes a value that holds its separators
    s = str(v)
    return json.dumps(s) if any(c in s for c in ",:\n\"") else s


def a1111_parameters(record: dict) -> str:
    r = record["request"]
    lines = [r["prompt"]]
    if r["negative_prompt"]:
        lines.append(f"Negative prompt: {r['negative_prompt']}")
    fields = {"Steps": r["steps"], "Sampler": A1111_SAMPLERS.get(r["sampler"], r["sampler"]),
              "Schedule type": "Karras" if r["karras"] else "Automatic", "CFG scale": r["cfg"],
              "Seed": r["seed"], "Size": f"{r['width']}x{r['height']}",
              "Model hash": record["model"]["sha256"][:10], "Model": record["model"]["name"]}
    if r.get("guidance_rescale"):
        fields["CFG Rescale phi"] = r["guidance_rescale"]  # as the sd-webui CFG rescale extension
    if r.get("layout_guidance"):
        fields["Layout guidance"] = r["layout_guidance"]
    if r.get("layout_candidates", 1) > 1:
        fields["Layout candidates"] = r["layout_candidates"]
    if r["sampler"] == "ddim" and r["eta"]:
        fields["Eta DDIM"] = r["eta"]
    edit = record.get("edit")
    if edit:
        fields["Denoising strength"] = edit["strength"]
        if edit.get("mask_blur") is not None:
            fields["Mask blur"] = edit["mask_blur"]
    if record.get("loras"):
        fields["Lora hashes"] = ", ".join(f"{Path(x['path']).stem}: {x['sha256'][:12]}" for x in record["loras"])
    fields["Version"] = f"mezzotint {record['mezzotint']}"
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def _pnginfo(record: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_text(RECORD_KEY, json.dumps(record, sort_keys=True))
    return info


def save_png(image: Image.Image, path, record: dict) -> Path:
    """Write the image with both chunks, atomically (temp file + rename)."""
    info = _pnginfo(record)
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return path


def png_bytes(image: Image.Image, record: dict) -> bytes:
    """The bytes save_png writes, in memory (the server's responses)."""
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_pnginfo(record))
    return buf.getvalue()


def read_record(path) -> dict:
    """The JSON record of a PNG we wrote; ValueError if the file has none."""
    try:
        with Image.open(path) as im:
            text = im.text.get(RECORD_KEY) if hasattr(im, "text") else None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if text is None:
        raise ValueError(f"{path}: no mezzotint record in this image (was it made by mezzotint?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt mezzotint record ({e.msg})") from None

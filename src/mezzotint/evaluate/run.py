"""`mezzotint eval`: render a prompt set through a model and judge every image on its pixels."""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.phrasing import caption_variant, parse_caption
from ..data.shapes import scene_for
from .judge import format_table, judge, judge_ground_truth, prompt_set, score


def eval_prompts(per_category: int, seed: int, phrasing: str) -> list[tuple[str, str, str]]:
    """(prompt given to the model, canonical caption judged against, category).

    "heldout" rewrites each canonical caption with phrasing templates that training never used;
    the image is still judged against the canonical facts."""
    out = []
    for k, (caption, category) in enumerate(prompt_set(per_category, seed)):
        prompt = caption
        if phrasing == "heldout":
            rng = random.Random(f"eval-heldout/{seed}/{k}")
            facts = parse_caption(caption)
            prompt = caption_variant(scene_for(facts, rng), facts, rng, split="heldout")
        elif phrasing != "canonical":
            raise ValueError(f"unknown phrasing {phrasing!r}; allowed: canonical, heldout")
        out.append((prompt, caption, category))
    return out


def evaluate(pipe, base_request, per_category: int = 50, seed: int = 0, phrasing: str = "canonical",
             batch: int = 8, save_images: Path | None = None, progress=None) -> tuple[dict, list[dict]]:
    """Generate one image per prompt (prompt i with seed base.seed + i) and judge it."""
    from dataclasses import replace
    items = eval_prompts(per_category, seed, phrasing)
    verdicts, rows = [], []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        req = replace(base_request, prompt=chunk[0][0], seed=base_request.seed + start)
        results = pipe(req, [p for p, _, _ in chunk])
        for k, (res, (prompt, caption, category)) in enumerate(zip(results, chunk)):
            v = judge(res.image, caption)
            verdicts.append(v)
            rows.append({"index": start + k, "prompt": prompt, "caption": caption, "category": category,
                         "seed": res.request.seed, "correct": v.correct,
                         "correct_in_category": bool(v.by_category.get(category, v.correct)),
                         "reason": v.reason})
            if save_images:
                save_images.mkdir(parents=True, exist_ok=True)
                res.image.save(save_images / f"{start + k:04d}.png")
        if progress:
            progress(len(chunk))
    table = score(verdicts, [c for _, _, c in items])
    return table, rows


def autoencoder_round_trip(vae, n: int = 200, size: int = 64, seed: int = 0) -> float:
    """Judge accuracy of ground-truth renders after encode + decode: the ceiling that the
    autoencoder puts on any UNet trained on its latents."""
    import numpy as np
    import torch
    from PIL import Image

    from ..data.shapes import canonical_caption, render, sample_scene
    from ..vae import to_uint8, to_unit
    right = 0
    device = next(vae.parameters()).device
    with torch.inference_mode():
        for i in range(n):
            scene, facts = sample_scene(random.Random(f"vae-round-trip/{seed}/{i}"))
            x = torch.from_numpy(np.asarray(render(scene, size)).copy()).permute(2, 0, 1)[None]
            y = vae.decode(vae.encode(to_unit(x.to(device))))[0].cpu()
            img = to_uint8(y).permute(1, 2, 0).numpy()
            right += judge(Image.fromarray(img), canonical_caption(facts)).correct
    return right / n


def report(table: dict, gt_accuracy: float, phrasing: str) -> str:
    return (f"judge accuracy on ground-truth renders: {gt_accuracy:.3f}\n"
            f"prompts: {phrasing} phrasings\n" + format_table(table))


def write_json(path: Path, table: dict, rows: list[dict], meta: dict) -> None:
    from ..checkpoints import atomic_write
    data = json.dumps({"meta": meta, "table": table, "images": rows}, indent=1)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(data))


__all__ = ["autoencoder_round_trip", "evaluate", "eval_prompts", "report", "write_json", "judge_ground_truth"]

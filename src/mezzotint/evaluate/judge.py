"""Prompt-adherence judge for the Shapes world (spec: /work/shared/specs/shapes-world.md).

`detect` reads the background and the objects from pixels alone; `judge` checks an
image against a caption by the spec's three rules and files it under the spec's
reporting categories, in the spirit of GenEval. It is written to tolerate what a
generative model draws: colours a little off the palette, noise, soft edges.
"""
from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from mezzotint.data.phrasing import parse_caption
from mezzotint.data.shapes import (
    BACKGROUNDS, COLOURS, COUNT_WORDS, RELATIONS, SHAPES, SIZES, Facts, Named,
    canonical_caption, inside, relation_holds, render, sample_scene,
)

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution", "background")
BG_TOLERANCE = 60.0  # a border pixel this close (RGB distance) to a background colour votes for it
COLOUR_TOLERANCE = 50.0  # a pixel within this of colour-over-background mixes is that colour (min pair gap is 76)
FOREGROUND_ALPHA = 0.5  # a pixel at least half covered belongs to the object, as a rasteriser would say
PARTIAL_COST = 30.0  # RGB distance charged for explaining a pixel as uncovered (x (1 - alpha))
UNKNOWN_DISTANCE = 60.0  # a pixel this far from the background and from every mix is an unknown colour
SPECK = 0.003  # blobs smaller than this fraction of the canvas are noise (the least object is ~0.01)
MIN_SHAPE_IOU = 0.5  # a blob whose best template overlaps less than this has shape "unknown"
SIZE_TOLERANCE = 0.04  # measured box side may stray this far outside a named size's range
TEMPLATE_SS = 3  # template samples per pixel side


@dataclass(frozen=True)
class Found:
    colour: str  # a COLOURS name or "unknown"
    shape: str  # a SHAPES name or "unknown"
    x: float  # box centre, fraction of the width
    y: float  # box centre, fraction of the height
    s: float  # box side, fraction of the side
    area: float  # pixels of the blob, fraction of the canvas
    iou: float  # overlap of the blob with its shape's template


@dataclass
class Verdict:
    correct: bool  # all three spec rules hold
    categories: list[str]  # reporting categories of the caption
    reason: str  # "ok", or the first rule that failed
    by_category: dict[str, bool] = field(default_factory=dict)  # where a category judges differently


def _to_array(image) -> np.ndarray:
    """(H, W, 3) float RGB in 0..255 from a PIL image, an (H, W, 3) array or a (3, H, W) tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float64)
    if hasattr(image, "detach"):  # torch tensor (3, H, W)
        image = image.detach().cpu().numpy().transpose(1, 2, 0)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or tensor (3, H, W), got shape {a.shape}")
    if a.dtype.kind == "f" and a.max() <= 1.0:  # floats in 0..1
        return a.astype(np.float64) * 255.0
    return a.astype(np.float64)


def _background(a: np.ndarray) -> tuple[str | None, np.ndarray]:
    """Background name (None if no palette background holds half the border) and its measured colour."""
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    names = list(BACKGROUNDS)
    d = np.linalg.norm(border[:, None, :] - np.array([BACKGROUNDS[n] for n in names])[None], axis=2)
    near = d.min(1) < BG_TOLERANCE
    votes = np.bincount(d.argmin(1)[near], minlength=len(names))
    best = int(votes.argmax())
    if votes[best] < 0.5 * len(border):
        return None, np.median(border, axis=0)
    return names[best], np.median(border[near & (d.argmin(1) == best)], axis=0)


def _labels(a: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: label -1 background, k for COLOURS[k], len(COLOURS) for an unknown
    colour; and alpha (H, W, K), the coverage of each colour.

    Each pixel is explained as alpha * colour + (1 - alpha) * background, so that
    anti-aliased edges (and soft generated ones) go with their colour, not a neighbour.
    A pixel is foreground when some colour explains it at least half covered; among
    those colours, partial cover costs a little, because edge pixels are rarer than
    interior ones (this settles brown on black, which looks like half-covered orange)."""
    pal = np.array(list(COLOURS.values()), np.float64)  # (K, 3)
    d = a - bg  # (H, W, 3)
    v = pal - bg  # (K, 3)
    alpha = np.clip(np.einsum("hwc,kc->hwk", d, v) / (v * v).sum(1), 0.0, 1.0)  # (H, W, K)
    resid = np.linalg.norm(d[:, :, None, :] - alpha[..., None] * v, axis=3)  # (H, W, K)
    fits = (resid < COLOUR_TOLERANCE) & (alpha >= FOREGROUND_ALPHA)
    cost = np.where(fits, resid + PARTIAL_COST * (1.0 - alpha), np.inf)
    labels = np.where(fits.any(2), cost.argmin(2), -1)
    unknown = (resid.min(2) >= COLOUR_TOLERANCE) & (np.linalg.norm(d, axis=2) >= UNKNOWN_DISTANCE)
    labels[unknown] = len(COLOURS)
    return labels, alpha


def _interior(part: np.ndarray, w: int) -> int:
    """Pixels of a region (flat indices) whose four neighbours are all in it."""
    inside_ = set(part.tolist())
    return sum(p - 1 in inside_ and p + 1 in inside_ and p - w in inside_ and p + w in inside_ for p in inside_)


def _components(key: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of equal non-negative key, as arrays of flat pixel indices."""
    h, w = key.shape
    flat = key.ravel().tolist()
    seen = [k < 0 for k in flat]
    out = []
    for start in range(h * w):
        if seen[start]:
            continue
        k, stack, members = flat[start], [start], []
        seen[start] = True
        while stack:
            p = stack.pop()
            members.append(p)
            x = p % w
            for q, ok in ((p - w, p >= w), (p + w, p < h * w - w), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and not seen[q] and flat[q] == k:
                    seen[q] = True
                    stack.append(q)
        out.append(np.array(members))
    return out


@functools.lru_cache(maxsize=None)
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """(mean u, mean v, std u, std v) of `shape` in box coordinates, from a fine grid."""
    g = (np.arange(400) + 0.5) / 200 - 1.0
    hit = inside(shape, g[None, :], g[:, None])
    vs, us = np.nonzero(hit)
    u, v = g[us], g[vs]
    return float(u.mean()), float(v.mean()), float(u.std()), float(v.std())


def _fit_shape(alpha: np.ndarray, x0: int, y0: int) -> tuple[str, float, tuple[float, float, float, float]]:
    """Best shape template for an object's coverage map `alpha` (window at pixel x0, y0).
    Each shape's box is fitted by moments (centre and spread per axis, which survive the
    blunted tips of small shapes better than a bounding box would) and scored by soft IoU.
    Returns (shape, iou, (box centre x, y, box width, height) in pixels)."""
    h, w = alpha.shape
    mass = alpha.sum()
    gx, gy = np.arange(w) + 0.5 + x0, np.arange(h) + 0.5 + y0  # pixel centres
    mx, my = (alpha.sum(0) * gx).sum() / mass, (alpha.sum(1) * gy).sum() / mass
    sx = np.sqrt(max((alpha.sum(0) * (gx - mx) ** 2).sum() / mass, 1e-6))
    sy = np.sqrt(max((alpha.sum(1) * (gy - my) ** 2).sum() / mass, 1e-6))
    sub = (np.arange(TEMPLATE_SS) + 0.5) / TEMPLATE_SS
    px = (np.arange(w)[:, None] + sub[None, :]).ravel() + x0  # sample positions, pixels
    py = (np.arange(h)[:, None] + sub[None, :]).ravel() + y0
    best = ("unknown", 0.0, (0.0, 0.0, 0.0, 0.0))
    for shape in SHAPES:
        mu, mv, su, sv = _unit_moments(shape)
        hx, hy = sx / su, sy / sv  # half box, pixels
        cx, cy = mx - mu * hx, my - mv * hy
        hit = inside(shape, ((px - cx) / hx)[None, :], ((py - cy) / hy)[:, None])
        tmpl = hit.reshape(h, TEMPLATE_SS, w, TEMPLATE_SS).mean(axis=(1, 3))
        iou = float(np.minimum(alpha, tmpl).sum() / max(np.maximum(alpha, tmpl).sum(), 1e-9))
        if iou > best[1]:
            best = (shape, iou, (cx, cy, 2 * hx, 2 * hy))
    return best if best[1] >= MIN_SHAPE_IOU else ("unknown", best[1], best[2])


def detect(image) -> tuple[str | None, list[Found]]:
    """(background name or None, objects) read from the pixels alone."""
    a = _to_array(image)
    h, w, _ = a.shape
    bg_name, bg = _background(a)
    labels, alpha = _labels(a, bg)
    speck = max(4.0, SPECK * h * w)
    names = list(COLOURS) + ["unknown"]
    # Blobs are regions of any non-background colour; within a blob, each colour region
    # big and thick enough to be an object is one (a thin fringe of another colour is
    # just an edge). A blob with one such region is one object, whatever stray labels
    # noise left in it.
    parts = []
    for blob in _components(np.where(labels >= 0, 0, -1)):
        if len(blob) < speck:
            continue
        key = np.full(h * w, -1)
        key[blob] = labels.ravel()[blob]
        big = [p for p in _components(key.reshape(h, w)) if len(p) >= speck and _interior(p, w) >= speck / 4]
        parts += big if len(big) > 1 else [blob]
    owner = np.full(h * w, -1)
    for k, part in enumerate(parts):
        owner[part] = k
    owner = owner.reshape(h, w)
    found = []
    for k, part in enumerate(parts):
        label = int(np.bincount(labels.ravel()[part]).argmax())
        ys, xs = np.divmod(part, w)
        y0, y1 = max(0, ys.min() - 2), min(h, ys.max() + 3)
        x0, x1 = max(0, xs.min() - 2), min(w, xs.max() + 3)
        win = owner[y0:y1, x0:x1]
        if label < len(COLOURS):  # its own coverage, soft edges included, other objects cut out
            cov = alpha[y0:y1, x0:x1, label] * ((win == k) | (win == -1))
            cov = np.where(cov >= 0.1, cov, 0.0)
        else:
            cov = (win == k).astype(np.float64)
        shape, iou, (cx, cy, bw, bh) = _fit_shape(cov, x0, y0)
        found.append(Found(names[label], shape, cx / w, cy / h, (bw / w + bh / h) / 2, len(part) / (h * w), iou))
    return bg_name, found


# ---------------------------------------------------------------- judging


def categories_of(facts: Facts) -> list[str]:
    """Reporting categories of a caption. A single object counts under single_object
    (judged without its colour) and colors (judged in full); two objects of different
    colours and different shapes also count under color_attribution; a caption that
    names its background also counts under background."""
    objs = facts.objects
    cats = {"single": ["single_object", "colors"], "two": ["two_objects"],
            "position": ["position"], "count": ["counting"]}[facts.kind]
    if facts.kind == "two" and objs[0].colour != objs[1].colour and objs[0].shape != objs[1].shape:
        cats = cats + ["color_attribution"]
    return cats + (["background"] if facts.background else [])


def _size_ok(size: str | None, s: float) -> bool:
    if size is None:
        return True
    lo, hi = SIZES[size]
    return lo - SIZE_TOLERANCE <= s <= hi + SIZE_TOLERANCE


def _say(items) -> str:
    return ", ".join(f"{o.colour} {o.shape}" for o in items) or "nothing"


def _objects_ok(facts: Facts, found: list[Found]) -> tuple[bool, str]:
    """Rules 2 and 3: exactly the named objects, and every named size and relation."""
    named = facts.objects
    if sorted((o.colour, o.shape) for o in found) != sorted((n.colour, n.shape) for n in named):
        return False, f"found {len(found)} object(s) [{_say(found)}]; caption names {len(named)} [{_say(named)}]"
    size_fit = False
    for perm in itertools.permutations(found):
        if any((p.colour, p.shape) != (n.colour, n.shape) for p, n in zip(perm, named)):
            continue
        if not all(_size_ok(n.size, p.s) for p, n in zip(perm, named)):
            continue
        size_fit = True
        if facts.relation is None or relation_holds(facts.relation, (perm[0].x, perm[0].y), (perm[1].x, perm[1].y)):
            return True, "ok"
    if not size_fit:
        sizes = ", ".join(f"{p.colour} {p.shape} s={p.s:.2f}" for p in found)
        return False, f"named size does not hold ({sizes}; small {SIZES['small']}, large {SIZES['large']})"
    where = ", ".join(f"{p.colour} {p.shape} at ({p.x:.2f}, {p.y:.2f})" for p in found)
    return False, f"relation {RELATIONS[facts.relation]!r} does not hold ({where})"


def judge(image, caption: str) -> Verdict:
    """Is `image` correct for `caption`? Spec rules: 1 background, 2 exactly the named
    objects (colour and shape), 3 named sizes and relations."""
    facts = parse_caption(caption)
    bg, found = detect(image)
    cats = categories_of(facts)
    want_bg = facts.background or "white"
    if bg != want_bg:
        ok, reason = False, f"background is {bg or 'not a palette background'}, caption wants {want_bg}"
    else:
        ok, reason = _objects_ok(facts, found)
    by_category = {}
    if facts.kind == "single":  # GenEval's single_object: the object, whatever its colour
        n = facts.objects[0]
        by_category["single_object"] = (bg == want_bg and len(found) == 1 and found[0].shape == n.shape
                                        and _size_ok(n.size, found[0].s))
    return Verdict(ok, cats, reason, by_category)


# ---------------------------------------------------------------- benchmark


def prompt_set(n_per_category: int = 50, seed: int = 0) -> list[tuple[str, str]]:
    """A fixed list of (canonical caption, category), n per category, white background
    except in the background category (which names white, black or gray in turn)."""
    rng = random.Random(f"shapes-prompts/{seed}")
    colours, out = list(COLOURS), []

    def look(exclude=()):
        while True:
            pair = (rng.choice(colours), rng.choice(SHAPES))
            if pair not in exclude:
                return pair

    for cat in CATEGORIES:
        for k in range(n_per_category):
            if cat in ("single_object", "colors"):
                c, s = (colours[k % len(colours)], rng.choice(SHAPES)) if cat == "colors" else look()
                size = rng.choice([None, *SIZES]) if cat == "single_object" else None
                facts = Facts("single", (Named(c, s, size),))
            elif cat == "background":
                facts = Facts("single", (Named(*look()),), None, list(BACKGROUNDS)[k % len(BACKGROUNDS)])
            elif cat in ("two_objects", "color_attribution"):
                (c1, s1), (c2, s2) = look(), look()
                while s2 == s1 or (cat == "color_attribution" and c2 == c1):
                    c2, s2 = look()
                facts = Facts("two", (Named(c1, s1), Named(c2, s2)))
            elif cat == "position":
                a = look()
                facts = Facts("position", (Named(*a), Named(*look([a]))), list(RELATIONS)[k % len(RELATIONS)])
            else:  # counting
                facts = Facts("count", (Named(*look()),) * list(COUNT_WORDS)[k % len(COUNT_WORDS)])
            out.append((canonical_caption(facts), cat))
    return out


def score(verdicts: list[Verdict], categories: list[str] | None = None) -> dict[str, dict]:
    """Accuracy per category, plus "overall": the mean of the category accuracies, as
    GenEval reports (its correct/total count whole verdicts, each once). With `categories` (one per verdict, e.g. from prompt_set) each
    verdict counts once under it; otherwise under each of its own categories."""
    counts = {c: [0, 0] for c in CATEGORIES}
    for k, v in enumerate(verdicts):
        for c in [categories[k]] if categories is not None else v.categories:
            counts[c][0] += bool(v.by_category.get(c, v.correct))
            counts[c][1] += 1
    table = {c: {"correct": k, "total": n, "accuracy": k / n if n else None} for c, (k, n) in counts.items()}
    accs = [r["accuracy"] for r in table.values() if r["total"]]
    table["overall"] = {"correct": sum(v.correct for v in verdicts), "total": len(verdicts),
                        "accuracy": sum(accs) / len(accs) if accs else None}
    return table


def format_table(table: dict[str, dict]) -> str:
    lines = [f"{'category':<18} {'n':>5} {'accuracy':>9}", "-" * 34]
    for name, row in table.items():
        if name == "overall":
            lines.append("-" * 34)
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        lines.append(f"{name:<18} {row['total']:>5} {acc:>9}")
    return "\n".join(lines)


def perturb(image: Image.Image, noise: float = 0.0, blur: float = 0.0, seed: int = 0) -> Image.Image:
    """Gaussian blur (radius in pixels) then Gaussian noise (std in 0..255 levels)."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if noise > 0:
        a = np.asarray(image, np.float64) + np.random.default_rng(seed).normal(0.0, noise, (*image.size[::-1], 3))
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    return image


def judge_ground_truth(n: int = 300, size: int = 64, seed: int = 0, noise: float = 0.0, blur: float = 0.0,
                       failures: list | None = None) -> float:
    """Accuracy of the judge on renders of sampled scenes against their canonical
    captions (optionally perturbed); should be ~1. Misses are appended to `failures`."""
    right = 0
    for i in range(n):
        scene, facts = sample_scene(random.Random(f"judge-gt/{seed}/{i}"))
        caption = canonical_caption(facts)
        v = judge(perturb(render(scene, size), noise, blur, seed=i), caption)
        right += v.correct
        if not v.correct and failures is not None:
            failures.append((i, caption, v.reason))
    return right / n if n else 1.0

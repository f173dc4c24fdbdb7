"""The Shapes world: flat shapes on a plain background, each image with a true caption.

The contract is /work/shared/specs/shapes-world.md (v1); the constants, geometry,
relations and caption grammar below follow it word for word, because the judge in
`mezzotint.evaluate.judge` and other people's checkers read the same page.

Coordinates are fractions of the side: x grows to the right, y downwards, and an
object is its square box, stored as centre (x, y) and side s.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
COLOURS = {
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 200),
    "pink": (245, 110, 180),
    "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring")
SIZES = {"small": (0.18, 0.24), "large": (0.34, 0.42)}  # box side, fraction of the canvas side
GAP = 0.03  # least distance between two boxes
RELATION_MARGIN = 0.10  # "A left of B" needs x_A < x_B - 0.10 (and the x axis dominant)
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
KINDS = ("single", "two", "position", "count")
STAR_INNER = 0.45  # inner radius of the star, fraction of the outer
RING_HOLE = 0.5  # hole radius of the ring, fraction of the outer

# Sampled scenes keep relations this much clear of the spec's thresholds, so that
# rasterising and measuring (an error of about a pixel) cannot flip a true caption.
LAYOUT_SLACK = 0.05
KIND_WEIGHTS = (3, 2, 3, 2)  # single, two, position, count
BACKGROUND_WEIGHTS = (2, 1, 1)  # white, black, gray


@dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # "small" | "large": the class that s falls in
    x: float  # box centre, fraction of the side from the left
    y: float  # box centre, fraction of the side from the top
    s: float  # box side, fraction of the side

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) as fractions of the side."""
        h = self.s / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "white"


@dataclass(frozen=True)
class Named:
    """One object as a caption names it; size None means the caption names none."""

    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class Facts:
    """What a caption states. For "count", `objects` holds N equal entries; for
    "position", `relation` says where objects[0] is relative to objects[1].
    `background` is None when the caption names none (which means white).
    When facts come from a scene, objects[k] describes scene.objects[k]."""

    kind: str  # one of KINDS
    objects: tuple[Named, ...]
    relation: str | None = None  # one of RELATIONS for "position"
    background: str | None = None


# ---------------------------------------------------------------- geometry


def inside(shape: str, u, v) -> np.ndarray:
    """Whether points lie inside `shape`, in box coordinates: u, v in [-1, 1] span the
    box, v grows downwards. Shared by the renderer and the judge's templates."""
    u, v = np.broadcast_arrays(np.asarray(u, float), np.asarray(v, float))
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= RING_HOLE**2)
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # apex (0, -1), base from (-1, 1) to (1, 1)
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2)
    if shape == "star":
        # Fold the angle (0 = straight up) onto [0, 36 deg]: there the edge runs from
        # the outer point P = (1, 0) to the inner point Q, and inside is the origin's side.
        seg = 2 * math.pi / 5
        phi = np.mod(np.arctan2(u, -v), seg)
        phi = np.minimum(phi, seg - phi)
        r = np.hypot(u, v)
        px, py = r * np.cos(phi), r * np.sin(phi)
        qx, qy = STAR_INNER * math.cos(seg / 2), STAR_INNER * math.sin(seg / 2)
        return (qx - 1.0) * py - qy * (px - 1.0) >= 0.0
    raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


def extent(shape: str) -> tuple[float, float, float, float]:
    """(u_min, u_max, v_min, v_max) of the drawn shape inside its box."""
    if shape == "star":  # points at 0, 72, ... degrees from straight up
        return (-math.sin(0.4 * math.pi), math.sin(0.4 * math.pi), -1.0, math.cos(0.2 * math.pi))
    return (-1.0, 1.0, -1.0, 1.0)


def relation_holds(rel: str, a, b, slack: float = 0.0) -> bool:
    """Spec relation of centre a = (x, y) to centre b; slack > 0 demands extra clearance."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    m = RELATION_MARGIN + slack
    if rel == "left":
        return dx < -m and abs(dx) > abs(dy) + slack
    if rel == "right":
        return dx > m and abs(dx) > abs(dy) + slack
    if rel == "above":
        return dy < -m and abs(dy) > abs(dx) + slack
    if rel == "below":
        return dy > m and abs(dy) > abs(dx) + slack
    raise ValueError(f"unknown relation {rel!r}; allowed: {', '.join(RELATIONS)}")


def size_class(s: float) -> str:
    for name, (lo, hi) in SIZES.items():
        if lo <= s <= hi:
            return name
    raise ValueError(f"box side {s:.3f} is in no size class {SIZES}")


# ---------------------------------------------------------------- rendering


def coverage(obj: Obj, size: int, ss: int | None = None) -> tuple[int, int, np.ndarray]:
    """Fraction of each pixel that `obj` covers, from ss x ss samples per pixel.
    Returns (top, left, cov) with cov the (h, w) window over the object's box."""
    ss = ss or (8 if size <= 256 else 4)
    left, top, right, bottom = obj.box
    x0, x1 = max(0, math.floor(left * size)), min(size, math.ceil(right * size))
    y0, y1 = max(0, math.floor(top * size)), min(size, math.ceil(bottom * size))
    xs = (np.arange(x0 * ss, x1 * ss) + 0.5) / (ss * size)
    ys = (np.arange(y0 * ss, y1 * ss) + 0.5) / (ss * size)
    half = obj.s / 2
    hit = inside(obj.shape, ((xs - obj.x) / half)[None, :], ((ys - obj.y) / half)[:, None])
    cov = hit.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))  # (h, w)
    return y0, x0, cov


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw `scene` as an RGB image `size` pixels a side. Edges are anti-aliased by
    coverage; a fully covered pixel gets colour * 1 + bg * 0, the exact palette value."""
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; allowed: {', '.join(BACKGROUNDS)}")
    img = np.empty((size, size, 3), np.float64)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        if obj.colour not in COLOURS:
            raise ValueError(f"unknown colour {obj.colour!r}; allowed: {', '.join(COLOURS)}")
        y0, x0, cov = coverage(obj, size)
        h, w = cov.shape
        cov = cov[..., None]
        region = img[y0 : y0 + h, x0 : x0 + w]
        region[:] = np.asarray(COLOURS[obj.colour], np.float64) * cov + region * (1.0 - cov)
    return Image.fromarray(np.rint(img).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- sampling


def _apart(a, b) -> bool:
    """Boxes a, b = (x, y, s) are disjoint with at least GAP between them."""
    lim = (a[2] + b[2]) / 2 + GAP
    return abs(a[0] - b[0]) >= lim or abs(a[1] - b[1]) >= lim


def _place(sides, rng: random.Random, accept=None, tries: int = 300):
    """Random boxes of the given sides, wholly inside the canvas and apart; None if
    `tries` attempts found none that `accept(boxes)` likes."""
    for _ in range(tries):
        boxes = []
        for s in sides:
            for _ in range(30):  # a few spots for this box before starting over
                box = (rng.uniform(s / 2, 1 - s / 2), rng.uniform(s / 2, 1 - s / 2), s)
                if all(_apart(box, b) for b in boxes):
                    boxes.append(box)
                    break
            else:
                break
        else:
            if accept is None or accept(boxes):
                return boxes
    return None


def _layout(looks, sizes, rng, accept=None, fixed=()) -> list[Obj]:
    """Objects for (colour, shape) looks and size classes; a crowded scene that does not
    fit trades a large object for a small one (never one at an index in `fixed`)."""
    sizes = list(sizes)
    for _ in range(20):
        sides = [rng.uniform(*SIZES[z]) for z in sizes]
        boxes = _place(sides, rng, accept)
        if boxes is not None:
            return [Obj(shape, colour, z, x, y, s) for (colour, shape), z, (x, y, s) in zip(looks, sizes, boxes)]
        large = [k for k, z in enumerate(sizes) if z == "large" and k not in fixed]
        if large:
            sizes[rng.choice(large)] = "small"
    raise ValueError(f"found no layout for {len(sizes)} objects of sizes {sizes}")


def scene_for(facts: Facts, rng: random.Random) -> Scene:
    """A random scene of which `facts` are true: named sizes kept, others drawn (a
    crowded scene may trade large for small); the relation placed with LAYOUT_SLACK to
    spare; the named background (white if none)."""
    looks = [(n.colour, n.shape) for n in facts.objects]
    sizes = [n.size or rng.choice(list(SIZES)) for n in facts.objects]
    fixed = [k for k, n in enumerate(facts.objects) if n.size]
    accept = None
    if facts.relation is not None:
        accept = lambda b: relation_holds(facts.relation, b[0], b[1], slack=LAYOUT_SLACK)  # noqa: E731
    return Scene(tuple(_layout(looks, sizes, rng, accept, fixed)), facts.background or "white")


def kind_weights(text: str) -> tuple[float, ...]:
    """"1,3,3,3" -> weights of KINDS (single, two, position, count); "" -> KIND_WEIGHTS."""
    if not text:
        return KIND_WEIGHTS
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError:
        w = ()
    if len(w) != len(KINDS) or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"caption-kind weights are {len(KINDS)} numbers >= 0 ({','.join(KINDS)}), "
                         f"not all zero, such as 1,3,3,3; got {text!r}")
    return w


def sample_scene(rng: random.Random, kind: str | None = None,
                 weights: tuple[float, ...] = KIND_WEIGHTS) -> tuple[Scene, Facts]:
    """A random scene and the facts of a true canonical caption for it; its kind drawn
    with `weights` unless given. A white background is named half the time, others
    always; a single object's size one time in three (else either size is drawn).
    facts.objects[k] describes scene.objects[k]."""
    kind = kind or rng.choices(KINDS, weights=weights)[0]
    background = rng.choices(list(BACKGROUNDS), weights=BACKGROUND_WEIGHTS)[0]
    named_bg = background if background != "white" or rng.random() < 0.5 else None
    colours, relation = list(COLOURS), None
    if kind == "single":
        size = rng.choice([None, *SIZES])
        named = [Named(rng.choice(colours), rng.choice(SHAPES), size)]
    elif kind in ("two", "position"):
        looks = rng.sample([(c, s) for c in colours for s in SHAPES], 2)  # two different looks
        named = [Named(c, s) for c, s in looks]
        relation = rng.choice(list(RELATIONS)) if kind == "position" else None
    elif kind == "count":
        named = [Named(rng.choice(colours), rng.choice(SHAPES))] * rng.choice(list(COUNT_WORDS))
    else:
        raise ValueError(f"unknown caption kind {kind!r}; allowed: {', '.join(KINDS)}")
    facts = Facts(kind, tuple(named), relation, named_bg)
    return scene_for(facts, rng), facts


def describe(scene: Scene) -> Facts:
    """The canonical facts of a scene: single (with size), count when all objects look
    alike, position when a relation holds between two (clearly: with LAYOUT_SLACK, so
    that measuring cannot flip it), else two objects; the background is named unless white."""
    objs = scene.objects
    bg = None if scene.background == "white" else scene.background
    if len(objs) == 1:
        o = objs[0]
        return Facts("single", (Named(o.colour, o.shape, o.size),), None, bg)
    if 2 <= len(objs) <= 4 and len({(o.colour, o.shape) for o in objs}) == 1:
        return Facts("count", tuple(Named(o.colour, o.shape) for o in objs), None, bg)
    if len(objs) == 2:
        named = tuple(Named(o.colour, o.shape) for o in objs)
        a, b = ((o.x, o.y) for o in objs)
        rel = next((r for r in RELATIONS if relation_holds(r, a, b, slack=LAYOUT_SLACK)), None)
        return Facts("position" if rel else "two", named, rel, bg)
    raise ValueError(f"no canonical caption for a scene of {len(objs)} objects that do not all look alike")


# ---------------------------------------------------------------- captions


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(named: Named, with_size: bool = True) -> str:
    words = ([named.size] if with_size and named.size else []) + [named.colour, named.shape]
    return f"{article(words[0])} {' '.join(words)}"


def canonical_caption(x: Scene | Facts) -> str:
    """The spec's canonical caption for facts (or for `describe(scene)`). The grammar
    names sizes only for single objects."""
    f = x if isinstance(x, Facts) else describe(x)
    objs = f.objects
    if f.kind == "single":
        text = noun_phrase(objs[0])
    elif f.kind == "two":
        text = f"{noun_phrase(objs[0], False)} and {noun_phrase(objs[1], False)}"
    elif f.kind == "position":
        text = f"{noun_phrase(objs[0], False)} {RELATIONS[f.relation]} {noun_phrase(objs[1], False)}"
    elif f.kind == "count":
        text = f"{COUNT_WORDS[len(objs)]} {objs[0].colour} {objs[0].shape}s"
    else:
        raise ValueError(f"unknown caption kind {f.kind!r}; allowed: {', '.join(KINDS)}")
    return text + (f" on a {f.background} background" if f.background else "")


# ---------------------------------------------------------------- dataset

PHRASINGS = ("train", "canonical", "heldout")
CANONICAL_SHARE = 0.25  # with phrasing="train", this share of captions is canonical


class ShapesDataset(torch.utils.data.IterableDataset):
    """Endless seeded Shapes world: item i is a pure function of (seed, i), an
    (image uint8 (3, H, W), caption) pair. Iteration walks indices rank, rank +
    world_size, ... (further split across DataLoader workers), so ranks never overlap.
    The scene of item i does not depend on `phrasing`, only its caption does. `kinds`
    reweights the caption kinds (see kind_weights), for a training mix of the hard ones."""

    def __init__(self, size: int = 64, seed: int = 0, phrasing: str = "train", rank: int = 0, world_size: int = 1,
                 kinds: str = ""):
        if phrasing not in PHRASINGS:
            raise ValueError(f"unknown phrasing {phrasing!r}; allowed: {', '.join(PHRASINGS)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.size, self.seed, self.phrasing = size, seed, phrasing
        self.rank, self.world_size = rank, world_size
        self.kinds = kind_weights(kinds)

    def example(self, i: int) -> tuple[Scene, Facts, str]:
        """Scene, canonical facts and caption of item i."""
        from mezzotint.data.phrasing import caption_variant  # phrasing imports this module

        if i < 0:
            raise IndexError(f"index {i} < 0")
        scene, facts = sample_scene(random.Random(f"shapes-v1/{self.seed}/{i}"), weights=self.kinds)
        rng = random.Random(f"shapes-v1/{self.seed}/{i}/caption")
        if self.phrasing == "canonical" or (self.phrasing == "train" and rng.random() < CANONICAL_SHARE):
            return scene, facts, canonical_caption(facts)
        return scene, facts, caption_variant(scene, facts, rng, split=self.phrasing)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        scene, _, caption = self.example(i)
        pixels = np.asarray(render(scene, self.size))  # (H, W, 3)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(), caption

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        i, step = self.rank + self.world_size * worker, self.world_size * workers
        while True:
            yield self[i]
            i += step

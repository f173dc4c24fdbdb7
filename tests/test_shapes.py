"""The Shapes world against its spec: palette, geometry, layout, captions, dataset."""
import itertools
import random

import numpy as np
import pytest

from mezzotint.data.phrasing import HELDOUT, INVERSE, caption_variant, caption_variants, parse_caption
from mezzotint.data.shapes import (
    BACKGROUNDS, COLOURS, GAP, SHAPES, SIZES, Facts, Named, Obj, Scene, ShapesDataset,
    canonical_caption, coverage, describe, inside, kind_weights, relation_holds, render, sample_scene, scene_for,
)


def scenes(n, seed=0, kind=None):
    rng = random.Random(seed)
    return [sample_scene(rng, kind) for _ in range(n)]


def test_constants_match_spec():
    assert BACKGROUNDS == {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
    assert COLOURS == {"red": (220, 38, 38), "orange": (245, 140, 20), "yellow": (240, 215, 30),
                       "green": (40, 170, 70), "blue": (40, 90, 220), "purple": (140, 60, 200),
                       "pink": (245, 110, 180), "brown": (130, 80, 40)}
    assert set(SHAPES) == {"circle", "square", "triangle", "diamond", "star", "ring"}
    assert SIZES == {"small": (0.18, 0.24), "large": (0.34, 0.42)} and GAP == 0.03


def test_geometry():
    assert inside("star", 0, -0.99) and not inside("star", 0, 0.6)  # a point straight up; notch below
    assert inside("star", 0, 0.44) and not inside("star", 0, 0.46)  # inner radius 0.45 straight down
    assert inside("triangle", 0, -0.95) and not inside("triangle", -0.5, -0.5) and inside("triangle", -0.99, 0.99)
    assert not inside("ring", 0, 0) and not inside("ring", 0.49, 0) and inside("ring", 0.51, 0)
    assert inside("diamond", 0.5, 0.49) and not inside("diamond", 0.6, 0.6) and inside("square", 0.99, -0.99)
    assert inside("circle", 0.7, 0.7) and not inside("circle", 0.71, 0.71)


@pytest.mark.parametrize("size", [64, 100])
def test_interiors_are_exact_palette_colours(size):
    for scene, _ in scenes(60, seed=size):
        pixels = np.asarray(render(scene, size)).astype(int)
        assert pixels.shape == (size, size, 3)
        touched = np.zeros((size, size), bool)
        for obj in scene.objects:
            y0, x0, cov = coverage(obj, size)
            h, w = cov.shape
            full = pixels[y0:y0 + h, x0:x0 + w][cov == 1.0]
            assert len(full) > 0.5 * cov.sum() and (full == COLOURS[obj.colour]).all()
            touched[y0:y0 + h, x0:x0 + w] |= cov > 0
        assert (pixels[~touched] == BACKGROUNDS[scene.background]).all()


def test_layout_follows_spec():
    for scene, facts in scenes(600, seed=1):
        objs = scene.objects
        assert 1 <= len(objs) <= 4
        for o in objs:
            left, top, right, bottom = o.box
            assert 0 <= left and right <= 1 and 0 <= top and bottom <= 1
            lo, hi = SIZES[o.size]
            assert lo <= o.s <= hi
        for a, b in itertools.combinations(objs, 2):
            lim = (a.s + b.s) / 2 + GAP - 1e-12
            assert abs(a.x - b.x) >= lim or abs(a.y - b.y) >= lim
        for o, n in zip(objs, facts.objects):
            assert (o.colour, o.shape) == (n.colour, n.shape) and n.size in (None, o.size)
        if facts.relation:
            assert relation_holds(facts.relation, (objs[0].x, objs[0].y), (objs[1].x, objs[1].y), slack=0.05)
        assert scene.background == (facts.background or "white")
        if facts.kind == "count":
            assert 2 <= len(objs) <= 4 and len({(o.colour, o.shape) for o in objs}) == 1


def test_relation_definition():
    assert relation_holds("left", (0.2, 0.5), (0.5, 0.6)) and relation_holds("right", (0.5, 0.6), (0.2, 0.5))
    assert not relation_holds("left", (0.45, 0.5), (0.5, 0.5))  # within the 0.10 margin
    assert not relation_holds("left", (0.2, 0.1), (0.5, 0.6))  # y dominates
    assert relation_holds("above", (0.5, 0.1), (0.6, 0.6)) and relation_holds("below", (0.6, 0.6), (0.5, 0.1))


def test_canonical_captions():
    red_circle = Named("red", "circle", "large")
    assert canonical_caption(Facts("single", (red_circle,))) == "a large red circle"
    assert canonical_caption(Facts("single", (Named("orange", "star"),))) == "an orange star"
    two = Facts("two", (Named("orange", "ring"), Named("blue", "square")), None, "black")
    assert canonical_caption(two) == "an orange ring and a blue square on a black background"
    pos = Facts("position", (Named("red", "circle"), Named("blue", "square")), "left")
    assert canonical_caption(pos) == "a red circle to the left of a blue square"
    assert canonical_caption(Facts("count", (Named("pink", "star"),) * 3, None, "gray")) == "three pink stars on a gray background"
    scene = Scene((Obj("diamond", "green", "small", 0.5, 0.5, 0.2),), "white")
    assert canonical_caption(scene) == "a small green diamond"
    for _, facts in scenes(300, seed=2):
        text = canonical_caption(facts)
        assert text == text.lower() and not text.endswith(".")
        assert parse_caption(text) == facts


def test_describe_matches_sampled_facts():
    for scene, facts in scenes(200, seed=3):
        d = describe(scene)
        assert d.kind == facts.kind or (facts.kind == "two" and d.kind == "position")


HELDOUT_MARKERS = ("a drawing of", "this image shows", "huge", "little", "disk", "lozenge", "doughnut",
                   "that is", "coloured", "exactly", "a group of", "that are", "a pair of", "together with",
                   "both ", "side of", "beneath", "underneath", " with ", "against", "in front of")


def test_phrasing_splits_are_disjoint():
    assert "size" in HELDOUT and "position" in HELDOUT
    rng = random.Random(4)
    for scene, facts in scenes(300, seed=4):
        train = caption_variants(scene, rng, facts, "train", n=3)
        held = caption_variant(scene, facts, rng, "heldout")
        assert not any(m in t for t in train for m in HELDOUT_MARKERS), train
        assert any(m in held for m in HELDOUT_MARKERS), held
        for text in train + [held]:
            assert parse_caption(text).kind in (facts.kind, "position")


def test_variants_state_the_same_facts():
    rng = random.Random(6)
    look = lambda n: (n.colour, n.shape)  # noqa: E731
    for scene, facts in scenes(1000, seed=6):
        for split in ("train", "heldout"):
            text = caption_variant(scene, facts, rng, split)
            p = parse_caption(text)
            assert p.kind == facts.kind and (p.background or "white") == scene.background, text
            assert sorted(map(look, p.objects)) == sorted(map(look, facts.objects)), text
            if facts.kind == "position":
                a, b = map(look, p.objects)
                fa, fb = map(look, facts.objects)
                assert (a, b, p.relation) in ((fa, fb, facts.relation), (fb, fa, INVERSE[facts.relation])), text
            for n in p.objects:
                assert n.size is None or any(look(o) == look(n) and o.size == n.size for o in scene.objects), text


def test_scene_for_keeps_named_facts():
    rng = random.Random(5)
    facts = parse_caption("four big red circles on a black background")
    scene = scene_for(facts, rng)
    assert scene.background == "black" and [o.size for o in scene.objects] == ["large"] * 4


def test_dataset_is_deterministic_and_shards():
    a, b = ShapesDataset(size=32, seed=7), ShapesDataset(size=32, seed=7)
    for i in (0, 5, 123):
        (ia, ca), (ib, cb) = a[i], b[i]
        assert ia.dtype.is_floating_point is False and tuple(ia.shape) == (3, 32, 32)
        assert ca == cb and ia.numpy().tobytes() == ib.numpy().tobytes()
    other = ShapesDataset(size=32, seed=8)
    assert any(a[i][1] != other[i][1] or not (a[i][0] == other[i][0]).all() for i in range(5))
    canon = ShapesDataset(size=32, seed=7, phrasing="canonical")
    assert all((canon[i][0] == a[i][0]).all() for i in range(5))  # phrasing changes captions only
    for i in range(20):
        assert canon[i][1] == canonical_caption(canon.example(i)[1])
    shards = [ShapesDataset(size=32, seed=7, rank=r, world_size=3) for r in range(3)]
    seen = {}
    for r, ds in enumerate(shards):
        for k, (img, cap) in zip(range(4), iter(ds)):
            i = r + 3 * k
            assert i not in seen and cap == a[i][1] and (img == a[i][0]).all()
            seen[i] = r
    assert sorted(seen) == list(range(12))
    with pytest.raises(ValueError):
        ShapesDataset(phrasing="fancy")


def test_kinds_reweight_the_mix_and_nothing_else():
    plain, same = ShapesDataset(size=16, seed=3), ShapesDataset(size=16, seed=3, kinds="3,2,3,2")
    assert all(plain.example(i)[2] == same.example(i)[2] for i in range(200))  # the default mix, spelled out
    hard = ShapesDataset(size=16, seed=3, kinds="0,1,0,1")
    got = [hard.example(i) for i in range(200)]
    assert {f.kind for _, f, _ in got} == {"two", "count"}
    for scene, facts, _ in got:  # scenes of the kind their captions say
        assert len(scene.objects) == len(facts.objects) and describe(scene).kind in (facts.kind, "position")
    assert sum(f.kind == "single" for _, f, _ in (plain.example(i) for i in range(200))) > 30
    for bad in ("1,2", "1,2,3,x", "0,0,0,0", "1,-1,1,1", "1,nan,1,1"):
        with pytest.raises(ValueError, match="caption-kind weights"):
            kind_weights(bad)

"""The judge: true captions pass at several sizes, wrong ones fail, and it reads pixels well."""
import dataclasses
import random

import numpy as np
import pytest

from mezzotint.data.phrasing import INVERSE, caption_variants, parse_caption
from mezzotint.data.shapes import (
    BACKGROUNDS, COLOURS, SHAPES, Facts, Named, Obj, Scene, canonical_caption, render, sample_scene, scene_for,
)
from mezzotint.evaluate.judge import (
    CATEGORIES, Verdict, categories_of, detect, format_table, judge, judge_ground_truth, perturb, prompt_set, score,
)


@pytest.mark.parametrize("size", [64, 128])
def test_true_captions_are_judged_correct(size):
    rng = random.Random(size)
    for k in range(40):
        scene, facts = sample_scene(rng)
        image = render(scene, size)
        captions = [canonical_caption(facts), canonical_caption(scene)]
        captions += caption_variants(scene, rng, facts, "train", n=3) + caption_variants(scene, rng, facts, "heldout", n=2)
        for text in captions:
            v = judge(image, text)
            assert v.correct, (k, text, v.reason)


def _other(options, current, rng):
    return rng.choice([o for o in options if o != current])


def test_wrong_captions_are_rejected():
    rng = random.Random(1)
    for k in range(60):
        scene, facts = sample_scene(rng)
        image = render(scene, 64)
        first = facts.objects[0]
        wrong = [
            dataclasses.replace(facts, background=_other(BACKGROUNDS, scene.background, rng)),
            dataclasses.replace(facts, objects=(dataclasses.replace(first, colour=_other(COLOURS, first.colour, rng)),)
                                + facts.objects[1:]),
            dataclasses.replace(facts, objects=(dataclasses.replace(first, shape=_other(SHAPES, first.shape, rng)),)
                                + facts.objects[1:]),
        ]
        if facts.kind == "count":
            n = len(facts.objects)
            wrong.append(dataclasses.replace(facts, objects=facts.objects[:1] * (n + 1 if n < 4 else n - 1)))
        if facts.kind == "position":
            wrong.append(dataclasses.replace(facts, relation=INVERSE[facts.relation]))
            swapped = "above" if facts.relation in ("left", "right") else "left"
            wrong.append(dataclasses.replace(facts, relation=swapped))
        if facts.kind == "single":
            real = scene.objects[0].size
            wrong.append(dataclasses.replace(facts, objects=(Named(first.colour, first.shape,
                                                                   "small" if real == "large" else "large"),)))
            wrong.append(Facts("two", (first, Named(_other(COLOURS, first.colour, rng), first.shape))))
        for f in wrong:
            text = canonical_caption(f)
            v = judge(image, text)
            assert not v.correct, (k, canonical_caption(facts), text)


def test_rejects_extra_and_missing_objects():
    a = Obj("circle", "red", "small", 0.25, 0.5, 0.2)
    b = Obj("square", "blue", "large", 0.7, 0.5, 0.36)
    image = render(Scene((a, b)), 64)
    assert judge(image, "a red circle to the left of a blue square").correct
    assert judge(image, "a blue square with a red circle on its left").correct
    assert not judge(image, "a red circle").correct
    assert not judge(image, "a red circle and a blue square on a black background").correct
    assert judge(image, "a red circle and a blue square on a white background").correct
    assert not judge(render(Scene((a,)), 64), "a red circle and a blue square").correct
    assert not judge(image, "a blue square to the left of a red circle").correct
    v = judge(image, "a red circle above a blue square")
    assert not v.correct and "relation" in v.reason


def test_detect_reads_objects():
    objs = (Obj("star", "orange", "large", 0.3, 0.3, 0.4), Obj("ring", "brown", "small", 0.75, 0.7, 0.2),
            Obj("triangle", "purple", "small", 0.25, 0.8, 0.22))
    for size in (64, 200):
        bg, found = detect(render(Scene(objs, "black"), size))
        assert bg == "black" and len(found) == 3
        for o in objs:
            f = next(f for f in found if (f.colour, f.shape) == (o.colour, o.shape))
            assert abs(f.x - o.x) < 1.5 / size and abs(f.y - o.y) < 1.5 / size and abs(f.s - o.s) < 0.03
    bg, found = detect(np.zeros((64, 64, 3), np.uint8) + np.array([0, 200, 200], np.uint8))
    assert bg is None


def test_parse_errors_are_clear():
    for bad in ["a red", "a circle", "five red circles", "a red circle and", "hello there", "two red circle",
                "a red circle to the left of", "a red circle on a black background on a white background",
                "a red circle that is blue", "a red circle to the left of a blue square above a star"]:
        with pytest.raises(ValueError, match="cannot parse caption"):
            parse_caption(bad)


def test_categories():
    cats = lambda t: categories_of(parse_caption(t))  # noqa: E731
    assert cats("a red circle") == ["single_object", "colors"]
    assert cats("a red circle and a blue square") == ["two_objects", "color_attribution"]
    assert cats("a red circle and a red square") == ["two_objects"]
    assert cats("two red circles on a gray background") == ["counting", "background"]
    assert cats("a red circle below a blue square") == ["position"]
    image = render(Scene((Obj("circle", "blue", "small", 0.5, 0.5, 0.2),)), 64)
    v = judge(image, "a red circle")
    assert not v.correct and v.by_category == {"single_object": True}


def test_ground_truth_accuracy():
    assert judge_ground_truth(300, 64, seed=0) >= 0.99
    assert judge_ground_truth(200, 64, seed=1, noise=6.0, blur=0.6) >= 0.95


def test_prompt_set_and_scoring():
    prompts = prompt_set(6, seed=0)
    assert prompts == prompt_set(6, seed=0) and prompts != prompt_set(6, seed=1)
    assert [c for _, c in prompts] == [c for c in CATEGORIES for _ in range(6)]
    verdicts = []
    rng = random.Random(0)
    for caption, cat in prompts:
        facts = parse_caption(caption)
        assert canonical_caption(facts) == caption and cat in categories_of(facts)
        image = perturb(render(scene_for(facts, rng), 64), noise=4.0, seed=len(verdicts))
        verdicts.append(judge(image, caption))
    table = score(verdicts, [c for _, c in prompts])
    assert all(table[c]["total"] == 6 and table[c]["accuracy"] == 1.0 for c in CATEGORIES)
    assert table["overall"]["accuracy"] == 1.0
    own = score([Verdict(True, ["counting"], "ok"), Verdict(False, ["single_object", "colors"], "x",
                                                                  {"single_object": True})])
    assert own["counting"]["accuracy"] == 1.0 and own["colors"]["accuracy"] == 0.0
    assert own["single_object"]["accuracy"] == 1.0 and own["position"]["accuracy"] is None
    text = format_table(table)
    assert all(c in text for c in CATEGORIES) and "overall" in text

"""The built-in default model: shipped inside the package, loads, and draws what it is asked."""
import numpy as np
import pytest

from mezzotint import Pipeline
from mezzotint.checkpoints import read_config
from mezzotint.cli import DEFAULT_MODEL, main
from mezzotint.evaluate.judge import judge, prompt_set
from mezzotint.pipeline import defaults_for


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(DEFAULT_MODEL, device="cpu")


def test_default_model_is_shipped_and_small():
    cfg = read_config(DEFAULT_MODEL)
    assert cfg.vae.factor == 4 and cfg.defaults.width == 64
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size < 40 * 2**20


def test_generate_uses_the_default_model(tmp_path, capsys):
    assert main(["generate", "a red circle", "--output", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a.png")


def test_default_model_draws_single_objects_in_the_named_colour(pipe):
    # the first 8 "colors" prompts of the eval set; the shipped model scored 0.86 on 50 of them
    prompts = [c for c, cat in prompt_set(8, seed=0) if cat == "colors"]
    results = pipe(defaults_for(pipe.config, prompts[0], seed=0), prompts)
    verdicts = [judge(r.image, p) for r, p in zip(results, prompts)]
    assert sum(v.correct for v in verdicts) >= 5, [v.reason for v in verdicts]


def test_default_model_image_is_not_noise(pipe):
    [r] = pipe(defaults_for(pipe.config, "a yellow star", seed=3))
    a = np.asarray(r.image).reshape(-1, 3)
    # a flat background dominates a Shapes world image
    values, counts = np.unique(a // 8, axis=0, return_counts=True)
    assert counts.max() > 0.5 * len(a)


@pytest.mark.parametrize("prompt,left,right", [
    ("a red circle to the left of a blue square", "circle", "square"),
    ("a green star to the right of a yellow triangle", "triangle", "star"),
])
def test_heat_maps_put_each_word_where_its_object_is(pipe, prompt, left, right):
    """The X-ray's test of meaning: over a set of seeds, the attention of the word named on
    the left lies mostly on the left half, and that of the other on the right half."""
    from mezzotint.explain import explain
    seeds = range(8)
    shares = [explain(pipe, defaults_for(pipe.config, prompt, seed=s)) for s in seeds]
    hits = [e.share_left(left) > 0.5 > e.share_left(right) for e in shares]
    assert sum(hits) >= 6, [(round(e.share_left(left), 2), round(e.share_left(right), 2)) for e in shares]

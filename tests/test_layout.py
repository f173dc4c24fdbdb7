"""The layout prior (`train --layout N`): a cross-attention from the cells' positions alone to
the text, added to the UNet's first feature map. Grown onto a trained UNet it changes nothing
at first; the grounding loss can teach it to send a word to its side of the image; traces and
split passes give its eager bits."""
import re

import pytest
import torch

from mezzotint import graphs
from mezzotint.checkpoints import ModelError
from mezzotint.config import PRESETS, ModelConfig
from mezzotint.sd.dconfig import diffusers_configs
from mezzotint.train import grow_layout
from mezzotint.train.grounding import attention_loss, recording
from mezzotint.unet import UNet

from test_grow import trained_like_unet


def _inputs(batch=2, length=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, length, 384, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, -2:] = False
    return x, torch.tensor([10.0, 700.0])[:batch], context, mask


def test_grown_layout_computes_the_same_function_and_refuses_a_second():
    unet = trained_like_unet()
    grown = grow_layout(unet, 4).eval()
    assert grown.cfg.layout == 4 and unet.cfg.layout == 0
    x, t, c, m = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, c, m), unet(x, t, c, m), rtol=0, atol=0)
    grown.train()(x, t, c, m).square().mean().backward()
    assert grown.layout.attn2.to_out[0].weight.grad.abs().sum() > 0  # the zero projection learns
    with pytest.raises(ValueError, match="already has a layout prior"):
        grow_layout(grown, 4)
    with pytest.raises(ModelError, match="layout prior"):  # no diffusers form
        diffusers_configs(ModelConfig(unet=grown.cfg))


def test_grounding_teaches_the_layout_to_send_each_word_to_its_side():
    # two "words" (random token vectors, swapped in half the prompts): the first one's object
    # is on the left, the second's on the right. Only the word order says which goes where.
    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"].unet.__class__(**{**PRESETS["tiny"].unet.__dict__, "layout": 4})).train()
    words = torch.randn(2, 384)
    left = torch.zeros(8, 8)
    left[:, :3] = 1
    opt = torch.optim.Adam(unet.layout.parameters(), 1e-2)

    def batch(n=16):
        order = torch.randint(0, 2, (n,))
        ctx = torch.stack([torch.stack([words[o], words[1 - o]]) for o in order.tolist()])
        ctx = ctx + 0.1 * torch.randn_like(ctx) + torch.tensor([1.0, -1.0])[None, :, None] * 0.5  # place in the prompt
        target = torch.stack([left, left.flip(1)])[None].expand(n, 2, 8, 8)  # token 0 left, token 1 right
        return ctx, target

    def loss(ctx, target):
        with recording(unet) as maps:
            unet(torch.randn(len(ctx), 4, 8, 8), torch.full((len(ctx),), 999.0), ctx)
        ours = [w for w in maps if w.shape[2] == 64 and w.shape[3] == 2]
        return attention_loss(ours[-1:], target), ours[-1]  # the layout's map (its own 8x8 x 2 tokens)

    first = float(loss(*batch())[0].detach())
    for _ in range(150):
        opt.zero_grad()
        loss(*batch())[0].backward()
        opt.step()
    with torch.no_grad():
        final, w = loss(*batch(64))
    assert float(final) < 0.5 * first
    w = w[:, 0].reshape(-1, 8, 8, 2)  # (B, row, column, token)
    share_left = w[:, :, :3].sum((1, 2)) / w.sum((1, 2))  # (B, token)
    assert float(share_left[:, 0].min()) > 0.6 > 0.15 > float(share_left[:, 1].max())  # uniform: 0.375


def test_layout_model_traced_and_split_equal_eager():
    torch.manual_seed(0)
    unet = grow_layout(trained_like_unet(), 4).eval()
    with torch.no_grad():
        unet.layout.attn2.to_out[0].weight.normal_()  # make it matter
    graphs.allow(unet)
    x, _, c, m = _inputs()
    t = torch.full((2,), 321.0)
    with torch.inference_mode():
        ref = unet._forward(x, t[:1], c, m)
        assert graphs.usable(unet, x)
        out, again = unet(x, t, c, m), unet(x, t, c, m)
        other = unet(x, t, torch.randn_like(c), m)
        assert torch.equal(out, ref) and torch.equal(again, ref)
        assert not torch.equal(other, ref)  # the text goes in as an input, not a constant
        one = unet(x[1:], t[1:], c[1:], m[1:])
    assert torch.equal(one, ref[1:])  # a row alone gives its bits in the batch


def test_new_lr_trains_grown_modules_faster_and_a_rerun_must_keep_it(tmp_path, capsys):
    import json

    from mezzotint.checkpoints import save_vae
    from mezzotint.cli import main
    from mezzotint.train.loop import param_groups
    from mezzotint.vae import AutoencoderKL

    from test_grow import FAST
    grown = grow_layout(trained_like_unet(), 4)
    old, new = param_groups(grown, 10.0)
    assert new["scale"] == 10.0 and {id(p) for p in new["params"]} == {id(p) for p in grown.layout.parameters()}
    assert len(old["params"]) + len(new["params"]) == len(list(grown.parameters()))
    assert len(param_groups(grown, 1.0)) == 1 and len(param_groups(trained_like_unet(), 10.0)) == 1

    vae = save_vae(tmp_path / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)
    assert main(["train", "--run-dir", str(tmp_path / "base"), "--preset", "tiny", "--vae", str(vae),
                 "--steps", "2"] + FAST) == 0
    grow = ["train", "--run-dir", str(tmp_path / "grown"), "--init", str(tmp_path / "base" / "model"),
            "--layout", "2", "--warmup", "0"]
    assert main(grow + ["--steps", "2", "--new-lr", "5"] + FAST) == 0
    groups = json.loads((tmp_path / "grown" / "checkpoints" / "step-00000002" / "train_state.json").read_text())
    lrs = [g["lr"] for g in groups["optimizer"]["param_groups"]]
    assert len(lrs) == 2 and lrs[1] == pytest.approx(5 * lrs[0])
    assert main(grow + ["--steps", "4"] + FAST) == 2  # a rerun with another --new-lr is refused
    assert "--new-lr" in capsys.readouterr().err
    assert main(grow + ["--steps", "4", "--new-lr", "5"] + FAST) == 0  # the same options resume
    assert main(grow + ["--steps", "4", "--new-lr", "0"] + FAST) == 2


def test_layout_fit_before_training_and_the_average_keeps_it(tmp_path, capsys):
    import re

    from mezzotint import Pipeline
    from mezzotint.checkpoints import save_vae
    from mezzotint.cli import main
    from mezzotint.data.shapes import ShapesDataset
    from mezzotint.train.grounding import Grounding, fit_layout
    from mezzotint.vae import AutoencoderKL
    vae = save_vae(tmp_path / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)
    run = ["train", "--run-dir", str(tmp_path / "a"), "--preset", "tiny", "--vae", str(vae), "--size", "32",
           "--attention-levels", "0,1", "--layout", "2", "--attention-loss", "1e-3", "--batch", "4", "--pool", "64",
           "--steps", "2", "--log-every", "1", "--sample-every", "0", "--threads", "1", "--ckpt-every", "2"]
    assert main(run + ["--layout-fit", "60"]) == 0
    fit = [float(x) for x in re.findall(r"layout fit: step \d+, grounding loss ([\d.]+)", capsys.readouterr().err)]
    assert len(fit) >= 2 and fit[-1] < fit[0]

    def layout_loss(folder):  # the grounding loss of a model's layout prior on fixed items (lr 0: no change)
        pipe = Pipeline.load(folder)
        ds = ShapesDataset(32, seed=0)
        grounding = Grounding(ds, pipe.text.tokenizer, 8, (0, 1))
        def contexts(items):
            return None, *[t.clone() for t in pipe.text.encode_batch([ds.example(i)[2] for i in items])]
        return fit_layout(pipe.unet.requires_grad_(True), grounding, contexts, 64, 1, 0, lr=0.0)[0]
    plain = tmp_path / "plain"
    assert main([*run[:2], str(plain), *run[3:]]) == 0  # the same run without the fit
    assert layout_loss(tmp_path / "a" / "model") < layout_loss(plain / "model") - 0.02  # the export has the fit
    assert main(run + ["--layout-fit", "-1"]) == 2
    k = run.index("--layout")
    no_layout = run[:k] + run[k + 2:]
    assert main([*no_layout[:2], str(tmp_path / "c"), *no_layout[3:], "--layout-fit", "5"]) == 2
    assert "needs a UNet with a layout prior" in capsys.readouterr().err


def test_layout_target_makes_the_prior_paint_the_mean_latent(tmp_path, capsys):
    import json

    from mezzotint.checkpoints import save_vae
    from mezzotint.cli import main
    from mezzotint.train.grounding import layout_target_loss
    from mezzotint.vae import AutoencoderKL
    delta = torch.zeros(2, 6, 4, 4)
    delta[:, :3] = 1.0
    assert float(layout_target_loss(delta, torch.ones(2, 3, 4, 4))) == 0.0  # only the first C channels count
    vae = save_vae(tmp_path / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)
    run = ["train", "--preset", "tiny", "--vae", str(vae), "--size", "32", "--attention-levels", "0,1",
           "--layout", "2", "--attention-loss", "1e-3", "--batch", "4", "--pool", "64", "--log-every", "1",
           "--sample-every", "0", "--threads", "1", "--ckpt-every", "100", "--layout-target", "1"]
    # the fit, with the mean latent as a target besides the grounding: that term falls
    assert main(run + ["--run-dir", str(tmp_path / "a"), "--steps", "1", "--layout-fit", "80"]) == 0
    err = capsys.readouterr().err
    fit = [float(x) for x in re.findall(r"layout fit: step \d+, grounding loss [\d.]+, mean-latent loss ([\d.]+)", err)]
    assert len(fit) >= 2 and fit[-1] < 0.7 * fit[0]
    k = run.index("--pool")
    streamed = run[:k] + run[k + 2:]  # without a pool the fit encodes its own images
    assert main(streamed + ["--run-dir", str(tmp_path / "s"), "--steps", "1", "--layout-fit", "2"]) == 0
    assert "mean-latent loss" in capsys.readouterr().err
    # in training the term is logged apart
    assert main(run + ["--run-dir", str(tmp_path / "b"), "--steps", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert all(r["layout_target_loss"] > 0 for r in rows if "loss" in r)
    k = run.index("--layout")
    no_layout = run[:k] + run[k + 2:]
    assert main(no_layout + ["--run-dir", str(tmp_path / "c"), "--steps", "1"]) == 2
    assert "--layout-target needs a UNet with a layout prior" in capsys.readouterr().err
    assert main(run + ["--run-dir", str(tmp_path / "d"), "--steps", "1", "--layout-target", "-1"]) == 2

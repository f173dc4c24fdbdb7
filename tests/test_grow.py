"""Growing a trained UNet: `train --init MODEL --attention-levels ...` adds transformers that
start as the identity, so the grown model computes what the old one did."""
import json

import pytest
import torch

from mezzotint.checkpoints import load_model, save_vae
from mezzotint.cli import main
from mezzotint.config import PRESETS
from mezzotint.train import grow_attention
from mezzotint.unet import UNet
from mezzotint.vae import AutoencoderKL

FAST = ["--size", "32", "--batch", "2", "--log-every", "1", "--sample-every", "0", "--threads", "1",
        "--ckpt-every", "2"]


def trained_like_unet():
    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"].unet).eval()
    with torch.no_grad():  # no zero layers anywhere: every block of the old model matters
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def test_grown_unet_computes_the_same_function():
    unet = trained_like_unet()
    grown = grow_attention(unet, (0, 1)).eval()
    assert grown.cfg.attention_levels == (0, 1)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in unet.parameters())
    assert grown.down_blocks[0].attentions is not None and unet.down_blocks[0].attentions is None
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 384)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx), unet(x, t, ctx), rtol=0, atol=0)


def test_new_transformers_learn():
    grown = grow_attention(trained_like_unet(), (0, 1)).train()
    new = grown.down_blocks[0].attentions[0]
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 384)
    grown(x, t, ctx).square().mean().backward()
    assert new.proj_out.weight.grad.abs().sum() > 0  # the zero projection gets a gradient


def test_growth_only_adds_levels():
    unet = trained_like_unet()
    with pytest.raises(ValueError, match="must keep the model's levels"):
        grow_attention(unet, (0,))
    with pytest.raises(ValueError, match="out of range"):
        grow_attention(unet, (1, 2))


def test_train_init_with_more_attention_levels(tmp_path, capsys):
    vae = save_vae(tmp_path / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)
    base = ["train", "--run-dir", str(tmp_path / "base"), "--preset", "tiny", "--vae", str(vae), "--steps", "2"]
    assert main(base + FAST) == 0
    grow = ["train", "--run-dir", str(tmp_path / "grown"), "--init", str(tmp_path / "base" / "model"),
            "--attention-levels", "0,1"]
    assert main(grow + ["--steps", "2"] + FAST) == 0
    saved = json.loads((tmp_path / "grown" / "model" / "model.json").read_text())
    assert saved["config"]["unet"]["attention_levels"] == [0, 1]
    assert main(grow + ["--steps", "4"] + FAST) == 0  # a rerun resumes the grown run
    unet, _, cfg = load_model(tmp_path / "grown" / "model")
    assert cfg.unet.attention_levels == (0, 1) and unet.down_blocks[0].attentions is not None
    assert main(grow + ["--steps", "2", "--attention-levels", "0,x"] + FAST) == 2
    assert "comma-separated level numbers" in capsys.readouterr().err
    assert main(grow[:-1] + ["0"] + ["--steps", "2"] + FAST) == 2
    assert "must keep the model's levels" in capsys.readouterr().err
    fresh = ["train", "--run-dir", str(tmp_path / "fresh"), "--preset", "tiny", "--vae", str(vae), "--steps", "2"]
    assert main(fresh + ["--attention-levels", "0,5"] + FAST) == 2
    assert "out of range" in capsys.readouterr().err and not (tmp_path / "fresh" / "model").exists()


def test_grown_positions_compute_the_same_function_then_learn_where_tokens_are(tmp_path):
    from mezzotint.train import grow_positions
    from mezzotint.unet import grid_features
    unet = trained_like_unet()
    grown = grow_positions(unet, 3).eval()
    assert grown.cfg.positions == 3 and grown.mid_block.attentions[0].pos_proj.weight.shape[1] == 12
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 384)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx), unet(x, t, ctx), rtol=0, atol=1e-6)
    grown.train()(x, t, ctx).square().mean().backward()
    assert grown.mid_block.attentions[0].pos_proj.weight.grad.abs().sum() > 0
    # the features: unit-interval coordinates, k = 1 monotone left to right and top to bottom
    f = grid_features(4, 6, 2, "cpu", torch.float32).reshape(4, 6, 8)
    assert bool((f[0, 1:, 2] < f[0, :-1, 2]).all()) and bool((f[1:, 0, 6] < f[:-1, 0, 6]).all())
    torch.testing.assert_close(f[:, :, :4], f[:1, :, :4].expand(4, 6, 4))  # x features ignore the row
    with pytest.raises(ValueError, match="already has 3"):
        grow_positions(grown, 4)
    # a model with positions has no diffusers form
    from mezzotint.checkpoints import ModelError
    from mezzotint.sd.dconfig import diffusers_configs
    with pytest.raises(ModelError, match="positions"):
        diffusers_configs(PRESETS["tiny"].__class__(unet=grown.cfg))


def test_input_gate_grows_unchanged_and_can_shut_the_noise_out(tmp_path):
    from mezzotint.checkpoints import ModelError
    from mezzotint.config import ModelConfig
    from mezzotint.sd.dconfig import diffusers_configs
    from mezzotint.train import grow_input_gate
    unet = trained_like_unet()
    grown = grow_input_gate(unet).eval()
    assert grown.cfg.input_gate and not unet.cfg.input_gate and grown.grown == ("input_gate",)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 999.0]), torch.randn(2, 5, 384)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx), unet(x, t, ctx), rtol=0, atol=0)
    grown.train()(x, t, ctx).square().mean().backward()
    assert grown.input_gate.weight.grad.abs().sum() > 0
    with torch.no_grad():  # a scale of 0: the output no longer depends on the noisy latent
        grown.input_gate.bias.fill_(-1.0)
        grown.eval()
        assert torch.equal(grown(x, t, ctx), grown(torch.randn_like(x), t, ctx))
        assert not torch.equal(grown(x, t, ctx), grown(x, t, torch.randn_like(ctx)))
    with pytest.raises(ModelError, match="gates its first feature map"):
        diffusers_configs(ModelConfig(unet=grown.cfg))
    vae = save_vae(tmp_path / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)
    assert main(["train", "--run-dir", str(tmp_path / "base"), "--preset", "tiny", "--vae", str(vae),
                 "--steps", "2"] + FAST) == 0
    grow = ["train", "--run-dir", str(tmp_path / "gated"), "--init", str(tmp_path / "base" / "model"), "--input-gate"]
    assert main(grow + ["--steps", "2"] + FAST) == 0
    assert main(grow + ["--steps", "4"] + FAST) == 0  # a rerun resumes the grown run
    saved = json.loads((tmp_path / "gated" / "model" / "model.json").read_text())
    assert saved["config"]["unet"]["input_gate"] is True


def test_blank_terminal_gives_the_last_step_zeros_in_sampling_as_in_training(tmp_path, capsys):
    import dataclasses

    from mezzotint.checkpoints import ModelError
    from mezzotint.config import ModelConfig, SchedulerConfig
    from mezzotint.diffusion.denoiser import Denoiser
    from mezzotint.sd.dconfig import diffusers_configs
    sched = SchedulerConfig(prediction_type="v", rescale_betas_zero_snr=True, blank_terminal=True)
    unet = trained_like_unet()
    d, plain = Denoiser(unet, sched), Denoiser(unet, dataclasses.replace(sched, blank_terminal=False))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 384)
    with torch.no_grad():
        top, low = d.sigma_max, 14.6
        a, b = d(x, top, context=ctx), d(torch.randn_like(x), top, context=ctx)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * float(a.abs().max()))  # only x / (1 + sigma^2) differs
        assert not torch.allclose(plain(x, top, context=ctx), plain(torch.randn_like(x), top, context=ctx), atol=1e-2)
        assert torch.equal(d(x, low, context=ctx), plain(x, low, context=ctx))  # the other steps as before
    with pytest.raises(ModelError, match="zeros, not the noise"):
        diffusers_configs(ModelConfig(scheduler=sched))
    vae = save_vae(tmp_path / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)
    base = ["train", "--preset", "tiny", "--vae", str(vae), "--steps", "2", "--prediction", "v", "--blank-terminal"]
    assert main(base + ["--run-dir", str(tmp_path / "a")] + FAST) == 2
    assert "needs a zero-terminal-SNR schedule" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(base + ["--run-dir", str(tmp_path / "b"), "--zero-terminal-snr", "--terminal", "1"] + FAST) == 0
    saved = json.loads((tmp_path / "b" / "model" / "model.json").read_text())
    assert saved["config"]["scheduler"]["blank_terminal"] is True

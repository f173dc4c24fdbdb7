"""The text refiner (`UNetConfig.context_layers`): trainable self-attention blocks over the
frozen encoder's tokens. Grown onto a trained model they start as the identity; in inference
they run row by row, so a prompt's tokens do not depend on its batch."""
import json

import pytest
import torch

from mezzotint.checkpoints import ModelError, load_model, save_vae
from mezzotint.cli import main
from mezzotint.config import PRESETS
from mezzotint.sd.dconfig import diffusers_configs
from mezzotint.train import grow_context
from mezzotint.unet import UNet
from mezzotint.vae import AutoencoderKL

from test_grow import FAST, trained_like_unet


def perturbed(unet):
    with torch.no_grad():  # as if trained: the refiner's zero projections moved
        for p in unet.context_blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def inputs(batch=3, tokens=6):
    torch.manual_seed(1)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, 4:] = False
    return torch.randn(batch, 4, 8, 8), torch.tensor([10.0, 400.0, 900.0][:batch]), torch.randn(batch, tokens, 384), mask


def test_grown_refiner_computes_the_same_function():
    unet = trained_like_unet()
    grown = grow_context(unet, 2).eval()
    assert grown.cfg.context_layers == 2 and len(grown.context_blocks) == 2
    x, t, ctx, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx, mask), unet(x, t, ctx, mask), rtol=0, atol=0)


def test_refiner_learns_and_changes_the_output():
    unet = trained_like_unet()
    grown = grow_context(unet, 1).train()
    x, t, ctx, mask = inputs()
    grown(x, t, ctx, mask).square().mean().backward()
    block = grown.context_blocks[0]
    assert block.attn.to_out[0].weight.grad.abs().sum() > 0 and block.ff.net[2].weight.grad.abs().sum() > 0
    perturbed(grown).eval()
    with torch.no_grad():
        assert (grown(x, t, ctx, mask) - unet(x, t, ctx, mask)).abs().max() > 1e-3


def test_padding_and_batch_do_not_change_a_prompts_tokens():
    unet = perturbed(grow_context(trained_like_unet(), 2)).eval()
    _, _, ctx, mask = inputs()
    with torch.no_grad():
        out = unet.refine_context(ctx, mask)
        alone = unet.refine_context(ctx[1:2, :4], mask[1:2, :4])
        torch.testing.assert_close(out[1, :4], alone[0], rtol=1e-5, atol=1e-6)  # masked tokens unseen
        for k in range(3):  # row k of a batch equals a batch of one, bit for bit
            torch.testing.assert_close(out[k], unet.refine_context(ctx[k:k + 1], mask[k:k + 1])[0], rtol=0, atol=0)
        unet.train()
        torch.testing.assert_close(unet.refine_context(ctx, mask)[mask], out[mask], rtol=1e-4, atol=2e-5)


def test_refiner_only_grows_and_has_no_diffusers_form():
    unet = grow_context(trained_like_unet(), 2)
    with pytest.raises(ValueError, match="can only add blocks"):
        grow_context(unet, 1)
    cfg = PRESETS["tiny"]
    cfg = type(cfg)(**{**cfg.__dict__, "unet": unet.cfg})
    with pytest.raises(ModelError, match="refines the text tokens"):
        diffusers_configs(cfg)


def test_train_with_context_layers(tmp_path, capsys):
    vae = save_vae(tmp_path / "vae", AutoencoderKL(PRESETS["tiny"].vae), PRESETS["tiny"].vae)
    base = ["train", "--run-dir", str(tmp_path / "base"), "--preset", "tiny", "--vae", str(vae), "--steps", "2"]
    assert main(base + ["--context-layers", "1"] + FAST) == 0
    unet, _, cfg = load_model(tmp_path / "base" / "model")
    assert cfg.unet.context_layers == 1 and len(unet.context_blocks) == 1
    grow = ["train", "--run-dir", str(tmp_path / "grown"), "--init", str(tmp_path / "base" / "model"),
            "--context-layers", "2"]
    assert main(grow + ["--steps", "2"] + FAST) == 0
    saved = json.loads((tmp_path / "grown" / "model" / "model.json").read_text())
    assert saved["config"]["unet"]["context_layers"] == 2
    assert main(grow + ["--steps", "4"] + FAST) == 0  # a rerun resumes the grown run
    assert "resuming from" in capsys.readouterr().err
    assert main(grow[:-1] + ["0", "--steps", "2"] + FAST) == 2
    assert "can only add blocks" in capsys.readouterr().err
    assert main(base[:-2] + ["--steps", "2", "--context-layers", "-1"] + FAST) == 2
    assert "must be >= 0" in capsys.readouterr().err


def test_inference_refines_once_and_notices_new_weights_and_tokens():
    unet = perturbed(grow_context(trained_like_unet(), 1)).eval()
    calls = []
    unet.context_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    x, t, ctx, mask = inputs()
    with torch.inference_mode():
        first = unet(x, t, ctx, mask)
        for _ in range(3):  # a sampler's steps: same tokens, refined once
            unet(x, t, ctx.clone(), mask.clone())
    assert len(calls) == 3  # one pass per row, the first call only
    other = ctx.clone()
    other[2, 0, 0] += 1
    with torch.no_grad():
        unet(x, t, other, mask)
        assert len(calls) == 6
        new = {k: v * 1.5 if k.startswith("context_blocks.") else v for k, v in unet.state_dict().items()}
        unet.load_state_dict(new)  # in place, as an EMA swap does
        changed = unet(x, t, ctx, mask)
    assert len(calls) == 9 and (changed - first).abs().max() > 1e-4
    fresh = grow_context(trained_like_unet(), 1)
    fresh.load_state_dict(new)
    with torch.no_grad():
        torch.testing.assert_close(changed, fresh.eval()(x, t, ctx, mask), rtol=0, atol=0)
    unet(x, t, ctx, mask).square().mean().backward()  # with autograd the cache is not used
    assert unet.context_blocks[0].attn.to_q.weight.grad.abs().sum() > 0


def test_cross_attention_keeps_keys_and_values_while_tokens_and_weights_stay():
    from mezzotint.nn import Attention
    torch.manual_seed(0)
    attn = Attention(32, 2, 16, context_dim=384).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 5, 384)
    calls = []
    attn.to_k.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        first = attn(x, ctx)
        again = attn(torch.randn(2, 10, 32), ctx.clone())  # new queries, same tokens
    assert len(calls) == 2  # one per row, first call only
    with torch.no_grad():
        attn.to_v.weight.add_(0.1)  # an in-place edit, as a LoRA merge
        edited = attn(x, ctx)
        fresh = Attention(32, 2, 16, context_dim=384)
        fresh.load_state_dict(attn.state_dict())
        torch.testing.assert_close(edited, fresh(x, ctx), rtol=0, atol=0)
        assert (edited - first).abs().max() > 1e-3 and len(calls) == 4
        ctx2 = ctx.clone()
        ctx2[1, 4, 0] -= 1
        torch.testing.assert_close(attn(x, ctx2), fresh(x, ctx2), rtol=0, atol=0)
    assert again.shape == first.shape
    with torch.no_grad():
        attn(x, ctx)  # cached ...
    out = attn(x, ctx)  # ... but with autograd computed afresh and differentiable
    out.square().sum().backward()
    assert attn.to_k.weight.grad is not None


def test_training_makes_keys_and_values_for_the_batch_at_once():
    """Training computes the text tokens' keys and values in one call for the batch; the result
    and its gradients match the row-by-row inference path."""
    from mezzotint.nn import Attention
    torch.manual_seed(0)
    attn = Attention(32, 2, 16, context_dim=384).train()
    x, ctx = torch.randn(8, 10, 32), torch.randn(8, 5, 384)
    calls = []
    attn.to_k.register_forward_hook(lambda *a: calls.append(1))
    out = attn(x, ctx)
    assert len(calls) == 1
    out.square().sum().backward()
    grad = attn.to_k.weight.grad.clone()
    attn.zero_grad()
    attn.eval()  # with autograd but in eval mode: row by row, as inference
    rows = attn(x, ctx)
    assert len(calls) == 1 + 8
    rows.square().sum().backward()
    torch.testing.assert_close(out, rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, attn.to_k.weight.grad, rtol=1e-4, atol=1e-6)


def test_keys_and_values_kept_for_both_guidance_passes():
    """Guidance's passes, side by side, alternate two prompts' tokens: both stay kept."""
    from mezzotint.nn import KEPT_ENTRIES, Attention
    torch.manual_seed(0)
    attn = Attention(32, 2, 16, context_dim=384).eval()
    x, cond, uncond = torch.randn(1, 10, 32), torch.randn(1, 5, 384), torch.randn(1, 2, 384)
    calls = []
    attn.to_k.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        outs = [attn(x, c) for c in (cond, uncond) * 3]
        assert len(calls) == 2 and KEPT_ENTRIES >= 2
        torch.testing.assert_close(outs[4], outs[0], rtol=0, atol=0)
        attn(x, torch.randn(1, 3, 384))  # a third prompt pushes out the oldest (cond)
        attn(x, uncond)
        attn(x, cond)
    assert len(calls) == 4

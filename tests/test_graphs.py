"""Recorded graphs (graphs.py): traces give the eager outputs, follow weight edits, step aside
for autograd, hooks and probes; guidance's passes side by side equal the batched ones."""
import numpy as np
import pytest
import torch

from mezzotint import Pipeline, graphs
from mezzotint.config import PRESETS
from mezzotint.diffusion import CFGDenoiser
from mezzotint.pipeline import defaults_for
from mezzotint.unet import UNet


@pytest.fixture()
def unet():
    torch.manual_seed(0)
    u = UNet(PRESETS["tiny"].unet).eval()
    graphs.allow(u)
    return u


def _inputs(batch=2, length=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, length, PRESETS["tiny"].unet.context_dim, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, -2:] = False
    return x, torch.full((batch,), 321.0), context, mask


def test_trace_equals_eager_and_is_kept_per_shape(unet):
    x, t, c, m = _inputs()
    with torch.inference_mode():
        ref = unet._forward(x, t[:1], c, m)
        assert graphs.usable(unet, x)
        out = unet(x, t, c, m)
        again = unet(x, t, c, m)
        assert len(unet.__dict__["_graphs"]) == 1
        unet(*_inputs(batch=1, length=3))  # another shape: another trace
        assert len(unet.__dict__["_graphs"]) == 2
        no_mask = unet(x, t, c)
        assert torch.equal(no_mask, unet._forward(x, t[:1], c, None))
    assert torch.equal(out, ref) and torch.equal(again, ref)


def test_trace_takes_the_text_as_input_not_as_a_constant(unet):
    # the cross-attention's keys and values go in as the trace's inputs (UNet.forward)
    x, t, c, m = _inputs()
    other = torch.randn_like(c)
    with torch.inference_mode():
        first, second = unet(x, t, c, m), unet(x, t, other, m)
        assert len(unet.__dict__["_graphs"]) == 1
        assert torch.equal(first, unet._forward(x, t[:1], c, m))
        assert torch.equal(second, unet._forward(x, t[:1], other, m))
    assert not torch.equal(first, second)


def test_small_model_convs_all_packed_so_rows_round_alike(unet):
    assert all(m.pack_all for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert graphs.row_invariant(unet) == graphs.PACKED_CONV
    x, t, c, m = _inputs(batch=2)
    with torch.inference_mode():
        pair = unet._forward(x, t[:1], c, m)
        alone = unet._forward(x[1:], t[:1], c[1:], m[1:])
    if graphs.PACKED_CONV:
        assert torch.equal(pair[1:], alone)


def test_rows_split_over_two_traces_give_the_batch_bits(unet):
    # guidance's two passes as one batch, whose rows run as two traces side by side
    if not graphs.row_invariant(unet):
        pytest.skip("this PyTorch has no packed oneDNN convs: no split")
    x, t, c, m = _inputs(batch=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a split needs two (an earlier test may have left one)
    try:
        with torch.inference_mode():
            ref = unet._forward(x, t[:1], c, m)
            out = unet(x, t, c, m)
    finally:
        torch.set_num_threads(threads)
    assert {key[2][0][0] for key in unet.__dict__["_graphs"]} == {(2, 4, 8, 8)}  # one trace, half the rows
    assert torch.equal(out, ref)


def test_large_batches_split_eagerly_give_the_batch_bits(unet, monkeypatch):
    if not graphs.row_invariant(unet):
        pytest.skip("this PyTorch has no packed oneDNN convs: no split")
    graphs.allow(unet, False)  # eager
    x, t, c, m = _inputs(batch=graphs.SPLIT_EAGER_ROWS)
    halves = []
    in_halves = graphs.in_halves
    monkeypatch.setattr(graphs, "in_halves", lambda *a: halves.append(1) or in_halves(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            assert graphs.split_eager(unet, x) and not graphs.split_eager(unet, x[:-1])
            ref = unet._forward(x, t[:1], c, m)
            out = unet(x, t, c, m)
    finally:
        torch.set_num_threads(threads)
    assert halves and torch.equal(out, ref)


def test_trace_follows_weight_edits_and_replacements(unet):
    x, t, c, m = _inputs()
    with torch.inference_mode():
        before = unet(x, t, c, m)
    with torch.no_grad():
        unet.conv_out.weight.mul_(2.0)  # in place, as a LoRA merge or load_state_dict does
    with torch.inference_mode():
        edited = unet(x, t, c, m)
        assert not torch.equal(edited, before)
        assert torch.equal(edited, unet._forward(x, t[:1], c, m))
    lin = unet.mid_block.attentions[0].transformer_blocks[0].ff.net[2]
    with torch.no_grad():
        lin.weight.mul_(3.0)  # a parameter the inlined trace reads as an attribute
    with torch.inference_mode():
        assert torch.equal(unet(x, t, c, m), unet._forward(x, t[:1], c, m))
        assert not torch.equal(unet(x, t, c, m), edited)
    unet.conv_out.weight = torch.nn.Parameter(torch.zeros_like(unet.conv_out.weight))  # replaced
    with torch.inference_mode():
        assert torch.equal(unet(x, t, c, m), unet._forward(x, t[:1], c, m))


def test_no_trace_with_autograd_hooks_probes_or_when_not_allowed(unet):
    x, t, c, m = _inputs()
    assert not graphs.usable(unet, x)  # autograd on
    with torch.inference_mode():
        assert graphs.usable(unet, x)  # the hook dicts looked up (kept), then a hook added to one
        handle = unet.mid_block.register_forward_hook(lambda *a: None)
        assert not graphs.usable(unet, x)
        handle.remove()
        assert graphs.usable(unet, x)
        attn = unet.mid_block.attentions[0].transformer_blocks[0].attn2
        attn.probe = lambda w: None
        assert not graphs.usable(unet, x)
        attn.probe = None
        unet.train()
        assert not graphs.usable(unet, x)
        unet.eval()
        graphs.allow(unet, False)
        assert not graphs.usable(unet, x)
    # training through the module still has gradients
    unet.train()
    loss = unet(x, t, c, m).square().mean()
    loss.backward()
    assert unet.conv_in.weight.grad is not None


def test_side_by_side_guidance_equals_batched():
    def denoiser(x, sigma, context):
        return x * context.mean(dim=1, keepdim=True) + sigma.view(-1, 1) * 0.1  # row by row

    x = torch.randn(3, 4)
    cond, uncond = {"context": torch.full((3, 2), 2.0)}, {"context": torch.full((3, 2), -1.0)}
    with torch.inference_mode():
        batched = CFGDenoiser(denoiser, cond, uncond, 4.0)(x, torch.tensor(0.5))
        side = CFGDenoiser(denoiser, cond, uncond, 4.0, side_by_side=graphs.both)(x, torch.tensor(0.5))
    assert torch.allclose(batched, side, atol=1e-6)
    used = []

    def counted(f, g):
        used.append(1)
        return graphs.both(f, g)
    guided = CFGDenoiser(denoiser, cond, uncond, 4.0, side_by_side=counted, side_from=1)
    with torch.inference_mode():
        first, second = guided(x, torch.tensor(0.5)), guided(x, torch.tensor(0.5))
    assert len(used) == 1  # the first call as one batch (a large model's packing), then side by side
    assert torch.allclose(first, batched, atol=1e-6) and torch.allclose(second, batched, atol=1e-6)


def test_pipeline_second_run_traced_same_image(tiny_model):
    pipe = Pipeline.load(tiny_model, device="cpu")
    req = defaults_for(pipe.config, "a red circle above a blue square", steps=4, cfg=4.0)
    first = pipe(req)[0]  # eager, one batch: a one-off run makes no trace
    assert not pipe.unet.__dict__.get("_graphs")
    second = pipe(req)[0]
    assert pipe.unet.__dict__.get("_graphs")  # traces of the prompt's and the empty prompt's shapes
    # side by side at one thread each against one batch over both: the same bits where every
    # conv is packed (row_invariant), else the same up to rounding
    if graphs.row_invariant(pipe.unet):
        assert torch.equal(first.latent, second.latent)
    assert (first.latent - second.latent).abs().max() < 1e-4
    a, b = np.asarray(first.image, dtype=np.int16), np.asarray(second.image, dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    assert torch.get_num_threads() == min(2, torch.get_num_threads())  # the workers' setting stays theirs


def test_text_chunks_kept_across_calls_until_weights_change(tiny_pipe):
    text = tiny_pipe.text
    a, _ = text.encode(["a red circle", ""])
    cache = text.__dict__["_chunks"][1]
    assert len(cache) >= 2
    b, _ = text.encode(["a red circle", ""])
    assert torch.equal(a, b)
    w = next(text.model.parameters())
    with torch.no_grad():
        w.add_(0.5)
    try:
        c, _ = text.encode(["a red circle", ""])
        assert not torch.equal(a, c)  # encoded again with the edited weights
    finally:
        with torch.no_grad():
            w.sub_(0.5)


def test_small_models_prompts_padded_to_length_buckets(tiny_pipe):
    cond, uncond = tiny_pipe.encode_prompts(["a red circle", "a small blue square above a big green star"], "")
    for c in (cond, uncond):
        assert c["context"].shape[1] % 8 == 0
        assert not c["context"][~c["context_mask"]].any()  # padding is masked zeros
    tokens = [len(t) for t in tiny_pipe.text.tokenize("a red circle")]
    assert int(cond["context_mask"][0].sum()) == sum(tokens)
    assert int(uncond["context_mask"][0].sum()) == 2  # [CLS] [SEP]

"""The speed paths: oneDNN linear layers (exact: same products, other summation order) and
`--dtype fast` (the fastest precision the device runs natively)."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mezzotint import nn as mnn
from mezzotint.cli import main
from mezzotint.pipeline import native_bf16, resolve_dtype

CPU = torch.device("cpu")


def ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.fixture
def onednn_always(monkeypatch):
    monkeypatch.setattr(mnn, "ONEDNN_MIN_MACS", 0)  # small test products take the fast path too


@pytest.mark.parametrize("shape", [(5, 7), (2, 9, 7), (3, 0, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_torch_linear(shape, bias, onednn_always):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(11, 7, generator=g)
    b = torch.randn(11, generator=g) if bias else None
    with torch.inference_mode():
        for xx in (x, x.transpose(0, -2)):  # strided input too
            torch.testing.assert_close(mnn.linear(xx, w, b), F.linear(xx, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not mnn._ONEDNN, reason="this PyTorch has no oneDNN")
def test_linear_takes_onednn_for_inference_and_torch_for_training(onednn_always):
    layer = mnn.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in ops_run(lambda: layer(x))
    xg = x.clone().requires_grad_(True)
    names = ops_run(lambda: layer(xg).square().sum().backward())
    assert "mkldnn::_linear_pointwise" not in names  # it has no backward
    ref = torch.nn.Linear(16, 8)
    ref.load_state_dict(layer.state_dict())  # the same parameters and names
    xr = x.clone().requires_grad_(True)
    ref(xr).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)


@pytest.mark.skipif(not mnn._ONEDNN, reason="this PyTorch has no oneDNN")
def test_linear_keeps_small_products_on_torch():
    big, small = torch.randn(512, 256), torch.randn(4, 16)
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in ops_run(lambda: mnn.linear(big, torch.randn(512, 256)))
        assert "mkldnn::_linear_pointwise" not in ops_run(lambda: mnn.linear(small, torch.randn(8, 16)))


def test_fast_dtype_follows_the_hardware(monkeypatch):
    import mezzotint.pipeline as p
    assert resolve_dtype("fast", CPU) == (torch.bfloat16 if native_bf16(CPU) else torch.float32)
    monkeypatch.setattr(p, "native_bf16", lambda device: False)
    assert p.resolve_dtype("fast", CPU) == torch.float32  # emulated bf16 would be slower, not faster
    monkeypatch.setattr(p, "native_bf16", lambda device: True)
    assert p.resolve_dtype("fast", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="allowed: fast, float32"):
        resolve_dtype("int4", CPU)


@pytest.mark.parametrize("flag", [["--fast"], ["--dtype", "fast"]])
def test_generate_fast_records_the_precision_it_ran(tiny_model, tmp_path, flag):
    out = tmp_path / "fast.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model), "--steps", "3", "--output", str(out),
                 *flag]) == 0
    rec = json.loads(Image.open(out).text["mezzotint"])
    assert rec["dtype"] == str(resolve_dtype("fast", CPU)).removeprefix("torch.")


def test_default_model_fast_is_close_to_float32(tmp_path):
    """The shipped model in fast mode: the same picture up to small pixel differences."""
    import numpy as np

    from mezzotint import Pipeline
    from mezzotint.cli import DEFAULT_MODEL
    from mezzotint.pipeline import defaults_for
    exact = Pipeline.load(DEFAULT_MODEL, device="cpu")
    fast = Pipeline.load(DEFAULT_MODEL, device="cpu", dtype="fast")
    req = defaults_for(exact.config, "a red circle to the left of a blue square", seed=3)
    a, b = (np.asarray(p(req)[0].image, dtype=np.float64) for p in (exact, fast))
    assert np.abs(a - b).mean() < 6.0  # of 255


@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_bf16_load_reads_and_converts_without_mapping(layout):
    """A bfloat16 load of a float32 Stable Diffusion checkpoint: the same weights as the
    float32 load rounded to bf16; the text encoder stays float32 on the CPU, unrounded."""
    from test_sd_common import saved

    from mezzotint.sd import load_sd
    folder, single = saved("sd1")
    path = single if layout == "single" else folder
    u32, v32, t32, _ = load_sd(path, "cpu", torch.float32)
    u16, v16, t16, _ = load_sd(path, "cpu", torch.bfloat16)
    for a, b in ((u32, u16), (v32, v16)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sb[k].dtype == torch.bfloat16 and torch.equal(sb[k], sa[k].to(torch.bfloat16)), k
    ta, tb = t32.model.state_dict(), t16.model.state_dict()
    assert all(tb[k].dtype == ta[k].dtype and torch.equal(tb[k], ta[k]) for k in ta)


def test_bf16_load_of_a_truncated_file_is_a_clear_error(tmp_path):
    from test_sd_common import saved

    from mezzotint.checkpoints import ModelError
    from mezzotint.sd import load_sd
    _, single = saved("sd1")
    cut = tmp_path / "cut.safetensors"
    data = single.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt"):
        load_sd(cut, "cpu", torch.bfloat16)


def test_cast_read_gives_each_tensor_its_own_memory(tmp_path):
    """The bf16 load reads every tensor through one buffer: nothing kept may point into it."""
    from safetensors.torch import save_file

    from mezzotint.sd.tensors import _read_cast
    ts = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(40), "c": torch.arange(4),
          "keep.d": torch.randn(2), "e": torch.zeros(0, 3)}
    save_file(ts, tmp_path / "w.safetensors")
    got = _read_cast(tmp_path / "w.safetensors", torch.bfloat16, ("keep.",))
    want = {"a": ts["a"], "b": ts["b"].to(torch.bfloat16), "c": ts["c"], "keep.d": ts["keep.d"],
            "e": ts["e"].to(torch.bfloat16)}
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    ptrs = [t.untyped_storage().data_ptr() for t in got.values() if t.numel()]
    assert len(set(ptrs)) == len(ptrs)


def test_bf16_inference_runs_channels_last_and_answers_in_the_usual_layout(tiny_pipe, monkeypatch):
    """bfloat16 on the CPU: the UNet and the decoder run channels-last (oneDNN's bf16 kernels
    want it), give contiguous outputs, and agree with the NCHW run to bf16 rounding; float32,
    training and small latents keep NCHW."""
    import copy
    unet = copy.deepcopy(tiny_pipe.unet).to(torch.bfloat16).eval()
    vae = copy.deepcopy(tiny_pipe.vae).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    c = unet.cfg.in_channels
    x = torch.randn(2, c, 32, 32, generator=g).to(torch.bfloat16)
    ctx, mask = tiny_pipe.text.encode(["", "a red circle"])
    t = torch.full((2,), 500.0)
    with torch.inference_mode():
        assert mnn.channels_last_wanted(x) and not mnn.channels_last_wanted(x.float())
        assert not mnn.channels_last_wanted(x[..., :16, :16])  # small latents: per-op overhead rules
        seen = []  # per conv call: (channels-last, and only channels-last)
        real = mnn.Conv2d.forward
        monkeypatch.setattr(mnn.Conv2d, "forward", lambda self, h: seen.append((
            h.is_contiguous(memory_format=torch.channels_last), not h.is_contiguous())) or real(self, h))
        out, img = unet(x, t, ctx.to(torch.bfloat16), mask), vae.decode(x[:1])
        assert seen and all(cl for cl, _ in seen) and any(only for _, only in seen)
        assert out.is_contiguous() and img.is_contiguous()
        import mezzotint.vae
        for where in (mnn, mezzotint.vae):
            monkeypatch.setattr(where, "channels_last_wanted", lambda x, *a: False)
        seen.clear()
        ref, ref_img = unet(x, t, ctx.to(torch.bfloat16), mask), vae.decode(x[:1])
        assert seen and not any(only for _, only in seen)
    for a, b in ((out, ref), (img, ref_img)):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 0.02
    with torch.enable_grad():
        assert not mnn.channels_last_wanted(x)


def test_float32_decoder_runs_large_latents_channels_last(tiny_pipe, monkeypatch):
    """float32 CPU decoding of latents from 64x64 on runs channels-last (faster at full
    resolution), answers contiguous and agrees with the NCHW decode to float32 rounding;
    smaller latents and training keep NCHW."""
    import mezzotint.vae as mvae
    vae = tiny_pipe.vae
    c = tiny_pipe.unet.cfg.in_channels
    z = torch.randn(1, c, 64, 64, generator=torch.Generator().manual_seed(0))
    assert not mvae.decode_channels_last(z)  # gradients: NCHW
    with torch.no_grad():
        assert mvae.decode_channels_last(z) and not mvae.decode_channels_last(z[..., :32, :32])
    seen = []
    real = mnn.Conv2d.forward
    monkeypatch.setattr(mnn.Conv2d, "forward", lambda self, h: seen.append(
        not h.is_contiguous()) or real(self, h))
    with torch.inference_mode():
        img = vae.decode(z)
        assert seen and any(seen)
        monkeypatch.setattr(mvae, "decode_channels_last", lambda z: False)
        seen.clear()
        ref = vae.decode(z)
        assert seen and not any(seen)
    assert img.is_contiguous() and img.shape == ref.shape
    assert (img - ref).abs().max() < 1e-4 and not torch.equal(img, torch.zeros_like(img))

"""Convs on packed oneDNN weights (CPU inference) and giving back the file pages they replace."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mezzotint import nn as mnn
from mezzotint.pages import release

pytestmark = pytest.mark.skipif(not mnn._PACKED_CONV, reason="this PyTorch has no packed oneDNN convs")
bf16 = pytest.mark.skipif(not mnn.ONEDNN_BF16,
                          reason="no oneDNN bf16 on this CPU (needs AVX512 BW/VL/DQ or AVX-NE-CONVERT)")


@pytest.fixture(autouse=True)
def pack_always(request, monkeypatch):
    if "real_thresholds" not in request.keywords:
        monkeypatch.setattr(mnn, "ONEDNN_MIN_MACS", 0)  # small test convs take the packed path too
        monkeypatch.setattr(mnn, "PACK_MIN_RATIO", 0)


def packed(conv) -> bool:
    return "_pack" in conv.__dict__


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=0),
                                dict(kernel_size=1), dict(kernel_size=3, padding=1, bias=False)])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=bf16)])
def test_packed_conv_equals_torch_conv(kw, dtype):
    torch.manual_seed(0)
    conv = mnn.Conv2d(6, 10, **kw).to(dtype)
    ref = torch.nn.Conv2d(6, 10, **kw).to(dtype)
    ref.load_state_dict(conv.state_dict())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.inference_mode():
        for shape in [(2, 6, 9, 9), (1, 6, 5, 7), (3, 6, 8, 8)]:  # packed once, any shape after
            x = torch.randn(shape).to(dtype)
            for xx in (x, x.contiguous(memory_format=torch.channels_last)):
                out = conv(xx)
                torch.testing.assert_close(out.float(), ref(xx).float(), **tol)
                assert out.is_contiguous(memory_format=torch.channels_last) == (xx.dim() == 4 and xx is not x) \
                    or out.is_contiguous()
    assert packed(conv)


def test_bf16_runs_on_any_cpu(monkeypatch):
    """Where oneDNN has no bf16 (an AVX2 CPU), bf16 inference takes F.conv2d and F.linear
    instead of failing in oneDNN."""
    monkeypatch.setattr(mnn, "ONEDNN_BF16", False)
    monkeypatch.setattr(mnn, "ONEDNN_MIN_MACS", 0)
    lin = mnn.Linear(6, 10).to(torch.bfloat16)
    with torch.inference_mode():
        y = torch.randn(3, 6).to(torch.bfloat16)
        torch.testing.assert_close(lin(y), F.linear(y, lin.weight, lin.bias), rtol=0, atol=0)
    torch.manual_seed(0)
    conv = mnn.Conv2d(6, 10, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(2, 6, 9, 9).to(torch.bfloat16)
    with torch.inference_mode():
        out = conv(x)
    assert not packed(conv)
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=0, atol=0)
    assert mnn.prepack(torch.nn.Sequential(conv)) == 0


@pytest.mark.real_thresholds
def test_only_convs_whose_weights_outweigh_their_input_are_packed():
    small_image_wide = mnn.Conv2d(512, 512, 3, padding=1)  # SD's low-resolution levels
    large_image_narrow = mnn.Conv2d(64, 64, 3, padding=1)  # the decoder's last levels
    with torch.inference_mode():
        small_image_wide(torch.randn(1, 512, 4, 4))
        large_image_narrow(torch.randn(1, 64, 64, 64))
    assert packed(small_image_wide) and not packed(large_image_narrow)


def test_training_keeps_torch_conv_and_its_gradients():
    conv, ref = mnn.Conv2d(4, 5, 3, padding=1), torch.nn.Conv2d(4, 5, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 6, 6)
    conv(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert not packed(conv)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad)


def test_weights_changed_in_place_are_packed_again():
    conv = mnn.Conv2d(4, 5, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        before = conv(x)
        conv.weight.add_(0.5)  # what a LoRA merge does
        after = conv(x)
        torch.testing.assert_close(after, F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=bf16)])
def test_1x1_convs_are_packed_again_for_another_input_size_and_3x3_ones_are_not(dtype):
    # a 1x1 pack made for 8x8 and run at 4x4 was 50-250x slower (nn.Conv2d.pack_size)
    one, three = mnn.Conv2d(64, 32, 1).to(dtype), mnn.Conv2d(64, 32, 3, padding=1).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.inference_mode():
        for conv in (one, three):
            conv(torch.randn(2, 64, 8, 8).to(dtype))
        first = [conv.__dict__["_pack"][2] for conv in (one, three)]
        for conv, padding in ((one, 0), (three, 1)):
            x = torch.randn(2, 64, 4, 4).to(dtype)
            torch.testing.assert_close(conv(x).float(), F.conv2d(x, conv.weight, conv.bias, padding=padding).float(),
                                       **tol)
    assert one.__dict__["_pack"][1] == (4, 4) and one.__dict__["_pack"][2] is not first[0]
    assert three.__dict__["_pack"][1] is None and three.__dict__["_pack"][2] is first[1]


def test_a_module_with_a_pack_can_be_copied():
    conv = mnn.Conv2d(4, 5, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        out = conv(x)
        twin = copy.deepcopy(conv)
        assert not packed(twin)
        torch.testing.assert_close(twin(x), out)


def rss_of(t: torch.Tensor) -> int:
    """Resident bytes of t's pages, from /proc/self/pagemap."""
    import os
    import struct
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = t.data_ptr() // page, (t.data_ptr() + t.numel() * t.element_size() - 1) // page + 1
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo * 8)
        entries = struct.unpack(f"<{hi - lo}Q", f.read((hi - lo) * 8))
    return sum(page for e in entries if e >> 63)


@pytest.mark.skipif(not torch.cuda.is_available() and not __import__("sys").platform.startswith("linux"),
                    reason="pages are given back on Linux only")
def test_release_gives_back_clean_file_pages_only(tmp_path):
    torch.manual_seed(0)
    want = {"a": torch.randn(256, 1024), "b": torch.randn(256, 1024)}
    save_file(want, tmp_path / "w.safetensors")
    got = load_file(tmp_path / "w.safetensors")  # memory-mapped
    a, b = got["a"], got["b"]
    assert torch.equal(a, want["a"]) and torch.equal(b, want["b"])  # every page read in
    assert rss_of(a) >= a.nbytes // 2
    assert release(a) > 0
    assert rss_of(a) <= 2 * 4096  # at most the two shared edge pages stay
    assert torch.equal(a, want["a"])  # read back from the file
    with torch.no_grad():
        b[7, 7] += 1.0  # a private copy of one page now: giving b's pages back would lose it
    assert release(b) == 0 and b[7, 7] == want["b"][7, 7] + 1.0
    anon = want["a"].clone()
    assert release(anon) == 0 and torch.equal(anon, want["a"])  # not from a file: kept


def test_packing_gives_back_a_mapped_weight(tmp_path):
    conv = mnn.Conv2d(64, 64, 3, padding=1)
    save_file({k: v.contiguous() for k, v in conv.state_dict().items()}, tmp_path / "c.safetensors")
    conv.load_state_dict(load_file(tmp_path / "c.safetensors"), assign=True)
    x = torch.randn(1, 64, 8, 8)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert rss_of(conv.weight) > conv.weight.nbytes // 2
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    assert rss_of(conv.weight) <= 2 * 4096
    assert torch.equal(conv.state_dict()["weight"], load_file(tmp_path / "c.safetensors")["weight"])


@pytest.mark.real_thresholds
def test_pack_all_gives_a_row_the_same_bits_in_any_batch_and_at_any_thread_count():
    # what lets a small model's guidance passes run side by side (graphs.side_by_side):
    # F.conv2d rounds a row alone differently from the same row in a batch at one thread
    torch.manual_seed(0)
    conv = mnn.Conv2d(64, 32, 3, padding=1)
    conv.pack_all = True  # a conv far below the size thresholds
    x = torch.randn(16, 64, 16, 16)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            alone, in_batch = conv(x[3:4]), conv(x)[3:4]
            torch.set_num_threads(2)
            two_threads = conv(x[3:4])
    finally:
        torch.set_num_threads(threads)
    assert packed(conv)
    assert torch.equal(alone, in_batch) and torch.equal(alone, two_threads)
    torch.testing.assert_close(alone, F.conv2d(x[3:4], conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)


@bf16
@pytest.mark.real_thresholds
def test_prepack_packs_bf16_convs_once_for_every_input_size():
    torch.manual_seed(0)
    wide, narrow = mnn.Conv2d(256, 256, 3, padding=1), mnn.Conv2d(16, 16, 3, padding=1)
    model = torch.nn.Sequential(wide, narrow).to(torch.bfloat16).eval()
    refs = [torch.nn.Conv2d(c, c, 3, padding=1).to(torch.bfloat16) for c in (256, 16)]
    for ref, conv in zip(refs, (wide, narrow)):
        ref.load_state_dict(conv.state_dict())
    assert mnn.prepack(model) == 2 and wide.has_pack() and narrow.has_pack()
    packs = [conv.__dict__["_pack"][2] for conv in (wide, narrow)]
    with torch.inference_mode():
        for ref, conv, c in zip(refs, (wide, narrow), (256, 16)):
            for size in (4, 40):  # 40x40 of 16 channels: the size rule alone would not pack
                x = torch.randn(2, c, size, size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
                assert conv.uses_pack(x)
                torch.testing.assert_close(conv(x).float(), ref(x).float(), rtol=2e-2, atol=2e-2)
    assert [conv.__dict__["_pack"][2] for conv in (wide, narrow)] == packs  # never packed again


@bf16
@pytest.mark.real_thresholds
def test_a_prepacked_conv_whose_weights_change_follows_them():
    narrow = mnn.Conv2d(16, 16, 3, padding=1).to(torch.bfloat16).eval()
    mnn.prepack(narrow)
    with torch.no_grad():
        narrow.weight.mul_(2)  # a LoRA merge edits in place
    x = torch.randn(2, 16, 40, 40).to(torch.bfloat16)
    with torch.inference_mode():
        assert not narrow.has_pack() and not narrow.uses_pack(x)  # back to the size rule: F.conv2d
        torch.testing.assert_close(narrow(x).float(), F.conv2d(x, narrow.weight, narrow.bias, padding=1).float(),
                                   rtol=2e-2, atol=2e-2)


def test_prepack_leaves_float32_alone():
    model = mnn.Conv2d(8, 8, 3, padding=1).eval()
    assert mnn.prepack(model) == 0 and not packed(model)


@bf16
def test_pipeline_load_prepacks_large_bf16_unets_only(tiny_model, monkeypatch):
    from mezzotint import Pipeline, pages
    convs = lambda pipe: [m for m in pipe.unet.modules() if isinstance(m, mnn.Conv2d)]  # noqa: E731
    assert not any(packed(c) for c in convs(Pipeline.load(tiny_model, "cpu", "bfloat16")))  # small: by size
    assert not any(packed(c) for c in convs(Pipeline.load(tiny_model, "cpu", "float32")))
    monkeypatch.setattr(pages, "STREAM_MIN_BYTES", 0)  # the tiny model counts as large
    pipe = Pipeline.load(tiny_model, "cpu", "bfloat16")
    assert convs(pipe) and all(c.has_pack() for c in convs(pipe))

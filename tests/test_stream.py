"""Large models' weights streamed from the page cache (pages.stream): each layer gives its
file pages back after its forward; outputs stay the same, LoRA-written pages stay put; where
the page cache does not keep them, streaming stops (watch)."""
import os
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_packed_conv import rss_of

from mezzotint import graphs, nn, pages
from mezzotint.pipeline import Pipeline, Request

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are given back on Linux only")


def mapped_mlp(tmp_path):
    """A 3-layer MLP whose weights (8 MB each) are memory-mapped from a .safetensors file."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 1024),
                              torch.nn.LayerNorm(1024))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "net.safetensors")
    net.load_state_dict(load_file(tmp_path / "net.safetensors"), assign=True)
    return net.eval()


def resident(net) -> int:
    return sum(rss_of(p) for p in net.parameters() if p.nbytes >= 4096)


# a fault may map some of the neighbourhood back: fault-around (16 pages) or a whole large
# folio of the page cache (2 MB at most)
AROUND = 2 << 20


def test_layers_give_their_pages_back_and_outputs_stay(tmp_path):
    net = mapped_mlp(tmp_path)
    x = torch.randn(4, 1024)
    with torch.no_grad():
        ref = net(x)
    big = [p for p in net.parameters() if p.nbytes >= 4096]
    assert resident(net) >= sum(p.nbytes for p in big) // 2  # read in by the forward
    handles = pages.stream(net, min_bytes=0)
    assert handles.layers == 2  # the two linears; the norm's 4 KiB tensors stay (STREAM_TENSOR_BYTES)
    assert handles.stopped is None
    seen = []
    net[2].register_forward_pre_hook(lambda m, a: seen.append(rss_of(net[0].weight)))
    with torch.no_grad():
        for _ in range(2):  # the second call faults every page back from the file
            assert torch.equal(net(x), ref)
            assert resident(net) <= 2 * AROUND  # of 16 MB: what the last two faults mapped back at most
    assert max(seen) <= AROUND  # layer 0's 8 MB were gone before layer 2 ran
    handles.remove()
    with torch.no_grad():
        net(x)
    assert resident(net) >= sum(p.nbytes for p in big) // 2  # removed: pages stay again


def test_written_pages_are_kept(tmp_path):
    """A LoRA merge writes into the mapped weights: those pages are private copies now and
    must survive (giving them back would silently undo the merge)."""
    net = mapped_mlp(tmp_path)
    pages.stream(net, min_bytes=0)
    x = torch.randn(4, 1024)
    with torch.no_grad():
        net[0].weight[3, :] += 0.5  # one row: a page or two become private
        want = net(x).clone()
        assert torch.equal(net(x), want)
    assert rss_of(net[0].weight) > 0
    assert pages.release_model(net) < sum(p.nbytes for p in net.parameters())


def test_small_and_anonymous_models_are_left_alone(tmp_path):
    net = mapped_mlp(tmp_path)
    assert pages.stream(net) is None  # 16 MB: under STREAM_MIN_BYTES
    anon = torch.nn.Linear(256, 256)
    assert pages.stream(anon, min_bytes=0) is None  # nothing mapped from a file
    w = anon.weight.detach().clone()
    with torch.no_grad():
        anon(torch.randn(2, 256))
    assert torch.equal(anon.weight, w) and rss_of(anon.weight) > 0  # not from a file: kept


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_streamed_stable_diffusion_gives_the_same_image(monkeypatch):
    from test_sd_common import saved
    _, single = saved("sd1")
    req = Request("a red lighthouse", seed=3, steps=3, sampler="euler", cfg=7.5, width=64, height=64)
    monkeypatch.setenv("MEZZOTINT_STREAM_WEIGHTS", "0")  # never
    plain = Pipeline.load(single, "cpu")
    assert not any(m._forward_hooks for m in plain.unet.modules()) and plain.streams == {}
    [want] = plain(req)
    monkeypatch.delenv("MEZZOTINT_STREAM_WEIGHTS", raising=False)  # auto, the default: streams, watched
    monkeypatch.setattr(pages, "STREAM_MIN_BYTES", 0)  # the tiny test model streams too
    pipe = Pipeline.load(single, "cpu")
    assert set(pipe.streams) == {"text", "unet", "vae"}
    assert all(s.watch for s in pipe.streams.values())
    for part in (pipe.text, pipe.unet, pipe.vae):
        assert any(m._forward_hooks for m in part.modules())
    for _ in range(2):
        [got] = pipe(req)
        assert torch.equal(got.latent, want.latent) and got.image.tobytes() == want.image.tobytes()
    assert all(s.stopped is None for s in pipe.streams.values())  # the page cache kept the pages
    # tensors this small share the kernel's fault-around windows (16 pages) with their
    # neighbours, so some pages come back unasked; SD's are megabytes each
    for model, most in ((plain, 0.9), (pipe, 0.5)):
        # a packed conv's weights are given back in either mode (its packed copy replaces them)
        packed = {id(m.weight) for m in model.unet.modules() if "_pack" in m.__dict__}
        big = [p for p in model.unet.parameters() if p.nbytes >= 64 * 1024 and id(p) not in packed]
        share = sum(rss_of(p) for p in big) / sum(p.nbytes for p in big)
        assert share >= most if model is plain else share <= most


@pytest.mark.skipif(not nn._PACKED_CONV, reason="no packed convs in this PyTorch build")
@pytest.mark.parametrize("small_latents", [False, True])
def test_streamed_unet_drops_its_packs_before_decoding_large_latents(monkeypatch, small_latents):
    """A streamed UNet frees its convs' packed copies before the autoencoder decodes latents
    larger than KEEP_PACKS_MAX_LATENT (its activations would sit on top of them); the next
    image packs again, same bits. Smaller latents (this model's 8x8) keep them."""
    import mezzotint.pipeline as mp
    if not small_latents:
        monkeypatch.setattr(mp, "KEEP_PACKS_MAX_LATENT", 8 * 8 - 1)
    from test_sd_common import saved
    _, single = saved("sd1")
    monkeypatch.setattr(nn, "ONEDNN_MIN_MACS", 0)  # the tiny model's convs pack as SD's do
    monkeypatch.setattr(nn, "PACK_MIN_RATIO", 0)
    monkeypatch.setattr(graphs, "MAX_PARAMS", 0)  # and it runs eager, as large models do (no traces)
    req = Request("a red lighthouse", seed=3, steps=2, sampler="euler", cfg=7.5, width=64, height=64)
    seen = []

    def packs(*_, **__):
        seen.append(sum("_pack" in m.__dict__ for m in pipe.unet.modules()))
    images = {}
    for mode in ("0", "auto"):
        monkeypatch.setenv("MEZZOTINT_STREAM_WEIGHTS", mode)
        monkeypatch.setattr(pages, "STREAM_MIN_BYTES", 0)
        pipe = Pipeline.load(single, "cpu")
        seen.clear()
        images[mode] = [pipe(req, callback=packs)[0].image.tobytes() for _ in range(2)]
        left = sum("_pack" in m.__dict__ for m in pipe.unet.modules())
        assert min(seen) > 0  # packed while sampling, in both modes
        assert left == (0 if mode == "auto" and not small_latents else seen[-1])
    assert images["0"][0] == images["0"][1] == images["auto"][0] == images["auto"][1]


def test_stream_setting_is_checked(monkeypatch):
    from test_sd_common import saved
    _, single = saved("sd1")
    monkeypatch.setenv("MEZZOTINT_STREAM_WEIGHTS", "yes")
    with pytest.raises(ValueError, match="MEZZOTINT_STREAM_WEIGHTS='yes'.*auto"):
        Pipeline.load(single, "cpu")
    monkeypatch.setenv("MEZZOTINT_STREAM_WEIGHTS", "1")  # always: streams without the watch
    monkeypatch.setattr(pages, "STREAM_MIN_BYTES", 0)
    pipe = Pipeline.load(single, "cpu")
    assert set(pipe.streams) == {"text", "unet", "vae"}
    assert not any(s.watch for s in pipe.streams.values())


def evict(path) -> None:
    """Ask the kernel to drop the file's unmapped pages from the page cache (written back
    first: dirty pages, as a freshly saved file has, are not dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_cached_share_sees_what_the_page_cache_holds(tmp_path):
    net = mapped_mlp(tmp_path)
    big = [p for p in net.parameters() if p.nbytes >= 4096]
    with torch.no_grad():
        net(torch.randn(2, 1024))
    assert pages.cached_share(big) > 0.99  # just read
    pages.release_model(net)
    assert pages.cached_share(big) > 0.99  # unmapped, but the page cache keeps them
    evict(tmp_path / "net.safetensors")
    share = pages.cached_share(big)
    if share > 0.5:
        pytest.skip(f"this file system keeps the pages ({share:.0%}; tmpfs holds its only copy)")
    assert share < 0.1


def test_watch_stops_streaming_where_the_page_cache_drops_the_pages(tmp_path):
    """Where the page cache does not keep what was given back (DAMON pageout, memory
    pressure), each call would read the weights from disk: the stream stops, results stay."""
    net = mapped_mlp(tmp_path)
    x = torch.randn(4, 1024)
    with torch.no_grad():
        ref = net(x)
    s = pages.stream(net, min_bytes=0, watch=True)
    assert s.layers == 2
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(net(x), ref)
    assert s.stopped is None  # kept by the page cache: streaming goes on
    assert resident(net) <= 2 * AROUND
    evict(tmp_path / "net.safetensors")
    if pages.cached_share([net[0].weight]) > 0.5:
        pytest.skip("this file system keeps the pages (tmpfs holds its only copy)")
    for _ in range(pages.ASK_EVERY):  # the cache asked on every ASK_EVERY-th call of a layer
        with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert torch.equal(net(x), ref)
        if s.stopped is not None:
            break
        evict(tmp_path / "net.safetensors")  # as a reclaimer would, again and again
    assert s.stopped is not None and "page cache had lost" in s.stopped and s.handles == []
    assert any("stop streaming and stay resident" in str(w.message) for w in seen)  # said once, when it stops
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    with torch.no_grad():
        assert torch.equal(net(x), ref)
    big = [p for p in net.parameters() if p.nbytes >= 4096]
    assert resident(net) >= sum(p.nbytes for p in big) // 2  # read in once, kept from then on


def test_watch_ignores_packed_convs(tmp_path):
    """A packed conv reads its packed copy: the cache may drop its file pages without cost."""
    from mezzotint.nn import _PACKED_CONV, Conv2d
    if not _PACKED_CONV:
        pytest.skip("no packed convs in this PyTorch build")
    torch.manual_seed(0)
    conv = Conv2d(256, 256, 3, padding=1)
    conv.pack_all = True
    save_file({k: v.contiguous() for k, v in conv.state_dict().items()}, tmp_path / "conv.safetensors")
    conv.load_state_dict(load_file(tmp_path / "conv.safetensors"), assign=True)
    net = torch.nn.Sequential(conv).eval()
    x = torch.randn(1, 256, 8, 8)
    s = pages.stream(net, min_bytes=0, watch=True)
    with torch.inference_mode():
        ref = net(x)
        evict(tmp_path / "conv.safetensors")
        assert torch.equal(net(x), ref)
    assert s.stopped is None

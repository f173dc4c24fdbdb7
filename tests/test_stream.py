"""Large models' weights streamed from the page cache (pages.stream): each layer gives its
file pages back after its forward; outputs stay the same, LoRA-written pages stay put."""
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_packed_conv import rss_of

from mezzotint import pages
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
    assert len(handles) == 3  # the two linears and the norm (4 KiB tensors: a page each at most)
    seen = []
    net[2].register_forward_pre_hook(lambda m, a: seen.append(rss_of(net[0].weight)))
    with torch.no_grad():
        for _ in range(2):  # the second call faults every page back from the file
            assert torch.equal(net(x), ref)
            assert resident(net) <= 2 * AROUND  # of 16 MB: what the last two faults mapped back at most
    assert max(seen) <= AROUND  # layer 0's 8 MB were gone before layer 2 ran
    for h in handles:
        h.remove()
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
    assert pages.stream(net) == []  # 16 MB: under STREAM_MIN_BYTES
    anon = torch.nn.Linear(256, 256)
    pages.stream(anon, min_bytes=0)
    w = anon.weight.detach().clone()
    with torch.no_grad():
        anon(torch.randn(2, 256))
    assert torch.equal(anon.weight, w) and rss_of(anon.weight) > 0  # not from a file: kept


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_streamed_stable_diffusion_gives_the_same_image(monkeypatch):
    from test_sd_common import saved
    _, single = saved("sd1")
    req = Request("a red lighthouse", seed=3, steps=3, sampler="euler", cfg=7.5, width=64, height=64)
    monkeypatch.delenv("MEZZOTINT_STREAM_WEIGHTS", raising=False)  # off by default
    plain = Pipeline.load(single, "cpu")
    assert not any(m._forward_hooks for m in plain.unet.modules())
    [want] = plain(req)
    monkeypatch.setenv("MEZZOTINT_STREAM_WEIGHTS", "1")
    monkeypatch.setattr(pages, "STREAM_MIN_BYTES", 0)  # the tiny test model streams too
    pipe = Pipeline.load(single, "cpu")
    for part in (pipe.text, pipe.unet, pipe.vae):
        assert any(m._forward_hooks for m in part.modules())
    for _ in range(2):
        [got] = pipe(req)
        assert torch.equal(got.latent, want.latent) and got.image.tobytes() == want.image.tobytes()
    # tensors this small share the kernel's fault-around windows (16 pages) with their
    # neighbours, so some pages come back unasked; SD's are megabytes each
    for model, most in ((plain, 0.9), (pipe, 0.5)):
        # a packed conv's weights are given back in either mode (its packed copy replaces them)
        packed = {id(m.weight) for m in model.unet.modules() if "_pack" in m.__dict__}
        big = [p for p in model.unet.parameters() if p.nbytes >= 64 * 1024 and id(p) not in packed]
        share = sum(rss_of(p) for p in big) / sum(p.nbytes for p in big)
        assert share >= most if model is plain else share <= most

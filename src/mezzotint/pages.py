"""Give back the resident memory of weights read from a file: once a packed copy replaces
them, and, for large models, as soon as the part of the network that reads them has run.

Weights loaded from .safetensors are private file mappings: the pages a read touched count
in the process's memory, but they are the page cache's too, so the kernel can drop them
(madvise DONTNEED) and bring them back from the file on the next read. That is safe only
for pages still equal to the file: a page written since (a LoRA merge) is a private copy,
which DONTNEED would throw away. /proc/self/pagemap tells the two apart, page by page.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

_MADV_DONTNEED = 4
_FILE = 1 << 61
_libc = None


def _private_file_maps() -> list[tuple[int, int]]:
    """[start, end) of this process's private mappings of files."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and fields[1][3] == "p" and int(fields[4]) != 0:
                a, b = (int(v, 16) for v in fields[0].split("-"))
                out.append((a, b))
    return out


def _in_private_file_map(lo: int, hi: int, maps: list[tuple[int, int]]) -> bool:
    return any(a <= lo and hi <= b for a, b in maps)


def _only_file_pages(start: int, end: int, page: int) -> bool:
    """No page of [start, end) is a private (written) copy; absent pages are fine."""
    n = (end - start) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // page * 8)
        data = f.read(n * 8)
    if len(data) != n * 8:
        return False
    e = torch.frombuffer(bytearray(data), dtype=torch.int64)  # bit 63, present, is the sign
    return bool(((e >= 0) | ((e & _FILE) != 0)).all())


def _page_range(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    return lo, hi, -(-lo // page) * page, hi // page * page, page  # whole pages only: edges may be shared


def _drop(t: torch.Tensor) -> int:
    """madvise DONTNEED t's whole pages unless one of them is a private (written) copy."""
    global _libc
    _, _, start, end, page = _page_range(t)
    if end <= start or not _only_file_pages(start, end, page):
        return 0
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return end - start if _libc.madvise(start, end - start, _MADV_DONTNEED) == 0 else 0


def _usable(t: torch.Tensor) -> bool:
    return sys.platform.startswith("linux") and t.device.type == "cpu" and t.is_contiguous()


def release(t: torch.Tensor) -> int:
    """Drop t's resident pages if t lies in a private file mapping and no page of it was
    written; later reads fault them back from the file. Returns the bytes given back."""
    return _Releaser([t]).run() if _usable(t) else 0


# Streaming a large model's weights from the page cache: each layer gives its file pages
# back right after its forward, so at any moment only the layer that runs is resident (plus
# what cannot be given back: packed copies, LoRA-merged pages, anything not from a file).
# The next call faults them back from the page cache: measured at about 10 ms per GB on top
# of reading them, while the page cache keeps them; where the kernel pages out cold page
# cache (DAMON reclaim on this workplace's machines) they come from disk, far slower.
# Layers, not blocks: a block's forward is not always called (the UNet drives its levels'
# parts itself).
# Small models are left alone. Pipeline.load turns it on with MEZZOTINT_STREAM_WEIGHTS=1.
STREAM_MIN_BYTES = 256 << 20


def nbytes(m: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _releasable(params) -> list[torch.Tensor]:
    return [p for p in params if _usable(p) and p.numel() * p.element_size() >= 4096]


class _Releaser:
    """Gives back a fixed set of tensors' clean file pages; which of them lie in a file
    mapping is looked up once per tensor (and again if its storage moves)."""

    def __init__(self, tensors):
        self.tensors, self.mapped = tensors, {}

    def hook(self, *_):  # a forward hook: returns None, so the module's output stands
        self.run()

    def run(self) -> int:
        maps, total = None, 0
        try:
            for t in self.tensors:
                known = self.mapped.get(id(t))
                if known is None or known[0] != t.data_ptr():
                    maps = _private_file_maps() if maps is None else maps
                    lo, hi, *_ = _page_range(t)
                    self.mapped[id(t)] = known = (t.data_ptr(), _in_private_file_map(lo, hi, maps))
                if known[1]:
                    total += _drop(t)
        except OSError:  # no /proc (a container without it): keep the pages
            pass
        return total


def stream(model: torch.nn.Module, min_bytes: int | None = None) -> list:
    """Give `model`'s file pages back layer by layer as its forward passes them (on Linux,
    for CPU models of at least `min_bytes`, default STREAM_MIN_BYTES). Returns the hook
    handles (remove() undoes it)."""
    least = STREAM_MIN_BYTES if min_bytes is None else min_bytes
    if not sys.platform.startswith("linux") or nbytes(model) < least:
        return []
    handles = []
    for m in model.modules():
        own = _Releaser(_releasable(m.parameters(recurse=False)))
        if own.tensors:
            handles.append(m.register_forward_hook(own.hook))
    return handles


def release_model(model: torch.nn.Module) -> int:
    """Give back all of `model`'s clean file pages now. Returns the bytes given back."""
    return _Releaser(_releasable(model.parameters())).run()


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed blocks instead of handing them back to the kernel.
    A training step or a UNet call frees and allocates the same activations every time; by
    default each large block is a fresh mmap, whose pages the kernel must fault in and zero
    again (seen: 3 M page faults and 13 % system time in 40 autoencoder steps, against 0.4 M
    with this; SD 1.5 bf16 at 256x256, a warm image: 214 k faults against 8 k). Memory stays
    at the step's peak, which the process reaches anyway. Training and CPU inference
    (Pipeline.load) turn it on. No-op off glibc."""
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks above it are still mapped
    mallopt(M_TRIM_THRESHOLD, 1 << 30)
    mallopt(M_TOP_PAD, 64 << 20)

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
import warnings

import numpy as np
import torch

_MADV_DONTNEED = 4
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
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


_pagemap: tuple[int, int] | None = None  # (pid, fd): a child after fork opens its own


def _pagemap_fd() -> int:
    global _pagemap
    if _pagemap is None or _pagemap[0] != os.getpid():
        _pagemap = (os.getpid(), os.open("/proc/self/pagemap", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
    return _pagemap[1]


def _present(start: int, end: int, page: int) -> np.ndarray | None:
    """Which pages of [start, end) are mapped (bool per page), or None if one of them is a
    private (written) copy; absent pages are fine. (numpy: a streamed SD 1.5 call asks this
    for some 250 tensors, and torch's per-op cost on these small arrays was 0.1 s a call.)"""
    n = (end - start) // page
    data = os.pread(_pagemap_fd(), n * 8, start // page * 8)
    if len(data) != n * 8:
        return None
    e = np.frombuffer(data, dtype=np.int64)  # bit 63, present, is the sign
    present = e < 0
    return present if bool((~present | (e & _FILE != 0)).all()) else None


def _lib():
    """libc, with the argument types of the calls used here (set once)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    return _libc


def _page_range(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    page = PAGE
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    return lo, hi, -(-lo // page) * page, hi // page * page, page  # whole pages only: edges may be shared


def _drop(t: torch.Tensor) -> tuple[int, np.ndarray | None]:
    """madvise DONTNEED t's whole pages unless one of them is a private (written) copy.
    (bytes given back, which of those pages were resident)."""
    _, _, start, end, page = _page_range(t)
    present = _present(start, end, page) if end > start else None
    if present is None:
        return 0, None
    return (end - start, present) if _lib().madvise(start, end - start, _MADV_DONTNEED) == 0 else (0, None)


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
        self.tensors, self.mapped, self.given = tensors, {}, 0
        self.resident: dict[int, np.ndarray] = {}  # per tensor: the pages resident when last given back

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
                    n, present = _drop(t)
                    total += n
                    if present is not None:
                        self.resident[id(t)] = present
        except OSError:  # no /proc (a container without it): keep the pages
            pass
        self.given += total
        return total


def _cached(t: torch.Tensor) -> np.ndarray | None:
    """Which whole pages of t the page cache holds now, mapped or not (mincore; bool per
    page). Linux answers for unmapped pages of a file only to those who own it or may write
    it; for others they read as absent, which errs on the side of keeping them resident."""
    _, _, start, end, page = _page_range(t)
    n = (end - start) // page
    if n <= 0:
        return None
    vec = bytearray(n)
    if _lib().mincore(start, end - start, (ctypes.c_char * n).from_buffer(vec)) != 0:
        return None
    return np.frombuffer(vec, dtype=np.uint8) & 1 != 0  # bit 0: resident; the others are reserved


def cached_share(tensors) -> float:
    """Share of the whole pages of `tensors` that the page cache holds now (1.0 for none)."""
    got = [c for c in map(_cached, tensors) if c is not None]
    n = sum(len(c) for c in got)
    return sum(int(c.sum()) for c in got) / n if n else 1.0


ASK_EVERY = 4  # with watch, a layer asks the page cache on every 4th call (the 2nd, 6th, ...)
STREAM_TENSOR_BYTES = 64 << 10  # smaller tensors (norms, biases) stay: well under 1 % of SD's
# weights, but two thirds of its tensors, each a pagemap read, a madvise and a fault a call


class Stream:
    """A model whose layers give their file pages back after their forward (stream()).

    Guidance's two passes may run side by side (graphs.both): a layer gives its pages back
    once every call of the model in flight has passed it, or the second pass would fault
    them in again. With `watch`, a layer about to read pages it gave back first asks the page
    cache (mincore) which of them it still holds. Where the kernel evicts them (memory
    pressure, or a proactive reclaimer such as DAMON's pageout), every call reads them from
    disk: once about half a model's worth of pages has been asked about, if more than a
    quarter of them were gone, the model stops streaming and keeps its pages from then on
    (`stopped` says why). A stray page or layer lost does not stop it."""

    def __init__(self, model: torch.nn.Module, watch: bool, name: str = "model"):
        self.handles, self.stopped, self.inflight, self.watch, self.name = [], None, 0, watch, name
        self.layers = self.total = self.asked = self.missing = 0
        try:
            maps = _private_file_maps()
        except OSError:  # no /proc: nothing to give back
            maps = []
        for name, m in model.named_modules():
            own = _Releaser([t for t in _releasable(m.parameters(recurse=False)) if t.nbytes >= STREAM_TENSOR_BYTES
                             and _in_private_file_map(*_page_range(t)[:2], maps)])  # not converted copies
            if not own.tensors:
                continue
            own.name, own.passed, own.asks, own.bytes = name, 0, 0, sum(t.nbytes for t in own.tensors)
            self.layers, self.total = self.layers + 1, self.total + own.bytes
            if watch:
                self.handles.append(m.register_forward_pre_hook(lambda m, _, own=own: self._before(m, own)))
            self.handles.append(m.register_forward_hook(lambda *_, own=own: self._after(own)))
        if self.layers:  # calls in flight; always_call: a call that raises still leaves
            self.handles.append(model.register_forward_pre_hook(lambda *_: self._count(1)))
            self.handles.append(model.register_forward_hook(lambda *_: self._count(-1), always_call=True))

    def _count(self, d: int):
        self.inflight += d

    def _after(self, own: "_Releaser"):
        own.passed += 1
        # max(1, ...): a model driven through a method other than forward (the autoencoder's
        # decode, the text encoder's encode) counts no calls
        if own.passed >= max(1, self.inflight):
            own.passed = 0
            own.run()

    def _before(self, m: torch.nn.Module, own: "_Releaser"):
        # a packed conv reads its packed copy, not these pages: the cache may drop them
        if not own.given or own.passed or self.stopped is not None or "_pack" in m.__dict__:
            return
        own.asks += 1
        if own.asks % ASK_EVERY != 1 % ASK_EVERY:  # a sample of the calls is enough to notice
            return
        for t in own.tensors:  # of the pages it gave back resident (a few rows of an embedding, say)
            was, now = own.resident.get(id(t)), _cached(t)
            if was is not None and now is not None and len(was) == len(now):
                given = int(was.sum())
                self.asked += given
                self.missing += given - int((was & now).sum())
        if self.asked >= self.total // PAGE // 2:  # pages: about half a model's worth
            if self.missing > self.asked / 4:
                self.stopped = (f"the page cache had lost {self.missing / self.asked:.0%} of the weights given "
                                f"back (of {self.asked * PAGE / 2**20:.0f} MiB asked about); last seen: {own.name}")
                self.remove()
                warnings.warn(f"mezzotint: the {self.name}'s weights stop streaming and stay resident: "
                              f"{self.stopped}", RuntimeWarning, stacklevel=2)
            self.asked = self.missing = 0

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def stream(model: torch.nn.Module, min_bytes: int | None = None, watch: bool = False,
           name: str = "model") -> Stream | None:
    """Give `model`'s file pages back layer by layer as its forward passes them (on Linux,
    for CPU models of at least `min_bytes`, default STREAM_MIN_BYTES); with `watch`, only
    while the page cache keeps them (Stream). None where the model is left alone: off Linux,
    small, or with no weights mapped from a file (fast mode's converted copies)."""
    least = STREAM_MIN_BYTES if min_bytes is None else min_bytes
    if not sys.platform.startswith("linux") or nbytes(model) < least:
        return None
    s = Stream(model, watch, name)
    return s if s.layers else None


def release_model(model: torch.nn.Module) -> int:
    """Give back all of `model`'s clean file pages now. Returns the bytes given back."""
    return _Releaser(_releasable(model.parameters())).run()


def trim() -> None:
    """Hand malloc's free blocks back to the kernel now (glibc's malloc_trim), those that
    keep_freed_memory keeps: after a large free (drop_packs) that should leave the process's
    memory. No-op off glibc."""
    try:
        _lib().malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


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

"""Give back the resident memory of weights read from a file once a packed copy replaces them.

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


def _in_private_file_map(lo: int, hi: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            a, b = (int(v, 16) for v in fields[0].split("-"))
            if a <= lo and hi <= b:
                return (len(fields) == 6 and fields[5].startswith("/") and fields[1][3] == "p"
                        and int(fields[4]) != 0)
    return False


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


def release(t: torch.Tensor) -> int:
    """Drop t's resident pages if t lies in a private file mapping and no page of it was
    written; later reads fault them back from the file. Returns the bytes given back."""
    global _libc
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or not t.is_contiguous():
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    start, end = -(-lo // page) * page, hi // page * page  # whole pages only: the edges may be shared
    if end <= start:
        return 0
    try:
        if not (_in_private_file_map(lo, hi) and _only_file_pages(start, end, page)):
            return 0
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if _libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
            return 0
    except OSError:  # no /proc (a container without it): keep the pages
        return 0
    return end - start

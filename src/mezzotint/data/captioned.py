"""Captioned images from disk: a folder of `name.png` + `name.txt` pairs, or WebDataset
.tar shards (`000123.jpg` + `000123.txt` members). Both keep the Shapes contract: item
i is a pure function of (source, seed, i), an (image uint8 (3, size, size), caption) pair.

Any index i >= 0 is valid: i // N is the epoch and each epoch visits all N samples in
its own order, a permutation seeded by (seed, epoch), so an endless index stream
shuffles every epoch deterministically. The trainer splits indices across ranks and
workers; `__getitem__` keeps no state that a fork or a second process could disturb.
"""
from __future__ import annotations

import collections
import glob
import io
import json
import operator
import os
import random
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # matched case-insensitively
CAPTION_EXTS = (".txt", ".caption", ".json")  # tar members, in order of preference
JSON_CAPTION_FIELDS = ("caption", "text")  # a .json member's caption, first present wins
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on this
RESAMPLE = Image.Resampling.LANCZOS
MAX_OPEN_SHARDS = 16  # file descriptors each process keeps open, least recently used closed


# ---------------------------------------------------------------- images


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB: transparency composited on BACKGROUND, 16-bit grey
    scaled (not clipped) to 8 bits, palette and grey expanded."""
    if img.mode.startswith("I;16") or img.mode == "I":  # "I" from a 16-bit file: same range
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
        img = Image.fromarray(np.rint(grey).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba)
    return img.convert("RGB")


def square_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side resized to `size`, then the centred size x size square, in one
    resampling over the centred (sub-pixel) box of side min(w, h)."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    return img.resize((size, size), RESAMPLE, box=box, reducing_gap=3.0)


def load_image(fp, size: int, name: str) -> torch.Tensor:
    """Decode an image file (path or file object) to uint8 (3, size, size); a file PIL
    cannot read raises ValueError naming `name`."""
    try:
        with Image.open(fp) as img:
            img.draft(img.mode, (size, size))  # JPEG: decode at the smallest scale >= size
            img = square_crop(to_rgb(ImageOps.exif_transpose(img)), size)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(f"cannot read image {name}: {type(e).__name__}: {e}") from e
    pixels = np.asarray(img)  # (size, size, 3)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


# ---------------------------------------------------------------- epochs


def epoch_order(n: int, seed, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits samples 0..n-1: a permutation that is a
    pure function of (n, seed, epoch)."""
    entropy = random.Random(f"captioned-v1/{seed}/{epoch}").getrandbits(128)
    return np.random.default_rng(entropy).permutation(n)


class _Epochs(torch.utils.data.Dataset):
    """Maps item i >= 0 to sample order(i // N)[i % N]; subclasses give `n` and
    `sample(j)`, the j-th sample in sorted source order."""

    n: int
    seed: int
    shuffle: bool

    def __len__(self) -> int:
        return self.n

    def sample_index(self, i: int) -> int:
        i = operator.index(i)
        if i < 0:
            raise IndexError(f"index {i} < 0")
        epoch, k = divmod(i, self.n)
        if not self.shuffle:
            return k
        cached = getattr(self, "_order", None)  # one epoch's order per process
        if cached is None or cached[0] != epoch:
            cached = self._order = (epoch, epoch_order(self.n, self.seed, epoch))
        return int(cached[1][k])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.sample(self.sample_index(i))

    def __iter__(self):
        """One epoch, items 0..N-1 (indexing itself never ends)."""
        return (self[i] for i in range(self.n))

    def sample(self, j: int) -> tuple[torch.Tensor, str]:
        raise NotImplementedError


def _warn_uncaptioned(missing: int, total: int, where) -> None:
    if missing:
        warnings.warn(f"{missing} of {total} images in {where} have no caption; they get \"\"", stacklevel=3)


# ---------------------------------------------------------------- folders


class FolderDataset(_Epochs):
    """Images (IMAGE_EXTS) anywhere under `root`, each captioned by the same-name .txt
    beside it (`cat.png` + `cat.txt`, whitespace stripped; none: "" and a warning
    counting them). Hidden files and folders (".name") are skipped. Samples are in
    sorted relative-path order; `shuffle=False` keeps that order in every epoch."""

    def __init__(self, root, size: int, seed: int = 0, shuffle: bool = True):
        self.root, self.size, self.seed, self.shuffle = Path(root), _check_size(size), seed, shuffle
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is not a directory")
        images, texts = [], set()
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(folder).relative_to(self.root)
            for f in files:
                if f.startswith("."):
                    continue
                if is_image(f):
                    images.append((rel / f).as_posix())
                elif f.endswith(".txt"):
                    texts.add((rel / f).as_posix())
        if not images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {self.root}")
        self.files = sorted(images)  # relative posix paths
        captions = [Path(f).with_suffix(".txt").as_posix() for f in self.files]
        self.captions = [c if c in texts else None for c in captions]
        self.n = len(self.files)
        self.missing_captions = self.captions.count(None)
        _warn_uncaptioned(self.missing_captions, self.n, self.root)

    def sample(self, j: int) -> tuple[torch.Tensor, str]:
        path = self.root / self.files[j]
        image = load_image(path, self.size, str(path))
        caption = self.captions[j]
        if caption is None:
            return image, ""
        return image, _decode((self.root / caption).read_bytes(), self.root / caption)


# ---------------------------------------------------------------- tar shards


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace syntax: "a-{000..003}.tar" (zero padding kept from the lower
    bound) and "a-{x,y}.tar"; several braces multiply out, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        parts = [f"{k:0{width}d}" for k in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        parts = body.split(",")
    else:
        raise ValueError(f"bad brace {{{body}}} in {pattern!r}; allowed: {{000..009}} or {{a,b}}")
    return [p for part in parts for p in expand_braces(head + part + tail)]


def shard_paths(paths_or_pattern) -> list[str]:
    """Shard files from a path, a glob, a brace pattern, or a list of these; in the
    order given, each glob sorted. A pattern matching nothing raises ValueError."""
    specs = [paths_or_pattern] if isinstance(paths_or_pattern, (str, os.PathLike)) else list(paths_or_pattern)
    out = []
    for spec in specs:
        for p in expand_braces(os.fspath(spec)):
            found = sorted(glob.glob(p)) if re.search(r"[*?[]", p) else [p] if os.path.isfile(p) else []
            if not found:
                raise ValueError(f"no shard file matches {p!r}" + (f" (from {os.fspath(spec)!r})" if p != os.fspath(spec) else ""))
            out += found
    if not out:
        raise ValueError(f"no shards given in {paths_or_pattern!r}")
    return out


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping: "dir/000123.seg.png" -> ("dir/000123", ".seg.png")."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot + ext


class TarShards(_Epochs):
    """WebDataset .tar shards: members grouped by key (the name up to the first dot of
    its basename), a sample being one image (IMAGE_EXTS) plus an optional caption
    (.txt, .caption, or .json with a "caption"/"text" field). The shards are indexed once
    here (names and offsets); items read their bytes by offset. Keys without an image
    are skipped (counted in `skipped`); images without a caption get "" and a warning."""

    def __init__(self, paths_or_pattern, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle = _check_size(size), seed, shuffle
        self.shards = shard_paths(paths_or_pattern)
        # One row per sample; numpy columns, not per-sample objects, so forked workers share them.
        shard, names, img, cap, kind = [], [], [], [], []
        self.skipped = 0
        for s, path in enumerate(self.shards):
            for key, members in _index_tar(path).items():
                image = next((members[e] for e in _ordered(members, IMAGE_EXTS)), None)
                if image is None:
                    self.skipped += 1
                    continue
                c = next((e for e in CAPTION_EXTS if e in members), None)
                shard.append(s)
                names.append(image[0].encode())
                img.append(image[1:])
                cap.append(members[c][1:] if c else (-1, 0))
                kind.append(CAPTION_EXTS.index(c) if c else -1)
        if not shard:
            raise ValueError(f"no samples with an image ({', '.join(IMAGE_EXTS)}) in {paths_or_pattern!r}")
        self.n = len(shard)
        self._shard = np.asarray(shard, np.int32)
        self._names = np.asarray(names, dtype=bytes)  # image member names, for messages
        self._image = np.asarray(img, np.int64).reshape(-1, 2)  # (offset, size) in the shard
        self._caption = np.asarray(cap, np.int64).reshape(-1, 2)
        self._kind = np.asarray(kind, np.int8)  # index into CAPTION_EXTS, -1: none
        self.missing_captions = int((self._kind < 0).sum())
        _warn_uncaptioned(self.missing_captions, self.n, paths_or_pattern)
        self._fds, self._pid = collections.OrderedDict(), os.getpid()

    def sample(self, j: int) -> tuple[torch.Tensor, str]:
        shard = self.shards[self._shard[j]]
        name = f"{self._names[j].decode()} in {shard}"
        image = load_image(io.BytesIO(self._read(j, self._image[j])), self.size, name)
        kind = int(self._kind[j])
        if kind < 0:
            return image, ""
        text = _decode(self._read(j, self._caption[j]), f"caption of {name}")
        if CAPTION_EXTS[kind] != ".json":
            return image, text
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"bad JSON in the caption of {name}: {e}") from e
        field = next((f for f in JSON_CAPTION_FIELDS if isinstance(meta, dict) and f in meta), None)
        return image, str(meta[field]).strip() if field else ""

    def _read(self, j: int, where) -> bytes:
        """Bytes at (offset, size) of sample j's shard; pread on a per-process fd."""
        offset, size = (int(v) for v in where)
        fd = self._fd(int(self._shard[j]))
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"shard {self.shards[self._shard[j]]} ended early (changed since it was indexed?)")
        return data

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to share or close
            self._fds, self._pid = collections.OrderedDict(), os.getpid()
        if s in self._fds:
            self._fds.move_to_end(s)
            return self._fds[s]
        while len(self._fds) >= MAX_OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[s] = os.open(self.shards[s], os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def close(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = collections.OrderedDict()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):  # spawned workers open their own files
        state = self.__dict__.copy()
        state["_fds"], state["_pid"] = collections.OrderedDict(), None
        return state


def _ordered(members: dict, exts) -> list[str]:
    return [e for e in exts if e in members] + sorted(e for e in members if e.lower() in exts and e not in exts)


def _index_tar(path: str) -> dict[str, dict[str, tuple[str, int, int]]]:
    """key -> {extension: (member name, data offset, size)} of the regular files in a tar."""
    end = os.path.getsize(path)
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > end:
                    raise ValueError(f"{path} is truncated: member {m.name} runs past the end")
                key, ext = split_key(m.name)
                groups.setdefault(key, {})[ext] = (m.name, m.offset_data, m.size)
            stop = tf.offset  # where tarfile stopped: end-of-archive zeros, or a header it could not read
        with open(path, "rb") as f:
            f.seek(stop)
            if f.read(tarfile.BLOCKSIZE).strip(b"\0"):
                raise ValueError(f"{path} is damaged: unreadable tar header at byte {stop}")
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path} is not a valid uncompressed tar file: {e}") from e
    return groups


# ---------------------------------------------------------------- helpers


def _decode(data: bytes, where) -> str:
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {where} is not UTF-8: {e}") from e


def _check_size(size: int) -> int:
    if isinstance(size, bool) or operator.index(size) < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)

"""Shared layers: timestep embedding, ResBlock, attention, resampling.

Parameter names follow diffusers' UNet2DConditionModel / AutoencoderKL so that
Stable Diffusion weights map onto these modules by renaming keys, not by rewriting
math. Attention goes through `scaled_dot_product_attention`, so flash and
memory-efficient kernels are used where the device has them.
"""
from __future__ import annotations

import math
import os
import threading
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .pages import release

# oneDNN's fp32/bf16 GEMM: on some CPUs (AMD's) about twice MKL's sgemm, which F.linear
# uses; the same products, summed in another order. It has no backward, so training
# (and anything that needs a gradient) keeps F.linear, and so do small products, where
# oneDNN's set-up costs more than it saves (the default model's). MEZZOTINT_ONEDNN=0 turns it off.
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and os.environ.get("MEZZOTINT_ONEDNN", "1") != "0")
ONEDNN_MIN_MACS = 1 << 24
PACK_MIN_RATIO = 2  # packed convs: weight elements per input element, at least (measured on SD's shapes)
# oneDNN's bf16 GEMM and conv packing need AVX512 (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2
# CPU both raise, so bf16 stays on PyTorch's own ops there
ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _cpu_inference(x: torch.Tensor, w: torch.Tensor) -> bool:
    """x and w are float32 (or bfloat16, where oneDNN has it) on the CPU and no gradient will be asked of them."""
    return (x.device.type == "cpu" and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and ONEDNN_BF16))
            and w.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def weight_key(*tensors) -> tuple:
    """Changes whenever one of `tensors` is replaced or edited in place (version counter)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        try:
            version = t._version
        except RuntimeError:  # an inference tensor: it cannot be edited outside inference mode
            version = -1
        out.append((id(t), t.data_ptr(), version, t.dtype))
    return tuple(out)


def same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Same shape, dtype, device and values (None only equals None)."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


KEPT_ENTRIES = 2  # results kept per slot: guidance's two passes, side by side, each have theirs


def kept(owner: nn.Module, slot: str, weights, inputs: tuple, compute):
    """compute(), kept in owner.__dict__[slot] and returned again while `inputs` keep their
    values and `weights` are not edited or replaced (weight_key); the last KEPT_ENTRIES
    distinct inputs are kept. Only without autograd: a kept result has no graph. Owners leave
    the slot out of copies (__getstate__)."""
    # a trace would record a kept tensor as a constant: while tracing, always compute
    key, caching = weight_key(*weights), not torch.is_grad_enabled() and not torch.jit.is_tracing()
    entries = owner.__dict__.get(slot, ()) if caching else ()
    for k, ins, out in entries:
        if k == key and all(map(same_tensor, ins, inputs)):
            return out
    out = compute()
    if caching:  # a new tuple, never edited: the other pass may be reading the old one
        fresh = (key, tuple(None if t is None else t.clone() for t in inputs), out)
        owner.__dict__[slot] = (fresh,) + tuple(e for e in entries if e[0] == key)[:KEPT_ENTRIES - 1]
    return out


# the smallest latent (height * width) run channels-last, per dtype; other dtypes keep NCHW
CHANNELS_LAST_MIN_PIXELS = {torch.bfloat16: 32 * 32}  # SD's latent at 256x256


def channels_last_wanted(x: torch.Tensor, min_pixels: dict = CHANNELS_LAST_MIN_PIXELS) -> bool:
    """bfloat16 inference on the CPU runs in channels-last: oneDNN's bf16 convs (AMX, AVX512-BF16)
    want it, and in NCHW each conv pays a reorder of its activations each way (SD 1.5 at 256x256,
    AMX: a UNet call 0.45 -> 0.40 s, the decoder 0.94 -> 0.40 s). float32 keeps NCHW by default,
    so the exact mode's kernels, and its agreement with diffusers, stay as they are (the decoder
    passes its own sizes: vae.DECODE_CHANNELS_LAST_MIN_PIXELS). Small latents keep NCHW too: the
    default model's 16x16 ones, bound by per-op overhead, lost (one image 239 -> 284 ms in bf16)."""
    least = min_pixels.get(x.dtype)
    return (least is not None and x.device.type == "cpu" and x.dim() == 4
            and x.shape[-1] * x.shape[-2] >= least and not torch.is_grad_enabled())


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    if (_ONEDNN and x.numel() * w.shape[0] >= ONEDNN_MIN_MACS and _cpu_inference(x, w)
            and not torch.jit.is_tracing()):  # a trace cannot record its arguments
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) computed by `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


# F.conv2d on CPU hands the weights to oneDNN in PyTorch's layout, and oneDNN re-lays them
# out on every call: for SD's 1280-channel convs at 8x8 and 4x4 that copy costs more than
# the arithmetic. Packed once (and again only when the weights change: LoRA, load), they
# run up to twice as fast. Where the activations outweigh the weights (SD's 64x64 level, the
# decoder's large images) the saved copy is small and oneDNN's channels-last answer costs a
# copy back, so those stay on F.conv2d. The packed copy is a second copy of the weights, so
# pages of the first that came from a file are given back (pages.release).
_PACKED_CONV = (_ONEDNN and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
                and os.environ.get("MEZZOTINT_PACKED_CONV", "1") != "0")


_PACKING = threading.Lock()


class Pack(NamedTuple):
    """A conv's packed weights and what they were made for (Conv2d._packed)."""
    weights: tuple  # weight_key of the weights packed
    size: tuple | None  # the input size they hold for, None: any (Conv2d.pack_size)
    packed: torch.Tensor


def _reorder(w, padding, stride, dilation, groups, input_size):
    """w packed into oneDNN's layout for inputs of input_size. Straight from the dense tensor
    where PyTorch has the op: to_mkldnn() first made a temporary copy of the weight. (The time
    barely moved, SD 1.5 bf16's packing 3.4 -> 3.3 s: fresh pages are what it pays for.)"""
    op = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None)
    if op is not None:
        return op(w, padding, stride, dilation, groups, input_size)
    return torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), padding, stride, dilation, groups, input_size)


def _script_conv():
    """The packed conv as a TorchScript function: a trace records a call to it (the op's
    empty `Scalar?[]` argument cannot be traced), with the packed weights as a graph input."""
    global _traced_conv
    if _traced_conv is None:
        def packed_conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: List[int],
                        stride: List[int], dilation: List[int], groups: int, channels_last: bool) -> torch.Tensor:
            out = torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, stride, dilation, groups, "none", [], "")
            return out if channels_last else out.contiguous()
        _traced_conv = torch.jit.script(packed_conv)
    return _traced_conv


_traced_conv = None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state dict); CPU inference of large convs (of every
    conv, with pack_all) runs on weights packed once into oneDNN's layout. Gradients, small
    convs, other devices: F.conv2d."""
    packable = True  # False: always F.conv2d (the autoencoder: see vae.py)
    # True: every CPU inference call packed, whatever its size (small models: see graphs.py).
    # F.conv2d rounds a row of a batch differently from the same row alone (its kernels
    # block by batch at one thread); the packed conv gives each row the same bits in any
    # batch and at any thread count, so guidance's passes can run side by side.
    pack_all = False

    def can_pack(self) -> bool:
        """This layer's kind of conv has a packed path (any input; uses_pack decides per call)."""
        return _PACKED_CONV and self.packable and self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def uses_pack(self, x) -> bool:
        w = self.weight
        if not (x.dim() == 4 and self.can_pack() and _cpu_inference(x, w)):
            return False
        if self.pack_all or (x.dtype == torch.bfloat16 and self.has_pack()):
            return True  # bf16 (channels-last from 32x32 on): a pack is faster at every size (prepack)
        return (x.numel() // x.shape[1] * w.numel() >= ONEDNN_MIN_MACS
                and w.numel() >= PACK_MIN_RATIO * x.numel())

    def has_pack(self) -> bool:
        """A packed copy of the current weights exists (none after a LoRA merge, until the next pack)."""
        cached = self.__dict__.get("_pack")
        return cached is not None and cached.weights == weight_key(self.weight)

    def pack_size(self, input_size) -> tuple | None:
        """The input size a pack is good for: any (None) for a 3x3 conv, only its own for a 1x1.
        A 1x1 pack run at another size took 2-250x as long (AMD Zen 4, bf16 and float32: made
        for 8x8 and run at 4x4, SD 1.5's lowest level at 256x256, 134 ms against 0.6), so those
        are packed again when the size changes (their weights are small: SD 1.5's, 0.1 GB)."""
        return tuple(input_size[-2:]) if self.kernel_size == (1, 1) else None

    def forward(self, x):
        if self.uses_pack(x):
            args = list(self.padding), list(self.stride), list(self.dilation), self.groups
            # oneDNN answers channels-last: given back contiguous unless the input was channels-last
            cl = x.is_contiguous(memory_format=torch.channels_last)
            if torch.jit.is_tracing():  # graphs.run holds the packed weights as the trace's buffers
                return _script_conv()(x, self._packed(x.shape), self.bias, *args, cl)
            b = self.bias
            out = torch.ops.mkldnn._convolution_pointwise(
                x, self._packed(x.shape), None if b is None else b.detach(), *args, "none", [], "")
            return out if cl else out.contiguous()
        return super().forward(x)

    def __getstate__(self):  # copies (deepcopy, pickle) pack again when they need to
        return {k: v for k, v in self.__dict__.items() if k != "_pack"}

    def _packed(self, input_size):
        w = self.weight
        key = weight_key(w), self.pack_size(input_size)  # in-place edits (LoRA merges) change it
        cached = self.__dict__.get("_pack")
        if cached is None or (cached.weights, cached.size) != key:
            with _PACKING:  # guidance's other pass, side by side, waits rather than packs twice
                cached = self.__dict__.get("_pack")
                if cached is None or (cached.weights, cached.size) != key:
                    with torch.no_grad():
                        packed = _reorder(w.detach(), list(self.padding), list(self.stride), list(self.dilation),
                                          self.groups, list(input_size))
                    self.__dict__["_pack"] = cached = Pack(*key, packed)
                    if not self.pack_all:  # a small model's copies are small; finding its
                        # mapped pages cost 4 ms a conv (most of a cold image's packing)
                        release(w)  # weights mapped from a file: the packed copy takes their place in memory
        return cached.packed


def prepack(model: nn.Module) -> int:
    """Packs the convs of a bfloat16 CPU model now, at load, rather than in its first call;
    they then run packed at every input size. Measured on AMX (SD 1.5): a bf16 3x3 weight packed
    for one input size runs as fast, with the same result, at any other (a 1x1 does not: it is
    packed again for its first size, see Conv2d.pack_size), and packed beats F.conv2d
    channels-last at every SD shape (320 channels at 64x64: 4.7 against 4.9 ms).
    The work moves, it does not shrink (SD 1.5's 1.17 GB of packs: 2-3 s, in the load now):
    a server's first request is as fast as the rest. float32 keeps packing lazily by size,
    so exact mode runs as before. Returns the convs packed."""
    if not (_PACKED_CONV and ONEDNN_BF16):
        return 0
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, Conv2d) and m.can_pack() and w.device.type == "cpu" and w.dtype == torch.bfloat16:
            m._packed((1, m.in_channels, 8, 8))  # any size will do for 3x3 (1x1: see pack_size)
            n += 1
    return n


def drop_packs(model: nn.Module) -> int:
    """Frees the packed copies of `model`'s convs; the next call packs again from the weights
    (SD 1.5: 1-3 s). A streamed UNet drops them before the autoencoder decodes: its 2 GB
    of packs would otherwise sit under the decoder's activations, the image's peak at 512x512.
    Returns the convs whose packs were dropped."""
    n = 0
    for m in model.modules():
        if isinstance(m, Conv2d) and m.__dict__.pop("_pack", None) is not None:
            n += 1
    return n


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017), cos first (diffusers flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1 = Linear(dim, out)
        self.linear_2 = Linear(out, out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip (Ho et al. 2020); optional timestep shift."""

    def __init__(self, cin: int, cout: int, groups: int, temb: int | None = None,
                 eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = Linear(temb, cout) if temb else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb=None):
        # without autograd, fresh tensors are reused in place: at the decoder's full
        # resolution each one not made is hundreds of MB of peak memory (same values)
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if self.time_emb_proj is not None:
            shift = self.time_emb_proj(F.silu(emb))[:, :, None, None]
            h = h.add_(shift) if inplace else h + shift
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip) if inplace else skip + h


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool mask, True = attend -> (B, 1, 1, L) additive bias, 0 or -inf: what
    scaled_dot_product_attention makes of a bool mask at every call, made once."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None, None]


# {attention module: (keys, values)} made by UNet.forward for a traced or split call, per thread
GIVEN_KV = threading.local()


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 qkv_bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        kv_dim = context_dim or dim
        self.heads = heads
        self.to_q = Linear(dim, inner, bias=qkv_bias)
        self.to_k = Linear(kv_dim, inner, bias=qkv_bias)
        self.to_v = Linear(kv_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([Linear(inner, dim)])
        self.probe = None  # a callable that gets cross-attention weights (explain sets it)

    def forward(self, x, context=None, mask=None):
        # x: (B, N, dim); context: (B, L, context_dim); mask: (B, L) bool, True = attend, or
        # attention_bias(mask), made once for all layers of a call
        q = self.to_q(x)
        k, v = (self.to_k(x), self.to_v(x)) if context is None else self._context_kv(context)
        # sizes by unflatten/flatten, not read off: a trace records every size it reads as ops
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N|L, d)
        bias = attention_bias(mask, q.dtype) if mask is not None and mask.dtype == torch.bool else mask
        if self.probe is not None and context is not None:
            w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, N, L)
            if bias is not None:
                w = w + bias
            self.probe(w.float().softmax(-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, d)
        return self.to_out[0](out.transpose(1, 2).flatten(2))

    def _context_kv(self, context):
        """Keys and values of the text tokens. Row by row: a short context makes a small-M
        matmul whose kernel (and rounding) changes with the batch size; per row, image k of a
        batch equals a batch of one. Without autograd they are kept for the next call, since a
        sampler passes the same tokens at every step: the cache is checked by value and by the
        weights' version counters (LoRA merges and state-dict loads edit them in place)."""
        given = getattr(GIVEN_KV, "kv", None)
        if given is not None and self in given:  # a trace's inputs (UNet.forward)
            return given[self]
        if torch.is_grad_enabled() and self.training:
            # training needs no batch invariance: one matmul for the batch, not one per row
            # (the default model's UNet: 896 of its 979 linear calls per step)
            return self.to_k(context), self.to_v(context)

        def compute():
            return torch.stack([self.to_k(c) for c in context]), torch.stack([self.to_v(c) for c in context])
        weights = (self.to_k.weight, self.to_k.bias, self.to_v.weight, self.to_v.bias)
        return kept(self, "_kv", weights, (context,), compute)

    def __getstate__(self):  # copies (deepcopy, pickle) leave the cache behind
        return {k: v for k, v in self.__dict__.items() if k != "_kv"}


class Downsample(nn.Module):
    """Stride-2 conv. `asymmetric` pads right/bottom only, as the KL autoencoder does."""

    def __init__(self, ch: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x):
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (avoids checkerboard artefacts of transposed convs)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

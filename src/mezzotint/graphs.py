"""Recorded graphs, and guidance's two passes side by side: inference on the CPU with less
Python and fewer threads per op.

The default model's UNet (4.7 M parameters) makes about 1,200 tensor ops per call, most of
them on tensors of a few thousand elements, so a quarter of each call is Python: module
calls, attribute lookups, argument parsing. A TorchScript trace of the call runs the same
ops in a C++ interpreter, with the submodules' calls inlined (`_inline`; 8-10 % faster than
the plain trace). The trace holds the model's own parameters (not copies): in-place edits
(LoRA merges, state-dict loads, `.to()`) reach it; a parameter, buffer or submodule that is
replaced outright starts a new trace, and so does an in-place edit of a conv weight, whose
packed copy the trace holds (`_pack_key`). The text's keys and values, kept between steps,
are the trace's inputs (UNet.forward). oneDNN's linears cannot be recorded, so a trace runs
F.linear there: the same products within float32 rounding. Large models (Stable Diffusion's)
spend their time in the arithmetic, and are never traced.

Guidance's two passes run side by side, one thread each (`both`), rather than as one batch
over both threads. A large model's passes are two calls (`side_by_side`). A small model's go
as one batch whose rows `run` splits over two traces (up to SPLIT_ROWS rows a half), or,
for a larger call or one made before traces are allowed, from SPLIT_EAGER_ROWS rows on over
two eager halves (`split_eager`): the Python around them then runs once, on the calling
thread. A split needs every conv packed (`row_invariant`): F.conv2d rounds a row alone
differently from the same row in a batch at one thread, and image k of a batch must equal
the single image of seed + k; the packed conv, linear, norms and attention give a row the
same bits in any batch and at one thread as at two (measured, and tested).
The text's keys and values are made once, on the calling thread (small-M matmuls round by
thread count). A large model's passes each get their rows of the joint batch, padded alike
(CFGDenoiser).

torch.jit.trace is deprecated in favour of torch.compile, whose compile took 48 s on two
cores and then ran a call in 13.2 ms against the trace's 12.6 (batch 2, 2 threads); a torch
without torch.jit runs eagerly. Static Runtime ran the inlined trace no faster (9.2 against
8.6 ms). MEZZOTINT_GRAPHS=0 turns both off.
"""
from __future__ import annotations

import operator
import os
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .nn import _PACKED_CONV as PACKED_CONV
from .nn import weight_key

MAX_PARAMS = 50_000_000  # above this the Python around the ops is a small share of a call
MAX_ROWS = 2  # traced calls of up to this batch (one image and its guidance pass), when not
# split: a batch of 16 rows ran 1.12x slower traced than eager (2 threads), one of 2 rows 0.92x
SPLIT_ROWS = 16  # split traced calls of up to this many rows a half, one thread each: batches
# of 3, 4, 8 and 16 images took 0.63, 0.65, 0.80 and 0.75x their time split eagerly or batched
SPLIT_EAGER_ROWS = 16  # larger calls split eagerly from this many rows: a batch of 8 images and
# its guidance 0.89x one batch over 2 threads; one image's 2 rows ran 1.5x slower split eagerly
MAX_GRAPHS = 8  # traces kept per model (one per input shape: batch, prompt length, size)
ENABLED = os.environ.get("MEZZOTINT_GRAPHS", "1") != "0" and hasattr(torch.jit, "trace")

_epoch = 0  # bumped whenever any module registers a parameter, buffer or submodule
_building = False  # but not by the wrapper that a trace is made of


def _bump(*_):
    global _epoch
    if not _building:
        _epoch += 1


if ENABLED:
    for _register in ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
                      "register_module_module_registration_hook"):
        getattr(nn.modules.module, _register)(_bump)


def epoch() -> int:
    """Bumped whenever a module anywhere registers a parameter, buffer or submodule."""
    return _epoch


def allow(model: nn.Module, on: bool = True) -> None:
    """Let `model`'s calls run as traces from now on. A trace takes 0.6-0.8 s to make (per
    input shape), more than one image's steps save, so the pipeline allows them from its
    second image on: a one-off `mezzotint generate` never pays for one."""
    model.__dict__["_graphs_on"] = on


_HOOKS = operator.attrgetter("_forward_hooks", "_forward_pre_hooks")


def usable(model: nn.Module, x: torch.Tensor) -> bool:
    """A call of `model` on `x` may run as a trace: allowed, CPU inference without autograd,
    hooks or probes, of a model small enough for Python to matter."""
    if (not ENABLED or not model.__dict__.get("_graphs_on") or model.training or torch.is_grad_enabled()
            or x.device.type != "cpu" or torch.jit.is_tracing()):
        return False
    if x.shape[0] > (2 * SPLIT_ROWS if splits(model) else MAX_ROWS):
        return False
    return small(model) and _plain(model)


def _plain(model: nn.Module) -> bool:
    """No forward hooks anywhere in `model`, and no probes."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    # every module's hook dicts, kept per epoch (registering a hook edits its dict in place)
    return not _probing(model) and not any(_info(model)[6])


def side_by_side(model: nn.Module, x: torch.Tensor) -> bool:
    """Guidance's two passes of `model` may run at once (`both`): CPU inference on 2+ threads,
    no probes (they collect in call order), of a large model (Python, which holds the GIL, is a
    small share of each pass: SD's UNet at 256x256, 6 % faster a step). A small model's passes
    go as one batch, whose rows `run` splits over two traces side by side instead."""
    if not ENABLED or torch.get_num_threads() < 2 or x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    if model.training or _probing(model):
        return False
    return not small(model)


def row_invariant(model: nn.Module) -> bool:
    """Every conv of `model` runs packed in CPU inference (Conv2d.pack_all), the one op whose
    rounding of a row depended on the batch and the thread count (linear, norms and attention
    give each row the same bits, measured)."""
    return _info(model)[5]


def _probing(model: nn.Module) -> bool:
    """An attention module of `model` has a probe set (explain collects attention weights)."""
    return any(m.__dict__["probe"] is not None for m in _info(model)[3])


def _info(model: nn.Module) -> tuple:
    """(epoch, small, modules, modules with a probe slot, convs, row-invariant, hook dicts),
    looked up again after registrations."""
    info = model.__dict__.get("_graph_info")
    if info is None or info[0] != _epoch:
        mods = list(model.modules())
        probed = [m for m in mods if "probe" in m.__dict__]  # attention modules (explain sets probes)
        convs = [m for m in mods if isinstance(m, nn.Conv2d)]
        invariant = PACKED_CONV and all(getattr(m, "pack_all", False) for m in convs)
        hooks = [d for m in mods for d in _HOOKS(m)]
        info = (_epoch, sum(p.numel() for p in model.parameters()) <= MAX_PARAMS, mods, probed, convs, invariant,
                hooks)
        model.__dict__["_graph_info"] = info
    return info


def small(model: nn.Module) -> bool:
    """Small enough to be traced (MAX_PARAMS), whether or not traces are on."""
    return _info(model)[1]


class _Call(nn.Module):
    """model.<method>(*args) with the None arguments fixed, as a module a trace can record."""

    def __init__(self, model: nn.Module, method: str, nones: tuple[bool, ...]):
        super().__init__()
        self.model, self.method, self.nones = model, method, nones

    def forward(self, *tensors):
        it = iter(tensors)
        return getattr(self.model, self.method)(*(None if n else next(it) for n in self.nones))


def _sig(a):
    return None if a is None else (tuple(a.shape), a.dtype, a.device, a.stride())


_lock = threading.Lock()  # the two guidance branches may ask for the same model's traces at once


def _pack_key(model: nn.Module) -> tuple:
    """Changes when a conv weight is edited in place (a LoRA merge): a trace holds the packed
    copies made before (Conv2d._packed), so it is made again, from packs made again."""
    return tuple(weight_key(m.weight) for m in _info(model)[4])


def _packs(model: nn.Module) -> list[torch.Tensor]:
    packs = (m.__dict__.get("_pack") for m in _info(model)[4])
    return [p.packed for p in packs if p is not None]


def _inline(graph):
    """The trace with its submodules' calls inlined (torch.jit.freeze without its folding
    passes): 8-10 % faster a call, the same bits. Parameters stay attributes, so in-place
    edits still reach it; the packed convs become constants (a new pack, a new trace)."""
    try:
        return torch.jit._recursive.wrap_cpp_module(torch._C._freeze_module(graph._c, preserveParameters=True))
    except (AttributeError, RuntimeError):  # a PyTorch without these internals: the plain trace
        return graph


def _graph(model: nn.Module, method: str, args: tuple):
    """The trace of model.<method> for these argument shapes, made on first use."""
    global _building
    with _lock:
        key = (method, _epoch, tuple(_sig(a) for a in args), _pack_key(model))
        graphs = model.__dict__.setdefault("_graphs", OrderedDict())
        graph = graphs.get(key)
        if graph is None:
            _building = True
            try:
                with warnings.catch_warnings():  # the deprecation notice, "may not generalise"
                    warnings.simplefilter("ignore")
                    getattr(model, method)(*args)  # eager first: packs the convs for these shapes
                    call = _Call(model, method, tuple(a is None for a in args))
                    call.packs = nn.Module()  # so the trace refers to the packed weights, not copies
                    for i, p in enumerate(_packs(model)):
                        call.packs.register_buffer(f"p{i}", p, persistent=False)
                    tensors = tuple(a for a in args if a is not None)
                    graph = _inline(torch.jit.trace(call, tensors, check_trace=False))
            finally:
                _building = False
            graphs[key] = graph
            while len(graphs) > MAX_GRAPHS:
                graphs.popitem(last=False)
        else:
            graphs.move_to_end(key)
        return graph


def _call(graph, args: tuple):
    # the executor's optimising passes cost 0.1 s on the second call and gained nothing here
    with torch.jit.optimized_execution(False):
        return graph(*(a for a in args if a is not None))


def run(model: nn.Module, method: str, *args):
    """model.<method>(*args) through a trace kept for these argument shapes (made on first use).
    A row-invariant model's rows run as two traces side by side, half the rows and one thread
    each (`splits`): guidance's two passes, with the Python around them run once, on one thread."""
    if args[0].shape[0] < 2 or not splits(model):
        return _call(_graph(model, method, args), args)
    graphs = {}

    def half(*part):  # both halves have the same shapes when the rows are even: one trace
        key = tuple(None if a is None else a.shape for a in part)
        if key not in graphs:
            graphs[key] = _graph(model, method, part)
        return lambda: _call(graphs[key], part)
    return in_halves(half, *args)


def in_halves(fn, *args):
    """torch.cat of fn(*rows)() over the first and the second half of the rows of every
    argument that has them (the others whole), the two run side by side (`both`)."""
    rows = args[0].shape[0]
    cut = (rows + 1) // 2
    first, second = (fn(*(a[part] if a is not None and a.dim() and a.shape[0] == rows else a for a in args))
                     for part in (slice(0, cut), slice(cut, None)))
    return torch.cat(both(first, second))


def split_eager(model: nn.Module, x: torch.Tensor) -> bool:
    """A row-invariant model's call too large to trace may still run as two halves side by
    side, eagerly: at SPLIT_EAGER_ROWS rows and more, where the Python of two eager passes
    (which holds the GIL) no longer outweighs what one thread each saves. Not with hooks or
    probes: they would run on two threads at once."""
    if (not ENABLED or x.shape[0] < SPLIT_EAGER_ROWS or model.training or torch.is_grad_enabled()
            or x.device.type != "cpu" or torch.jit.is_tracing() or not splits(model)):
        return False
    return small(model) and _plain(model)


def splits(model: nn.Module) -> bool:
    """A small model's traced call may run its rows as two traces side by side (run): 2+
    threads and every conv packed (row_invariant), so that the split gives the same bits."""
    return torch.get_num_threads() >= 2 and row_invariant(model)


def state(d: dict) -> dict:
    """A module's __dict__ without its traces, for __getstate__."""
    return {k: v for k, v in d.items() if k not in ("_graphs", "_graph_info")}


# -- two branches at once ------------------------------------------------------------------------

_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(2, thread_name_prefix="mezzotint-branch",
                                                    initializer=torch.set_num_threads, initargs=(threads,))
    return pool


def both(f, g):
    """(f(), g()), run side by side with half the intra-op threads each (inference only).

    For guidance's two passes of a large model (SD 1.5: 3-6 % faster a step on 2 cores than
    one batch over both threads), see side_by_side."""
    threads = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()

    def call(fn):
        with torch.inference_mode() if inference else torch.no_grad():
            return fn()
    pool = _pool(max(1, threads // 2))
    a, b = pool.submit(call, f), pool.submit(call, g)
    return a.result(), b.result()

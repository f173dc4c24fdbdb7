"""Warm generation speed of a model at its default settings (issue: <= 0.25 s per 64x64 image
on 2 CPU cores). Prints per-image latency (median of N runs) and batch throughput, for the
pipeline as it runs (traces and guidance's passes side by side from the second image on, see
graphs.py) and, alternating with it in the same process, with graphs off (plain eager PyTorch)
and, for a model with a layout map, with layout guidance off (`no-layout`: strength 0 and one
initial noise, graphs on) and with its strength but one initial noise (`one-noise`: what
choosing among the layout candidates costs; only prompts whose objects the map puts apart pay).

Every run has its own prompt (a Shapes world caption) and seed, so no run is helped by the
prompt encodings kept from the one before; the empty negative prompt is kept, as in use.

    python benchmarks/speed_default.py [--model PATH] [--runs 20] [--batch 8] [--dtype fast]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from mezzotint import Pipeline, graphs
from mezzotint.cli import default_model
from mezzotint.evaluate.judge import prompt_set
from mezzotint.pipeline import defaults_for

TARGET_S = 0.25


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default=None, help="as `generate --dtype` (default float32)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = Pipeline.load(a.model or default_model(), device="cpu", dtype=a.dtype)
    prompts = [c for c, _ in prompt_set(max(1, (a.runs * 3 + a.batch * 2) // 7 + 1), seed=7)]
    req = defaults_for(pipe.config, prompts[0])
    for k in range(6):  # warm: kernels chosen, traces made for the usual prompt lengths
        pipe(defaults_for(pipe.config, prompts[-k - 1], seed=k))
    layout = req.layout_guidance
    modes = {"graphs": (True, {}), "eager": (False, {})}
    if layout:
        modes["no-layout"] = (True, {"layout_guidance": 0.0, "layout_candidates": 1})
        if req.layout_candidates > 1:
            modes["one-noise"] = (True, {"layout_candidates": 1})
        for k in range(3):  # its traces too
            pipe(defaults_for(pipe.config, prompts[-k - 1], seed=k, layout_guidance=0.0))
    times = {m: [] for m in modes}
    for k in range(a.runs):  # alternating, so all see the same machine
        for mode, (on, s) in modes.items():
            graphs.ENABLED = on
            r = defaults_for(pipe.config, prompts[(k + 1) % len(prompts)], seed=1000 + k, **s)
            times[mode].append(timed(lambda: pipe(r)))
    btimes = {m: [] for m in modes}
    for k in range(4):  # the first round makes the batch's traces: not counted
        for mode, (on, s) in modes.items():
            graphs.ENABLED = on
            chunk = [prompts[(k * a.batch + i) % len(prompts)] for i in range(a.batch)]
            btimes[mode].append(timed(lambda: pipe(replace(req.for_image(100 * k), **s), chunk))
                                / a.batch)
    graphs.ENABLED = True
    batched = {m: statistics.median(v[1:]) for m, v in btimes.items()}
    single = {m: statistics.median(v) for m, v in times.items()}
    print(f"threads: {torch.get_num_threads()}  dtype: {pipe.dtype}  settings: {req.steps} steps, {req.sampler}, cfg {req.cfg}, "
          f"layout guidance {layout}, {req.layout_candidates} layout candidates, {req.width}x{req.height}")
    for mode in modes:
        print(f"{mode:>9}: single image (median of {a.runs}) {single[mode] * 1000:.1f} ms "
              f"(ratio to the {TARGET_S * 1000:.0f} ms target {single[mode] / TARGET_S:.2f});  "
              f"batch of {a.batch}: {batched[mode] * 1000:.1f} ms per image, {1 / batched[mode]:.1f} images/s")
    print(f"graphs / eager: single {single['graphs'] / single['eager']:.3f}, "
          f"batch {batched['graphs'] / batched['eager']:.3f}")
    if layout:
        print(f"layout guidance {layout} / off: single {single['graphs'] / single['no-layout']:.3f}, "
              f"batch {batched['graphs'] / batched['no-layout']:.3f}")
    if "one-noise" in modes:
        print(f"{req.layout_candidates} candidates / one noise: single {single['graphs'] / single['one-noise']:.3f}, "
              f"batch {batched['graphs'] / batched['one-noise']:.3f}")


if __name__ == "__main__":
    main()

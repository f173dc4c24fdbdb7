"""Warm generation speed of a model at its default settings (issue: <= 0.25 s per 64x64 image
on 2 CPU cores). Prints per-image latency (median of N runs) and batch throughput.

    python benchmarks/speed_default.py [--model PATH] [--runs 20] [--batch 8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mezzotint import Pipeline
from mezzotint.cli import default_model
from mezzotint.pipeline import defaults_for

TARGET_S = 0.25


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = Pipeline.load(a.model or default_model(), device="cpu")
    req = defaults_for(pipe.config, "a red circle to the left of a blue square")
    for _ in range(3):  # warm: kernels chosen, caches filled
        pipe(req)
    times = []
    for k in range(a.runs):
        t = time.perf_counter()
        pipe(req.for_image(k))
        times.append(time.perf_counter() - t)
    single = statistics.median(times)
    prompts = [req.prompt] * a.batch
    pipe(req, prompts)
    t = time.perf_counter()
    pipe(req, prompts)
    per_image_batched = (time.perf_counter() - t) / a.batch
    print(f"threads: {torch.get_num_threads()}  settings: {req.steps} steps, {req.sampler}, cfg {req.cfg}, "
          f"{req.width}x{req.height}")
    print(f"single image (median of {a.runs}): {single * 1000:.1f} ms   target {TARGET_S * 1000:.0f} ms   "
          f"ratio {single / TARGET_S:.2f}")
    print(f"batch of {a.batch}: {per_image_batched * 1000:.1f} ms per image, "
          f"{1 / per_image_batched:.1f} images/s ({single / per_image_batched:.2f}x single)")


if __name__ == "__main__":
    main()

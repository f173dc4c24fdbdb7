"""Training-step speed of the default model's architecture on the CPU, side by side: what the
always-on training settings contribute (train/loop.py keep_freed_memory, the UNet's
channels-last input in train/tasks.py, and the cross-attention's keys and values made for the
whole batch at once in training, nn.Attention), bf16 autocast against fp32, and torch.compile
(its compile, minutes, falls in the warm-up steps and is not timed).

Each mode runs in a fresh process (malloc settings hold for a whole process), the modes
alternating over --rounds rounds; each process times --steps optimizer steps (forward,
backward, AdamW) after 3 warm-up steps on fixed random inputs of the training shapes
(UNet: 64 latents of 8x16x16 and 20 context tokens; autoencoder: 24 images of 64x64).
Prints the median images/s of each mode and its ratio to the first.

    python benchmarks/train_speed.py [--part unet|vae] [--rounds 3] [--steps 8] [--attention-levels 1,2]
        [--modes 0,2,4]   (indices into the list of modes: a subset, e.g. without bf16 where it is slow)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time

MODES = {
    "unet": {"plain": {}, "keep-freed": {"malloc": True},
             "keep-freed + channels-last (shipped)": {"malloc": True, "cl": True},
             "... + bf16": {"malloc": True, "cl": True, "bf16": True},
             "shipped, context k/v row by row (before)": {"malloc": True, "cl": True, "rows": True},
             "shipped + torch.compile": {"malloc": True, "cl": True, "compile": True}},
    "vae": {"plain": {}, "keep-freed (shipped fp32)": {"malloc": True},
            "keep-freed + bf16": {"malloc": True, "bf16": True},
            "keep-freed + channels-last": {"malloc": True, "cl": True}},
}


def child(part: str, opts: dict, steps: int, threads: int, levels: tuple) -> float:
    import torch

    from mezzotint.config import PRESETS
    from mezzotint.train.loop import keep_freed_memory
    if opts.get("malloc"):
        keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cl = torch.channels_last if opts.get("cl") else torch.contiguous_format
    if part == "unet":
        from mezzotint.nn import Attention
        from mezzotint.unet import UNet
        if opts.get("rows"):  # the inference path, one small matmul per caption, as training ran before
            Attention._context_kv = lambda self, c: (torch.stack([self.to_k(r) for r in c]),
                                                     torch.stack([self.to_v(r) for r in c]))
        model = UNet(dataclasses.replace(PRESETS["shapes"].unet, attention_levels=levels))
        B = 64
        x = torch.randn(B, 8, 16, 16).contiguous(memory_format=cl)
        t, ctx = torch.randint(0, 1000, (B,)).float(), torch.randn(B, 20, 384)
        mask = torch.ones(B, 20, dtype=torch.bool)
        forward = lambda: (model(x, t, ctx, mask).float() - x).pow(2).mean()  # noqa: E731
    else:
        from mezzotint.vae import AutoencoderKL
        model = AutoencoderKL(PRESETS["shapes"].vae)
        B = 24
        x = torch.rand(B, 3, 64, 64).mul(2).sub(1).contiguous(memory_format=cl)
        noise = torch.randn(B, 8, 16, 16)
        forward = lambda: (model(x, noise)[0].float() - x).abs().mean()  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    if opts.get("compile"):
        net = torch.compile(model)
        if part == "unet":
            forward = lambda: (net(x, t, ctx, mask).float() - x).pow(2).mean()  # noqa: E731
        else:
            forward = lambda: (net(x, noise)[0].float() - x).abs().mean()  # noqa: E731

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=bool(opts.get("bf16"))):
            loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    s = time.perf_counter()
    for _ in range(steps):
        step()
    return B * steps / (time.perf_counter() - s)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=list(MODES), default="unet")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention-levels", default="0,1,2", help="UNet levels with transformers")
    p.add_argument("--modes", help="comma-separated indices of the modes to run (default: all)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        levels = tuple(int(v) for v in a.attention_levels.split(","))
        print(json.dumps(child(a.part, MODES[a.part][a.child], a.steps, a.threads, levels)))
        return
    names = list(MODES[a.part])
    if a.modes:
        try:
            names = [names[int(i)] for i in a.modes.split(",")]
        except (ValueError, IndexError):
            p.error(f"--modes takes indices 0..{len(names) - 1}, comma-separated; got {a.modes!r}")
    rates = {m: [] for m in names}
    for _ in range(a.rounds):
        for mode in rates:
            out = subprocess.run([sys.executable, __file__, "--part", a.part, "--child", mode, "--steps",
                                  str(a.steps), "--threads", str(a.threads),
                                  "--attention-levels", a.attention_levels], check=True, capture_output=True,
                                 text=True).stdout
            rates[mode].append(json.loads(out.strip().splitlines()[-1]))
    first = None
    levels = f", attention levels {a.attention_levels}" if a.part == "unet" else ""
    print(f"{a.part} training step{levels}, {a.threads} threads, median of {a.rounds} processes of {a.steps} steps:")
    for mode, r in rates.items():
        med = statistics.median(r)
        first = first or med
        print(f"  {mode:>42}: {med:6.1f} images/s  ({med / first:.2f}x the first)  runs: "
              + ", ".join(f"{v:.1f}" for v in r))


if __name__ == "__main__":
    main()

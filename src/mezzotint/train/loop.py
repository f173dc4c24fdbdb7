"""The training loop shared by the autoencoder and the UNet.

One process or many: under torchrun the environment names this process's rank and the
loop wraps the model in DistributedDataParallel (gloo on CPU, nccl on CUDA). Each rank
reads its own share of the data by index: global item g of the stream belongs to rank
(g // batch) % world_size, so the data order is a function of (seed, step) alone and a
resumed run sees exactly the items it would have seen.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..pages import keep_freed_memory
from . import state


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, dev)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * lr_min."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.lr * (tc.lr_min + (1 - tc.lr_min) * 0.5 * (1 + math.cos(math.pi * p)))


def batch_indices(step: int, micro: int, tc: TrainConfig, d: Dist) -> range:
    start = ((step * tc.accum + micro) * d.world + d.rank) * tc.batch
    return range(start, start + tc.batch)


def item_generators(seed: int, indices) -> list[torch.Generator]:
    """One generator per data item, seeded by (seed, index): the noise an item gets does not
    depend on the rank or batch it lands in, so N processes with batch B train exactly like
    one process with batch N*B, and a resumed run draws what the first run would have."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + 7 * i + 1) for i in indices]


class Task:
    """What differs between trainings: the model, its loss, and what a checkpoint holds."""
    kind: str
    model: torch.nn.Module
    terms: dict[str, float] = {}  # parts of the last loss worth logging on their own (set by loss())

    def loss(self, model, images: torch.Tensor, captions: list[str], indices: range) -> torch.Tensor:
        raise NotImplementedError

    def export(self, folder: Path, ema_model: torch.nn.Module) -> None:
        """Write the EMA weights into `folder` as a loadable model."""
        raise NotImplementedError

    def sample(self, ema_model: torch.nn.Module, path: Path) -> None:
        """Write a picture of progress (a sample grid)."""

    def prepare(self, run: Path, d: Dist, dataset) -> None:
        """Work before the first step (the UNet's encode-once pool)."""

    def fetch(self, dataset, indices: range) -> tuple[torch.Tensor | None, list[str] | None]:
        """(images, captions) of the items the loss will see."""
        items = [dataset[i] for i in indices]
        return torch.stack([im for im, _ in items]), [c for _, c in items]

    def fresh(self) -> torch.nn.Module:
        """A new module of the trained architecture (EMA weights get copied into it)."""
        raise NotImplementedError


def param_groups(model: torch.nn.Module, new_lr: float) -> list[dict]:
    """The trainable parameters, those of modules grown onto an --init model (zero-started, so
    they have everything to learn while the rest is nearly right) apart, at new_lr times the rate."""
    grown = tuple(f"{m}." for m in getattr(model, "grown", ()))
    old, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (new if grown and name.startswith(grown) else old).append(p)
    groups = [{"params": old, "scale": 1.0}]
    if new and new_lr != 1.0:
        groups.append({"params": new, "scale": new_lr})
    else:
        old += new
    return groups


def _autocast(tc: TrainConfig, device: torch.device):
    if tc.precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if tc.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 or fp32 on this device")
    if tc.precision not in ("bf16", "fp16"):
        raise ValueError(f"unknown precision {tc.precision!r}; allowed: fp32, bf16, fp16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if tc.precision == "bf16" else torch.float16)


def train(task: Task, dataset, tc: TrainConfig, d: Dist, progress: bool = True,
          stop_after: int | None = None) -> Path:
    """Train to tc.steps (or `stop_after` more steps, then checkpoint and return), resuming
    from the run folder's latest checkpoint. Returns the exported model folder (RUN/model)."""
    run = Path(tc.run)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    keep_freed_memory()
    model = task.model.to(d.device).train()
    ema = state.EMA(model, tc.ema)
    groups = param_groups(model, tc.new_lr)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.999))
    step = 0
    last = state.latest(run)
    if last is not None:
        meta = state.load_state(last, model, ema, opt)
        step = meta["step"]
        if d.main:
            print(f"resuming from {last} (step {step})", file=sys.stderr)
    elif d.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_config.json").write_text(json.dumps(asdict(tc), indent=1))
    end = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
    if step < end:
        task.prepare(run, d, dataset)
        if last is None:  # what prepare did to the weights (train --layout-fit) starts the average
            ema = state.EMA(model, tc.ema)
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(d.device.type, enabled=tc.precision == "fp16")
    log = open(run / "log.jsonl", "a") if d.main else None
    bar = None
    if d.main and progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=step, desc=f"train {task.kind}", unit="step", file=sys.stderr,
                   disable=os.environ.get("MEZZOTINT_NO_PROGRESS") == "1")
    t0, seen = time.perf_counter(), 0

    def checkpoint(step):
        ema_model = ema.copy_to(task.fresh())

        def files(folder):
            task.export(folder, ema_model)
            state.save_state(folder, step, model, ema, opt, {"kind": task.kind})
        return state.write_checkpoint(run, step, files, tc.keep)

    while step < end:
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("scale", 1.0)
        total, terms = 0.0, {}
        for micro in range(tc.accum):
            idx = batch_indices(step, micro, tc, d)
            images, captions = task.fetch(dataset, idx)
            images = images.to(d.device) if images is not None else None
            sync = micro == tc.accum - 1 or d.world == 1
            ctx = net.no_sync() if (d.world > 1 and not sync) else contextlib.nullcontext()
            with ctx, _autocast(tc, d.device):
                loss = task.loss(net, images, captions, idx) / tc.accum
            scaler.scale(loss).backward()
            total += loss.item()
            for k, v in task.terms.items():
                terms[k] = terms.get(k, 0.0) + v / tc.accum
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, tc.clip if tc.clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        step += 1
        seen += tc.batch * tc.accum * d.world
        if d.main:
            rate = seen / (time.perf_counter() - t0)
            if bar:
                bar.set_postfix(loss=f"{total:.4f}", img_s=f"{rate:.1f}", refresh=False)
                bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                log.write(json.dumps({"step": step, "loss": total, **terms, "lr": lr, "grad_norm": float(gnorm),
                                      "images_per_s": rate, "time": time.time()}) + "\n")
                log.flush()
        if step % tc.ckpt_every == 0 or step == end:
            if d.main:
                checkpoint(step)
            d.barrier()
        if d.main and tc.sample_every and (step % tc.sample_every == 0 or step == tc.steps):
            (run / "samples").mkdir(exist_ok=True)
            task.sample(ema.copy_to(task.fresh()).to(d.device).eval(), run / "samples" / f"step-{step:08d}.png")
    if bar:
        bar.close()
    final = run / "model"
    if step < tc.steps:  # stopped early on purpose: the checkpoint is the result
        if log:
            log.close()
        return state.latest(run)
    if d.main:
        # the last checkpoint already holds the exported model: copy it, less the training state
        out = final.with_name("model.tmp")
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(state.latest(run), out, ignore=shutil.ignore_patterns("train_state.*"))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(out, final)
        log.close()
    d.barrier()
    return final

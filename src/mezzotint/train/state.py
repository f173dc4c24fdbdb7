"""Run folders: atomic checkpoints that a re-run of the same command resumes from.

RUN/checkpoints/step-00001000/ is written as step-00001000.tmp-PID and renamed when
complete, so a run killed at any moment (SIGKILL included) leaves either a whole
checkpoint or a temp folder that the next start deletes. Everything is data:
safetensors for tensors, JSON for the rest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT = re.compile(r"step-(\d{8})")


def ckpt_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def latest(run: Path) -> Path | None:
    """The newest complete checkpoint; temp folders of a killed run are removed."""
    root = ckpt_dir(run)
    if not root.is_dir():
        return None
    done = []
    for p in root.iterdir():
        if ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
        elif CKPT.fullmatch(p.name) and (p / "train_state.json").is_file():
            done.append(p)
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def write_checkpoint(run: Path, step: int, write_files, keep: int) -> Path:
    """write_files(folder) fills a temp folder; it then becomes step-N atomically."""
    root = ckpt_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_files(tmp)
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    old = sorted((p for p in root.iterdir() if CKPT.fullmatch(p.name)), key=lambda p: p.name)
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as flat tensors plus a JSON-able rest (no pickle)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    if len(meta["param_groups"]) != len(opt.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(meta['param_groups'])} parameter group(s), these "
                         f"options give {len(opt.param_groups)}: rerun with the --new-lr the run started with")
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(folder: Path, step: int, model, ema, opt, extra: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_t, opt_meta = optimizer_tensors(opt)
    tensors.update(opt_t)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, folder / "train_state.safetensors")
    (folder / "train_state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **extra}, indent=1))


def load_state(folder: Path, model, ema, opt) -> dict:
    tensors = load_file(folder / "train_state.safetensors")
    meta = json.loads((folder / "train_state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    load_optimizer(opt, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta


class EMA:
    """Exponential moving average of weights (Polyak averaging), with a warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone().float() for k, v in sd.items()}

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        model.load_state_dict(self.shadow)
        return model

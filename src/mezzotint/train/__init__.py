"""Training entry points: `mezzotint train-vae` and `mezzotint train`."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from ..config import PRESETS, ModelConfig, TrainConfig


def _stored_or(run: Path, name: str, make):
    """A run keeps the architecture it started with: reuse RUN/name on resume."""
    f = run / name
    if f.is_file():
        return json.loads(f.read_text())
    data = make()
    run.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(data, indent=1))
    return data


def train_vae(tc: TrainConfig, preset: str = "shapes", init: str | None = None,
              stop_after: int | None = None, decoder_only: bool = False) -> Path:
    from .. import checkpoints
    from ..config import VAEConfig, from_dict
    from ..data import open_dataset
    from .loop import Dist, train
    from .tasks import VAETask
    if tc.pool:
        raise ValueError("--pool encodes latents for UNet training; the autoencoder trains on pixels")
    if tc.attention_loss:
        raise ValueError("--attention-loss steers the UNet's cross-attention; the autoencoder has none")
    if tc.contrast:
        raise ValueError("--contrast compares the UNet's predictions under two captions; the autoencoder reads none")
    d = Dist.from_env()
    torch.manual_seed(tc.seed)  # the initial weights
    if init:
        vae = checkpoints.load_vae(init)
        cfg = vae.cfg
        vae.requires_grad_(True)
    else:
        vae = None
        cfg = from_dict(VAEConfig, _stored_or(Path(tc.run), "vae_config.json",
                                             lambda: dataclasses.asdict(PRESETS[preset].vae)))
    dataset = open_dataset(tc.data, tc.size, tc.seed, tc.kinds)
    return train(VAETask(cfg, tc, dataset, vae, decoder_only), dataset, tc, d, stop_after=stop_after)


_BLANK_NEEDS = ("--blank-terminal needs a zero-terminal-SNR schedule (--zero-terminal-snr): "
                "elsewhere the last step's input still holds some of the image")


def train_unet(tc: TrainConfig, preset: str = "shapes", vae: str | None = None, init: str | None = None,
               prediction: str | None = None, stop_after: int | None = None,
               attention_levels: tuple[int, ...] | None = None, context_layers: int | None = None,
               zero_snr: bool = False, positions: int | None = None, layout: int | None = None,
               input_gate: bool = False, blank_terminal: bool = False) -> Path:

    from .. import checkpoints
    from ..data import open_dataset
    from ..text import load_text_encoder
    from .loop import Dist, train
    from .tasks import UNetTask
    d = Dist.from_env()
    torch.manual_seed(tc.seed)  # the initial weights
    run = Path(tc.run)
    for flag, n in (("--positions", positions), ("--layout", layout)):
        if n is not None and n < 0:
            raise ValueError(f"{flag} must be >= 0, got {n}")
    if context_layers is not None and context_layers < 0:
        raise ValueError(f"--context-layers must be >= 0, got {context_layers}")
    if init:
        unet, vae_model, cfg = checkpoints.load_model(init)
        if attention_levels is not None and tuple(attention_levels) != tuple(cfg.unet.attention_levels):
            unet = grow_attention(unet, attention_levels)
            cfg = dataclasses.replace(cfg, unet=unet.cfg)
        if context_layers is not None and context_layers != cfg.unet.context_layers:
            unet = grow_context(unet, context_layers)
            cfg = dataclasses.replace(cfg, unet=unet.cfg)
        if positions is not None and positions != cfg.unet.positions:
            unet = grow_positions(unet, positions)
            cfg = dataclasses.replace(cfg, unet=unet.cfg)
        if layout is not None and layout != cfg.unet.layout:
            unet = grow_layout(unet, layout)
            cfg = dataclasses.replace(cfg, unet=unet.cfg)
        if input_gate and not cfg.unet.input_gate:
            unet = grow_input_gate(unet)
            cfg = dataclasses.replace(cfg, unet=unet.cfg)
        if zero_snr:
            cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, rescale_betas_zero_snr=True))
        if blank_terminal:
            cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, blank_terminal=True))
        unet.requires_grad_(True).train()
        base = Path(init)
    else:
        if vae is None:
            raise ValueError("give --vae (a trained autoencoder) or --init (a model to fine-tune)")
        vae_model = checkpoints.load_vae(vae)

        def make():
            c = PRESETS[preset]
            if attention_levels is not None:
                _check_range(attention_levels, len(c.unet.channel_mult), f"preset {preset!r}")
                c = dataclasses.replace(c, unet=dataclasses.replace(c.unet, attention_levels=tuple(attention_levels)))
            if context_layers is not None:
                c = dataclasses.replace(c, unet=dataclasses.replace(c.unet, context_layers=context_layers))
            if positions is not None:
                c = dataclasses.replace(c, unet=dataclasses.replace(c.unet, positions=positions))
            if layout is not None:
                c = dataclasses.replace(c, unet=dataclasses.replace(c.unet, layout=layout))
            if input_gate:
                c = dataclasses.replace(c, unet=dataclasses.replace(c.unet, input_gate=True))
            sched = c.scheduler if prediction is None else dataclasses.replace(c.scheduler, prediction_type=prediction)
            if zero_snr:
                sched = dataclasses.replace(sched, rescale_betas_zero_snr=True)
            if blank_terminal:
                sched = dataclasses.replace(sched, blank_terminal=True)
            c_in = vae_model.cfg.latent_channels
            if (c.unet.in_channels, c.unet.out_channels) != (c_in, c_in):
                raise ValueError(f"preset {preset!r} UNet takes {c.unet.in_channels} latent channels, "
                                 f"the autoencoder makes {c_in}")
            return dataclasses.replace(c, vae=vae_model.cfg, scheduler=sched).to_dict()
        if blank_terminal and not zero_snr:  # refused before the run folder is made
            raise ValueError(_BLANK_NEEDS)
        cfg = ModelConfig.from_dict(_stored_or(run, "model_config.json", make))
        unet, base = None, None
    _check_resume(run, cfg)
    if cfg.scheduler.blank_terminal and not cfg.scheduler.rescale_betas_zero_snr:
        raise ValueError(_BLANK_NEEDS)
    if cfg.scheduler.rescale_betas_zero_snr and cfg.scheduler.prediction_type != "v":
        raise ValueError("a zero-terminal-SNR schedule needs v-prediction (--prediction v): at pure noise "
                         "a noise prediction says nothing about the image")
    text = load_text_encoder(cfg.text, base, d.device, torch.float32)
    dataset = open_dataset(tc.data, tc.size, tc.seed, tc.kinds)
    return train(UNetTask(cfg, tc, vae_model, text, d.device, unet), dataset, tc, d, stop_after=stop_after)


def _check_resume(run: Path, cfg: ModelConfig) -> None:
    """A rerun must train the model it started: an --init run's architecture and schedule come
    from its options, and a rerun without, say, --zero-terminal-snr would go on silently with
    another noise schedule."""
    from .. import checkpoints
    from .state import latest
    last = latest(run)
    if last is None:
        return
    was = checkpoints.read_config(last)
    for part in ("unet", "scheduler"):
        if getattr(was, part) != getattr(cfg, part):
            raise ValueError(f"{run} was started with another {part} config than these options give "
                             f"({last.name}: {getattr(was, part)}); rerun it with the options it started "
                             "with, or use another --run-dir")


def _check_range(levels, n_levels: int, what: str) -> None:
    if bad := [lv for lv in levels if not 0 <= lv < n_levels]:
        raise ValueError(f"attention level(s) {bad} out of range: {what} has levels 0..{n_levels - 1}")


def grow_attention(unet, levels):
    """The same UNet with transformers at more levels, computing the same function.

    The new transformers' output projections start at zero, so each adds nothing until
    training moves it (the zero-init trick of ControlNet and LDM's proj_out): a trained
    model gains capacity without losing what it knows. Levels can only be added."""
    old = tuple(unet.cfg.attention_levels)
    n_levels = len(unet.cfg.channel_mult)
    levels = tuple(sorted(set(levels)))
    if missing := [lv for lv in old if lv not in levels]:
        raise ValueError(f"--attention-levels must keep the model's levels {list(old)}; missing {missing}")
    _check_range(levels, n_levels, "the model")
    grown, new = _grown(unet, dataclasses.replace(unet.cfg, attention_levels=levels), r"(.*?\.attentions\.\d+)\.")
    with torch.no_grad():
        for name in new:
            grown.get_submodule(name).proj_out.weight.zero_()
            grown.get_submodule(name).proj_out.bias.zero_()
    return grown.to(next(unet.parameters()).dtype)


def grow_context(unet, layers: int):
    """The same UNet with `layers` text-refiner blocks (ContextBlock), computing the same
    function at first: each new block's two output projections start at zero. Blocks can
    only be added."""
    have = unet.cfg.context_layers
    if layers < have:
        raise ValueError(f"--context-layers can only add blocks: the model has {have}, asked for {layers}")
    grown, new = _grown(unet, dataclasses.replace(unet.cfg, context_layers=layers), r"(context_blocks\.\d+)\.")
    with torch.no_grad():
        for name in new:
            block = grown.get_submodule(name)
            for out in (block.attn.to_out[0], block.ff.net[2]):
                out.weight.zero_()
                out.bias.zero_()
    return grown.to(next(unet.parameters()).dtype)


def grow_positions(unet, n: int):
    """The same UNet with 2-D positions (n frequencies an axis) fed to every transformer,
    computing the same function at first: each projection of them starts at zero."""
    have = unet.cfg.positions
    if have and n != have:
        raise ValueError(f"--positions: the model already has {have} frequencies an axis")
    if n == have:
        return unet
    grown, new = _grown(unet, dataclasses.replace(unet.cfg, positions=n), r"(.*?\.attentions\.\d+\.pos_proj)\.")
    with torch.no_grad():
        for name in new:
            grown.get_submodule(name).weight.zero_()
            grown.get_submodule(name).bias.zero_()
    return grown.to(next(unet.parameters()).dtype)


def grow_layout(unet, n: int):
    """The same UNet with a layout prior (n position frequencies an axis), computing the same
    function at first: its output projection starts at zero."""
    have = unet.cfg.layout
    if have:
        raise ValueError(f"--layout: the model already has a layout prior ({have} frequencies an axis)")
    grown, new = _grown(unet, dataclasses.replace(unet.cfg, layout=n), r"(layout)\.")
    with torch.no_grad():
        out = grown.layout.attn2.to_out[0]
        out.weight.zero_()
        out.bias.zero_()
    return grown.to(next(unet.parameters()).dtype)


def grow_input_gate(unet):
    """The same UNet with its first feature map gated by the timestep, computing the same
    function at first: the gate's projection starts at zero (a scale of exactly 1)."""
    grown, _ = _grown(unet, dataclasses.replace(unet.cfg, input_gate=True), r"(input_gate)\.")
    with torch.no_grad():
        grown.input_gate.weight.zero_()
        grown.input_gate.bias.zero_()
    return grown.to(next(unet.parameters()).dtype)


def _grown(unet, cfg, new_key: str):
    """A UNet of config `cfg` holding `unet`'s weights, and the names of its new modules
    (those of the missing keys, which must all match `new_key`)."""
    from ..unet import UNet
    grown = UNet(cfg)
    result = grown.load_state_dict(unet.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"cannot grow: unexpected keys {result.unexpected_keys[:3]}")
    new = {re.match(new_key, k) for k in result.missing_keys}
    if None in new:
        raise ValueError("cannot grow: keys besides the new modules are missing")
    names = sorted({m.group(1) for m in new})
    grown.grown = getattr(unet, "grown", ()) + tuple(names)  # for --new-lr (train/loop.py)
    return grown, names

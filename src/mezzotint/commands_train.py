"""The commands that make and judge models: new-model, train-vae, train, eval."""
from __future__ import annotations

import os
import sys

from .cli import UsageError
from .commands import _model_config, _writable_target


def new_model(args) -> int:
    import torch

    from .checkpoints import save_model
    from .config import PRESETS
    from .unet import UNet
    from .vae import AutoencoderKL
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; allowed: {', '.join(PRESETS)}")
    _writable_target(args.output)
    cfg = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    print(save_model(args.output, UNet(cfg.unet), AutoencoderKL(cfg.vae), cfg))
    return 0


def _train_config(args):
    import dataclasses

    from .config import TrainConfig
    from .data.shapes import kind_weights
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    if tc.steps < 1 or tc.batch < 1 or tc.accum < 1:
        raise UsageError("--steps, --batch and --accum must be >= 1")
    if tc.layout_fit < 0:
        raise UsageError(f"--layout-fit is a number of steps >= 0, got {tc.layout_fit}")
    if tc.layout_target < 0:
        raise UsageError(f"--layout-target is a loss weight >= 0, got {tc.layout_target}")
    if tc.new_lr <= 0:
        raise UsageError(f"--new-lr is a learning-rate multiplier > 0, got {tc.new_lr}")
    if tc.snr_gamma < 0 or tc.snr_floor < 0:
        raise UsageError("--snr-gamma and --snr-floor must be >= 0")
    if not 0 <= tc.contrast_from < 1:
        raise UsageError(f"--contrast-from is a share of the schedule in [0, 1), got {tc.contrast_from}")
    if tc.contrast < 0 or tc.contrast_beta <= 0:
        raise UsageError("--contrast must be >= 0 and --contrast-beta > 0")
    if not 0 <= tc.high_noise <= 1:
        raise UsageError(f"--high-noise is a share in [0, 1], got {tc.high_noise}")
    if not 0 <= tc.terminal <= 1:
        raise UsageError(f"--terminal is a share in [0, 1], got {tc.terminal}")
    try:
        kind_weights(tc.kinds)
    except ValueError as e:
        raise UsageError(f"--kinds: {e}") from None
    if tc.kinds and tc.data != "shapes":
        raise UsageError(f"--kinds weights the Shapes world's caption kinds; --data {tc.data} is not the Shapes world")
    if tc.precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"unknown precision {tc.precision!r}; allowed: fp32, bf16, fp16")
    from .config import PRESETS
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; allowed: {', '.join(PRESETS)}")
    return tc


def train_vae(args) -> int:
    from .train import train_vae as run
    tc = _train_config(args)
    try:
        print(run(tc, args.preset, args.init, args.stop_after, args.decoder_only))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0


def _levels(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UsageError(f"--attention-levels takes comma-separated level numbers like 0,1,2; got {text!r}") from None


def train(args) -> int:
    from .train import train_unet as run
    tc = _train_config(args)
    try:
        print(run(tc, args.preset, args.vae, args.init, args.prediction, args.stop_after,
                  _levels(args.attention_levels), args.context_layers, args.zero_terminal_snr,
                  args.positions, args.layout, args.input_gate, args.blank_terminal))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0


def fit_layout(args) -> int:
    from .train.layout_map import add_layout_map
    if min(args.steps, args.items, args.frequencies, args.heads) < 1:
        raise UsageError("--steps, --items, --frequencies and --heads must be >= 1")
    model_path, cfg = _model_config(args.model)
    T = cfg.scheduler.num_train_timesteps
    if args.strength < 0 or not 0 <= args.start <= T:
        raise UsageError(f"--strength must be >= 0 and --start a timestep in [0, {T}]")
    from .pipeline import MAX_CANDIDATES
    if not 1 <= args.candidates <= MAX_CANDIDATES:
        raise UsageError(f"--candidates must be in [1, {MAX_CANDIDATES}], got {args.candidates}")
    if cfg.text.kind != "bert":
        raise UsageError(f"fit-layout needs a BERT-family text encoder (it reads token offsets); this model's is "
                         f"{cfg.text.kind!r}")
    _writable_target(args.output)
    try:
        path, agreement = add_layout_map(str(model_path), str(args.output), args.steps, args.items, args.seed,
                                         args.strength, args.start, args.frequencies, args.heads,
                                         args.candidates)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"layout map: held-out side agreement {agreement:.3f}", file=sys.stderr)
    print(path)
    return 0


def eval(args) -> int:  # noqa: A001 (the command's name)
    from tqdm import tqdm

    from .evaluate.run import eval_prompts, evaluate, judge_ground_truth, report, write_json
    from .pipeline import Pipeline, check_request, defaults_for, resolve_device, resolve_dtype
    if args.per_category < 1 or args.batch < 1:
        raise UsageError("--per-category and --batch must be >= 1")
    model_path, cfg = _model_config(args.model)
    req = defaults_for(cfg, "", negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                       sampler=args.sampler, cfg=args.cfg, width=args.width, height=args.height,
                       karras=args.karras, eta=args.eta, guidance_rescale=args.guidance_rescale,
                       layout_guidance=args.layout_guidance, layout_candidates=args.layout_candidates)
    try:
        check_request(req, cfg)
        resolve_dtype(args.dtype, resolve_device(args.device))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        _writable_target(args.json)
    if args.autoencoder:
        from .checkpoints import load_vae
        from .evaluate.run import autoencoder_round_trip
        n = 5 * args.per_category  # 250 scenes at the default 50
        acc = autoencoder_round_trip(load_vae(model_path), n=n, size=req.width)
        print(f"autoencoder round trip: judge accuracy {acc:.3f} on {n} ground-truth renders")
        return 0
    n = len(eval_prompts(args.per_category, args.prompt_seed, args.phrasing))
    gt = judge_ground_truth(200, size=req.width)
    pipe = Pipeline.load(model_path, device=args.device, dtype=args.dtype)
    bar = tqdm(total=n, desc="eval", unit="img", file=sys.stderr,
               disable=os.environ.get("MEZZOTINT_NO_PROGRESS") == "1")
    table, rows = evaluate(pipe, req, args.per_category, args.prompt_seed, args.phrasing, args.batch,
                           args.save_images, progress=bar.update)
    bar.close()
    print(report(table, gt, args.phrasing))
    if args.json:
        from dataclasses import asdict
        write_json(args.json, table, rows, {"model": str(model_path), "request": asdict(req),
                                            "phrasing": args.phrasing, "judge_ground_truth": gt})
    return 0

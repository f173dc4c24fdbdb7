"""What each CLI command does. Checks every input before loading any weights."""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

from .cli import UsageError, default_model


def _model_config(path: Path | None):
    from .checkpoints import ModelError, read_config
    from .sd import is_sd_checkpoint, read_sd_config
    path = path or default_model()
    try:
        return path, (read_sd_config(path) if is_sd_checkpoint(path) else read_config(path))
    except ModelError as e:
        raise UsageError(str(e)) from None


def _check_loras(args, prompts: list[str]) -> None:
    """--lora files and <lora:name> tags must resolve before any weights load."""
    from .sd import find_lora, parse_lora_tags
    for path, _ in getattr(args, "lora", []):
        if not path.is_file():
            raise UsageError(f"--lora file not found: {path}")
    lora_dir = getattr(args, "lora_dir", None)
    if lora_dir is not None and not lora_dir.is_dir():
        raise UsageError(f"--lora-dir is not a folder: {lora_dir}")
    for p in prompts:
        try:
            for name, _ in parse_lora_tags(p)[1]:
                if lora_dir is None:
                    raise UsageError(f"the prompt names <lora:{name}> but no --lora-dir is given")
                find_lora(name, lora_dir)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None


def _load(model_path, args, device=None):
    from .pipeline import Pipeline
    pipe = Pipeline.load(model_path, device=device or args.device, dtype=args.dtype)
    pipe.extra_loras = [(str(p), w) for p, w in getattr(args, "lora", [])]
    pipe.lora_dir = getattr(args, "lora_dir", None)
    return pipe


def _writable_target(out: Path) -> None:
    """Fail now, creating nothing, if `out` could not be written later."""
    probe = out if out.suffix.lower() != ".png" else out.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"output {probe} exists and is not a folder")
    while not probe.exists():
        probe = probe.parent
    try:  # a real write, since os.access says yes to root on read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"output not writable: {out} ({probe}: {e.strerror})") from None


def _read_prompts(file: Path) -> list[str]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompt file {file}: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {file} holds no prompts")
    return prompts


def _output_paths(out: Path, n: int, numbered_from_zero: bool) -> list[Path]:
    if out.suffix.lower() == ".png":
        if numbered_from_zero:
            raise UsageError("--prompt-file writes a folder of images: give --output a folder, not a .png")
        return [out] if n == 1 else [out.with_name(f"{out.stem}-{k:04d}.png") for k in range(n)]
    start = 0
    if not numbered_from_zero and out.is_dir():
        taken = [int(m.group(1)) for p in out.iterdir() if (m := re.fullmatch(r"(\d+)\.png", p.name))]
        start = max(taken, default=-1) + 1
    return [out / f"{start + k:04d}.png" for k in range(n)]


def _prepare(args, prompts: list[str], numbered_from_zero: bool = False, size=None):
    """Check the model, request, device and output before any weights load."""
    from .pipeline import check_request, defaults_for, resolve_device, resolve_dtype
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    model_path, cfg = _model_config(args.model)
    width, height = size if size and args.width is None and args.height is None else (args.width, args.height)
    req = defaults_for(cfg, prompts[0], negative_prompt=args.negative_prompt, seed=args.seed,
                       steps=args.steps, sampler=args.sampler, cfg=args.cfg, width=width,
                       height=height, karras=args.karras, eta=args.eta, guidance_rescale=args.guidance_rescale,
                       layout_guidance=args.layout_guidance, layout_candidates=args.layout_candidates)
    try:
        check_request(req, cfg)
        device = resolve_device(args.device)
        resolve_dtype(args.dtype, device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_loras(args, prompts)
    _writable_target(args.output)
    return model_path, cfg, req, _output_paths(args.output, len(prompts), numbered_from_zero)


def _produce(pipe, req, prompts, paths, batch: int, run, edit=None, rank: int = 0, world: int = 1) -> int:
    """Generate in batches (image i always gets seed + i), write each PNG, print its path.
    With world > 1 this process makes batch c only when c % world == rank (batch 1: image i
    when i % world == rank), so the processes together write exactly the one-process set."""
    from tqdm import tqdm

    from .metadata import save_png
    starts = list(range(0, len(prompts), batch))[rank::world]
    steps = req.steps if edit is None or edit["strength"] >= 1 else int(req.steps * edit["strength"])
    bar = tqdm(total=sum(len(prompts[i:i + batch]) for i in starts) * steps, desc="generating", unit="step",
               file=sys.stderr, disable=os.environ.get("MEZZOTINT_NO_PROGRESS") == "1")
    Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    for i in starts:
        chunk = prompts[i:i + batch]
        try:
            results = run(req.for_image(i), chunk, lambda info, n=len(chunk): bar.update(n))
        except ValueError as e:  # e.g. a LoRA made for another model: nothing of this batch is written
            bar.close()
            raise UsageError(str(e)) from None
        for k, res in enumerate(results):
            print(save_png(res.image, paths[i + k], pipe.record(res.request, edit)), flush=True)
    bar.close()
    return 0


def generate(args) -> int:
    from .pipeline import resolve_device
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("give a PROMPT or --prompt-file, not both or neither")
    # under torchrun (RANK / WORLD_SIZE set) each process takes its share of the prompt file
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.prompt_file is None:
        raise UsageError(f"running as {world} processes (WORLD_SIZE): give --prompt-file to share out")
    prompts = _read_prompts(args.prompt_file) if args.prompt_file else [args.prompt] * max(args.batch, 1)
    model_path, cfg, req, paths = _prepare(args, prompts, args.prompt_file is not None)
    device = args.device
    if world > 1 and device in ("auto", "cuda") and resolve_device(device).type == "cuda":
        import torch
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local % torch.cuda.device_count()}"  # one GPU per process, shared if too few
    pipe = _load(model_path, args, device)
    return _produce(pipe, req, prompts, paths, args.batch, lambda r, p, cb: pipe(r, p, callback=cb),
                    rank=rank, world=world)


def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UsageError(f"{what} {path} is not an image we can read ({e})") from None


def _sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _edit_size(image, cfg):
    """Output size for an edited image: its own, moved to the nearest multiple of the factor."""
    from .edit import fit_size
    size = fit_size(*image.size, cfg.vae.factor)
    if size != image.size:
        print(f"note: {image.size[0]}x{image.size[1]} resized to {size[0]}x{size[1]} "
              f"(a multiple of the autoencoder's factor {cfg.vae.factor})", file=sys.stderr)
    return size


def img2img(args) -> int:
    if not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength must be in [0, 1], got {args.strength}")
    image = _open_image(args.image, "--image")
    _, cfg = _model_config(args.model)
    prompts = [args.prompt] * max(args.batch, 1)
    model_path, cfg, req, paths = _prepare(args, prompts, size=_edit_size(image, cfg))
    pipe = _load(model_path, args)
    edit = {"mode": "img2img", "strength": args.strength, "image_sha256": _sha256(args.image)}
    return _produce(pipe, req, prompts, paths, args.batch,
                    lambda r, p, cb: pipe.img2img(r, image, args.strength, p, cb), edit)


def inpaint(args) -> int:
    from . import edit as ed
    if not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength must be in [0, 1], got {args.strength}")
    if args.mask_blur is not None and args.mask_blur < 0:
        raise UsageError(f"--mask-blur must be >= 0 pixels, got {args.mask_blur}")
    if (args.mask is None) == (args.extend is None):
        raise UsageError("give --mask (inpainting) or --extend (outpainting), not both or neither")
    image = ed.to_rgb(_open_image(args.image, "--image"))
    if args.extend is not None:
        try:
            image, mask = ed.extend(image, ed.parse_extend(args.extend))
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        mask = _open_image(args.mask, "--mask")
        try:
            ed.check_pair(image, mask)
        except ValueError as e:
            raise UsageError(str(e)) from None
    _, cfg = _model_config(args.model)
    f = cfg.vae.factor
    if args.extend is not None and (image.width % f or image.height % f):
        raise UsageError(f"--extend makes a {image.width}x{image.height} canvas; the autoencoder needs "
                         f"multiples of {f}: change the amounts so that width and height divide by {f}")
    prompts = [args.prompt] * max(args.batch, 1)
    model_path, cfg, req, paths = _prepare(args, prompts, size=_edit_size(image, cfg))
    pipe = _load(model_path, args)
    edit = {"mode": "outpaint" if args.extend else "inpaint", "strength": args.strength,
            "mask_blur": args.mask_blur, "image_sha256": _sha256(args.image),
            **({"extend": ed.parse_extend(args.extend)} if args.extend else {"mask_sha256": _sha256(args.mask)})}
    return _produce(pipe, req, prompts, paths, args.batch,
                    lambda r, p, cb: pipe.inpaint(r, image, mask, args.strength, args.mask_blur, p, cb), edit)


def explain(args) -> int:
    from .explain import explain as run
    out = args.output
    if out is None:
        root = Path("outputs")
        taken = [int(m.group(1)) for p in root.glob("explain-*") if (m := re.fullmatch(r"explain-(\d+)", p.name))]
        out = root / f"explain-{max(taken, default=-1) + 1:04d}"
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output {out} exists and is not an empty folder")
    args.output, args.batch = out, 1
    model_path, cfg, req, _ = _prepare(args, [args.prompt])
    pipe = _load(model_path, args)
    from tqdm import tqdm
    bar = tqdm(total=req.steps, desc="explaining", unit="step", file=sys.stderr,
               disable=os.environ.get("MEZZOTINT_NO_PROGRESS") == "1")
    expl = run(pipe, req, on_step=lambda info: bar.update(1))
    bar.close()
    print(expl.save(out) / "index.html")
    return 0


def serve(args) -> int:
    import logging

    from .pipeline import resolve_device, resolve_dtype
    for name in ("max_queue", "max_width", "max_height", "max_steps", "max_batch", "max_body_mb"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.models_dir is not None and not args.models_dir.is_dir():
        raise UsageError(f"--models-dir {args.models_dir} is not a folder")
    try:
        import uvicorn

        from .server import Limits, create_app, host_warning
        from .server.models import Models
    except ImportError as e:
        raise UsageError(f"serve needs FastAPI and uvicorn ({e}): pip install fastapi uvicorn") from None
    model_path, _ = _model_config(args.model)
    try:
        resolve_dtype(args.dtype, resolve_device(args.device))
    except ValueError as e:
        raise UsageError(str(e)) from None
    token = args.token or os.environ.get("MEZZOTINT_TOKEN") or None
    warning = host_warning(args.host, token)
    if warning:
        print(warning, file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    limits = Limits(max_queue=args.max_queue, max_width=args.max_width, max_height=args.max_height,
                    max_steps=args.max_steps, max_batch=args.max_batch, max_body_mb=args.max_body_mb)
    app = create_app(Models(model_path, args.models_dir, args.device, args.dtype), limits, token)
    app.state.cmd_flags.update(listen=args.host not in ("127.0.0.1", "localhost", "::1"), port=args.port)
    print(f"mezzotint: serving {model_path} on http://{args.host}:{args.port}/ (API docs: /docs)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def convert(args) -> int:
    from .checkpoints import ModelError
    from .sd import convert as run
    if not args.source.exists():
        raise UsageError(f"model not found: {args.source}")
    try:
        print(run(args.source, args.output, args.to, args.prediction))
    except (ModelError, ValueError, FileExistsError) as e:
        raise UsageError(str(e)) from None
    return 0


def samplers(args) -> int:
    from .diffusion import sampler_help, sampler_names
    for name in sampler_names():
        print(f"{name:10s} {sampler_help(name)}")
    return 0


def reproduce(args) -> int:
    import numpy as np

    from .metadata import read_record, save_png
    from .pipeline import Pipeline, Request, check_request

    try:
        record = read_record(args.image)
        req = Request(**record["request"])
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{e}") from None
    model_path = args.model or Path(record["model"]["path"])
    model_path, cfg = _model_config(model_path)
    try:
        check_request(req, cfg)
    except ValueError as e:
        raise UsageError(f"recorded request is invalid: {e}") from None
    pipe = Pipeline.load(model_path, device=args.device, dtype=record.get("dtype"))
    if pipe.model_hash != record["model"]["sha256"]:
        print(f"warning: model hash {pipe.model_hash[:10]} differs from the recorded "
              f"{record['model']['sha256'][:10]}", file=sys.stderr)
    [res] = pipe(req)
    from PIL import Image
    with Image.open(args.image) as im:
        old = np.asarray(im.convert("RGB"), dtype=np.int16)
    new = np.asarray(res.image, dtype=np.int16)
    if args.output:
        print(save_png(res.image, args.output, pipe.record(req)))
    if old.shape != new.shape:
        print(f"differs: size {old.shape[1]}x{old.shape[0]} vs {new.shape[1]}x{new.shape[0]}")
        return 1
    diff = np.abs(old - new)
    if diff.max() == 0:
        print(f"match: all {old.shape[0] * old.shape[1]} pixels identical")
        return 0
    print(f"differs: {int((diff.max(axis=2) > 0).sum())} of {old.shape[0] * old.shape[1]} pixels, "
          f"max difference {int(diff.max())}/255, mean {diff.mean():.4f}")
    return 1

"""The `mezzotint` command: argument parsing that calls library functions."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "weights" / "default"


GENERATE_EXAMPLES = """examples:
  mezzotint generate "a red circle to the left of a blue square"
  mezzotint generate "three green stars" --seed 7 --batch 4 --output stars/
  mezzotint generate --prompt-file prompts.txt --output set/
  mezzotint generate "a purple ring" --sampler euler_a --steps 30 --cfg 7 --output ring.png
"""


EDIT_EXAMPLES = {
    "img2img": """examples:
  mezzotint img2img "a blue square" --image in.png --strength 0.6
  mezzotint img2img "three green stars" --image photo.jpg --width 64 --height 64 --batch 4 --output edits/
""",
    "inpaint": """examples:
  mezzotint inpaint "a yellow star" --image in.png --mask mask.png
  mezzotint inpaint "a red circle to the left of a blue square" --image in.png --extend left=16,right=16
""",
}


class UsageError(Exception):
    """Bad input from the command line: one line to the user, exit code 2."""


def default_model() -> Path:
    if not (DEFAULT_MODEL / "model.json").is_file():
        raise UsageError("no built-in default model is installed in this build; pass --model PATH "
                         "(make one with `mezzotint new-model tiny --output PATH`, or train one)")
    return DEFAULT_MODEL


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return v


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to steer away from")
    g.add_argument("--seed", type=int, default=0, metavar="INT", help="image k of a batch uses seed+k (default 0)")
    g.add_argument("--steps", type=int, metavar="N", help="denoising steps (model default, usually 20)")
    g.add_argument("--sampler", metavar="NAME", help="sampler name, see `mezzotint samplers` (model default)")
    g.add_argument("--karras", action="store_true", default=None, help="use Karras sigma spacing")
    g.add_argument("--eta", type=finite_float, default=0.0, metavar="F", help="ddim noise, 0..1 (default 0)")
    g.add_argument("--cfg", type=finite_float, metavar="SCALE", help="guidance scale (model default); 1 = no guidance")
    g.add_argument("--guidance-rescale", type=finite_float, metavar="PHI",
                   help="rescale guided predictions toward the conditional one's spread, 0..1 (Lin et al. "
                        "2024; 0.7 suits zero-terminal-SNR models; model default)")
    g.add_argument("--layout-guidance", type=finite_float, metavar="S",
                   help="strength of layout guidance: the model's layout map, read off the prompt, steers "
                        "the noisy steps' cross-attention (models with one; 0 = off; model default)")
    g.add_argument("--layout-candidates", type=int, metavar="K",
                   help="draw K initial noises per image and keep the one whose first-step attention best "
                        "agrees with the layout map, for prompts whose objects it puts apart (models with "
                        "one; 1 = off; model default)")
    g.add_argument("--width", type=int, metavar="PX", help="pixels, a multiple of the autoencoder factor")
    g.add_argument("--height", type=int, metavar="PX", help="pixels, a multiple of the autoencoder factor")
    r = p.add_argument_group("model and device")
    r.add_argument("--model", type=Path, metavar="PATH", help="model folder or .safetensors file (default: built-in)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run (auto: the best device present)")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fast"],
                   help="precision (default float32 on CPU, float16 on CUDA; fast: the fastest this device "
                   "runs natively, bfloat16 on CPUs with AVX512-BF16 or AMX)")
    r.add_argument("--fast", dest="dtype", action="store_const", const="fast", help="the same as --dtype fast")


def lora_spec(text: str) -> tuple[Path, float]:
    """FILE or FILE:WEIGHT (the weight after the last colon, if it is a number)."""
    head, _, tail = text.rpartition(":")
    try:
        return (Path(head), float(tail)) if head else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (Stable Diffusion models)")
    g.add_argument("--lora", type=lora_spec, action="append", default=[], metavar="FILE:WEIGHT",
                   help="merge this LoRA (kohya/A1111 or diffusers/PEFT layout) at WEIGHT (default 1); repeatable")
    g.add_argument("--lora-dir", type=Path, metavar="DIR",
                   help="folder where <lora:name:weight> tags in the prompt are looked up")


def add_image_args(p: argparse.ArgumentParser, batch_help: str) -> None:
    """--batch, --output, then the generation and LoRA options (generate, img2img, inpaint)."""
    p.add_argument("--batch", type=int, default=1, metavar="N", help=batch_help)
    p.add_argument("--output", type=Path, default=Path("outputs"), metavar="PATH",
                   help="folder (default ./outputs) or, for one image, a .png path")
    add_generation_args(p)
    add_lora_args(p)


def add_training_args(p: argparse.ArgumentParser, unet: bool) -> None:
    import dataclasses

    from .config import TrainConfig
    p.add_argument("--run-dir", dest="run", required=True,
                   help="run folder (checkpoints, log.jsonl, samples/); a rerun resumes from it")
    p.add_argument("--data", default="shapes",
                   help="'shapes' (the built-in world), a folder of images with .txt captions, or .tar shards")
    p.add_argument("--kinds", default="", metavar="S,T,P,C",
                   help="Shapes world: weights of its caption kinds single,two,position,count in the "
                        "training mix (default the world's 3,2,3,2)")
    p.add_argument("--preset", default="shapes", help="architecture preset for a new model (default shapes)")
    p.add_argument("--init", help="start from this model (fine-tuning)" if unet else "start from this autoencoder")
    if not unet:
        p.add_argument("--decoder-only", action="store_true",
                       help="with --init: train the decoder alone, keeping the latent space")
    if unet:
        p.add_argument("--vae", help="trained autoencoder folder (from train-vae) or model folder")
        p.add_argument("--prediction", choices=["eps", "v"], help="what the UNet predicts (preset default)")
        p.add_argument("--attention-levels", metavar="0,1,2",
                       help="UNet levels (0 = full resolution) with transformers; with --init, adds "
                            "transformers to a trained model without changing its output at step 0")
        p.add_argument("--context-layers", type=int, metavar="N",
                       help="trainable self-attention blocks that refine the frozen text encoder's "
                            "tokens before cross-attention; with --init, adds them without changing "
                            "the output at step 0")
        p.add_argument("--positions", type=int, metavar="N",
                       help="feed every transformer 2-D positions (N sinusoid frequencies an axis); with "
                            "--init, adds them without changing the output at step 0")
        p.add_argument("--layout", type=int, metavar="N",
                       help="a layout prior: a cross-attention from 2-D positions (N sinusoid frequencies "
                            "an axis) to the text, added to the first feature map; with --init, adds it "
                            "without changing the output at step 0")
        p.add_argument("--input-gate", action="store_true",
                       help="scale the first feature map by 1 + g(timestep), so the last steps can shut "
                            "the noise out; with --init, added without changing the output at step 0")
        p.add_argument("--blank-terminal", action="store_true",
                       help="with --zero-terminal-snr: give the UNet zeros instead of the pure noise of the "
                            "last step (a sampler's first call), so it must draw the layout from the prompt")
        p.add_argument("--zero-terminal-snr", action="store_true",
                       help="rescale the noise schedule to end at pure noise (Lin et al. 2024; v-prediction "
                            "only), so the prompt, not leftover signal in the noise, decides the layout")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="train at most N more steps in this invocation, then checkpoint and exit")
    o = p.add_argument_group("optimisation")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("run", "data", "kinds"):
            continue
        kind = type(f.default)
        o.add_argument("--" + f.name.replace("_", "-"), type=finite_float if kind is float else kind,
                       default=f.default, help=f"default {f.default}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mezzotint", description="Text-to-image latent diffusion.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="make images from a prompt",
                       description="Make images from a text prompt. Paths written go to stdout.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=GENERATE_EXAMPLES)
    g.add_argument("prompt", nargs="?", help="what to draw")
    g.add_argument("--prompt-file", type=Path, metavar="FILE",
                   help="one prompt a line, one image each, written as 0000.png, 0001.png, ... into --output")
    add_image_args(g, "images per forward pass (default 1)")

    for name, what in (("img2img", "redraw an image with a prompt (SDEdit)"),
                       ("inpaint", "regenerate the masked part of an image, or grow its canvas (outpainting)")):
        ed = sub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]}. Paths written go to stdout.",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EDIT_EXAMPLES[name])
        ed.add_argument("prompt", help="what to draw")
        ed.add_argument("--image", type=Path, required=True, metavar="IN.png",
                        help="the input (any size and mode; transparency is flattened onto white)")
        ed.add_argument("--strength", type=finite_float, default=0.75 if name == "img2img" else 1.0, metavar="S",
                        help="how much to change, 0..1: 0 keeps the image, 1 ignores it "
                             f"(default {0.75 if name == 'img2img' else 1.0})")
        if name == "inpaint":
            ed.add_argument("--mask", type=Path, metavar="MASK.png",
                            help="white = regenerate, black (or transparent) = keep; same size as the image")
            ed.add_argument("--extend", metavar="SIDES",
                            help="outpainting: grow the canvas, e.g. left=16,right=16 (sides: left right top bottom)")
            ed.add_argument("--mask-blur", type=finite_float, metavar="PX",
                            help="soft edge of the composite, in pixels (default: 1 per 64 of the shorter side)")
        add_image_args(ed, "images (seeds seed..seed+N-1)")

    x = sub.add_parser("explain", help="X-ray of one generation: denoising trajectory and per-word heat maps",
                       description="Generate one image and write, into a new folder: the denoising trajectory "
                       "(animated WebP and GIF, contact sheet), a cross-attention heat map per prompt word "
                       "(DAAM) over the image, and index.html tying them together.")
    x.add_argument("prompt", help="what to draw")
    x.add_argument("--output", type=Path, metavar="DIR",
                   help="a new (or empty) folder (default: the next free outputs/explain-NNNN)")
    add_generation_args(x)
    add_lora_args(x)

    c = sub.add_parser("convert", help="convert a model between formats",
                       description="Convert a Stable Diffusion single file (.safetensors, or .ckpt read "
                       "without running code), a diffusers folder, or a mezzotint model into another format.")
    c.add_argument("source", type=Path, help="model file or folder")
    c.add_argument("--to", choices=["mezzotint", "diffusers", "original"], default="mezzotint",
                   help="mezzotint folder, diffusers folder, or one original-layout .safetensors (default mezzotint)")
    c.add_argument("--output", type=Path, required=True, metavar="PATH", help="new folder (or .safetensors file)")
    c.add_argument("--prediction", choices=["eps", "v"], help="override what the UNet predicts (when the file cannot tell)")

    sub.add_parser("samplers", help="list the samplers")

    s = sub.add_parser("serve", help="HTTP server: JSON API, AUTOMATIC1111-compatible API, web page",
                       description="Serve a model over HTTP: a native job API (/api/v1, OpenAPI at "
                       "/openapi.json), AUTOMATIC1111-compatible routes (/sdapi/v1) and a web page (/).")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111 clients expect)")
    s.add_argument("--model", type=Path, metavar="PATH", help="model to load (default: built-in)")
    s.add_argument("--models-dir", type=Path, metavar="DIR",
                   help="more models (folders or .safetensors) that clients may switch to")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fast"])
    s.add_argument("--fast", dest="dtype", action="store_const", const="fast", help="the same as --dtype fast")
    s.add_argument("--token", help="require `Authorization: Bearer TOKEN` (or basic auth, password TOKEN) "
                   "on every API route; also read from $MEZZOTINT_TOKEN")
    s.add_argument("--max-queue", type=int, default=16, metavar="N", help="pending jobs before 503 (default 16)")
    s.add_argument("--max-width", type=int, default=1024, metavar="PX", help="default 1024")
    s.add_argument("--max-height", type=int, default=1024, metavar="PX", help="default 1024")
    s.add_argument("--max-steps", type=int, default=150, metavar="N", help="default 150")
    s.add_argument("--max-batch", type=int, default=8, metavar="N", help="images per job (default 8)")
    s.add_argument("--max-body-mb", type=finite_float, default=32.0, metavar="N", help="request size (default 32)")

    r = sub.add_parser("reproduce", help="regenerate an image from its metadata and compare pixels")
    r.add_argument("image", type=Path)
    r.add_argument("--model", type=Path, help="model to use instead of the one recorded")
    r.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    r.add_argument("--output", type=Path, help="also write the regenerated image here")

    for name, what in (("train-vae", "train the autoencoder"), ("train", "train the UNet (text encoder frozen)")):
        t = sub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]}. Re-running the same "
                           "command resumes from the run folder's latest checkpoint.")
        add_training_args(t, unet=name == "train")

    e = sub.add_parser("eval", help="judge a model on the Shapes world prompt set (GenEval-style table)",
                       description="Render the Shapes world prompt set through a model, check every image "
                       "against its caption on the pixels, and print accuracy per category.")
    e.add_argument("--per-category", type=int, default=50, help="prompts per category (default 50)")
    e.add_argument("--phrasing", choices=["canonical", "heldout"], default="canonical",
                   help="canonical captions, or phrasings that training never used")
    e.add_argument("--prompt-seed", type=int, default=0, help="which prompt set (default 0)")
    e.add_argument("--batch", type=int, default=8, help="images per forward pass (default 8)")
    e.add_argument("--json", type=Path, metavar="FILE", help="write per-image verdicts here")
    e.add_argument("--save-images", type=Path, metavar="DIR", help="also keep the images")
    e.add_argument("--autoencoder", action="store_true",
                   help="judge only the autoencoder: ground-truth renders after encode + decode")
    add_generation_args(e)

    f = sub.add_parser("fit-layout", help="fit a layout map to the Shapes world and write the model with it",
                       description="Fit a layout map (where each object word of a prompt goes, from the text "
                       "alone) to the Shapes world's object masks, and write a copy of the model that uses it "
                       "for layout guidance by default. About 7 minutes on 2 cores at the defaults; no UNet training.")
    f.add_argument("--model", type=Path, help="model folder (default: the built-in model)")
    f.add_argument("--output", type=Path, required=True, help="model folder to write")
    f.add_argument("--steps", type=int, default=5000, help="Adam steps of 128 captions (default 5000)")
    f.add_argument("--items", type=int, default=40000, help="Shapes captions to fit on (default 40000)")
    f.add_argument("--frequencies", type=int, default=8, help="position frequencies an axis (default 8)")
    f.add_argument("--heads", type=int, default=4, help="heads, fitted each on its own and averaged (default 4)")
    f.add_argument("--strength", type=finite_float, default=3.0, help="default layout guidance strength (3)")
    f.add_argument("--start", type=finite_float, default=400.0,
                   help="guidance applies from the top of the schedule down to this timestep (default 400)")
    f.add_argument("--candidates", type=int, default=8,
                   help="default layout candidates: initial noises per image to choose among by the map (8)")
    f.add_argument("--seed", type=int, default=0)

    n = sub.add_parser("new-model", help="write a model with random weights from a preset (for tests or training)")
    n.add_argument("preset", help="preset name")
    n.add_argument("--output", type=Path, required=True)
    n.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    from . import commands, commands_train
    args = build_parser().parse_args(argv)
    name = args.command.replace("-", "_")
    try:
        return (getattr(commands, name, None) or getattr(commands_train, name))(args)
    except UsageError as e:
        print(f"mezzotint: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mezzotint: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

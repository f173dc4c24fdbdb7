"""Stable Diffusion 1.5 in mezzotint vs diffusers on the CPU: speed and memory, side by side.

    python benchmarks/sd_vs_diffusers.py [--sizes 256 512] [--runs 2] [--steps 20] [--modes exact fast]
    python benchmarks/sd_vs_diffusers.py --tiny --sizes 64 --steps 2 --runs 1   # check the script quickly

Random weights with SD 1.5's shapes (about 1.1 B parameters, fp32) are built once into
--workdir: a diffusers folder (diffusers loads it) and an original-layout single .safetensors
(mezzotint loads it). No download needed; --tiny uses a shrunken model instead.

Diffusers and mezzotint runs alternate, each in a fresh process, with the same prompt, seed,
initial latent, Euler sampler, steps, cfg 7.5 and all cores; each starts with its model files
read into the page cache (read_through). Measured:
  - load time (library import + from_pretrained / Pipeline.load) and the time to generate
    the first image (text encoding, sampling, decoding: a cold process, as a CLI user sees it);
    with --warm also a second image in the same process (a server's case);
  - peak resident memory of the process: ru_maxrss and VmHWM;
  - the mean absolute difference of the two images, in 1/255 (same weights: should be < 1);
  - the UNet's GFLOP/s in mezzotint (FLOPs of one guided call, batch 2, from FlopCounterMode)
    against the machine's fp32 matmul peak (the best of torch.mm, which is MKL's sgemm, and
    oneDNN's GEMM: on some CPUs the latter is twice the former);
  - fast mode (`--dtype fast`): the relative L2 error of every UNet call of the float32
    trajectory and of the decoder call, against float32 on the same inputs.
Each target is printed beside its measurement, marked met or not. Timings need an otherwise
idle machine: the load average is printed first.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT, SEED, CFG = "a photograph of an astronaut riding a horse", 42, 7.5
TARGETS = {"time": 0.87, "rss": 0.70, "unet": 0.90,  # mezzotint/diffusers <=, <=; share of matmul peak >=
           "fast_time": 1 / 3, "fast_error": 0.02}  # fast/diffusers <=; relative L2 error per call <=

# mezzotint's modes: the dtype argument of Pipeline.load; exact-resident is exact with every weight
# kept resident (MEZZOTINT_STREAM_WEIGHTS=0, set in its children only: what exact did before
# streaming was the default)
MODES = {"exact": "float32", "exact-resident": "float32", "fast": "fast"}

# diffusers' UNet2DConditionModel defaults are SD 1.5's but for cross_attention_dim
SD15 = dict(unet=dict(sample_size=64, cross_attention_dim=768),
            vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
            text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
TINY = dict(  # tests/test_sd_common.py's SD 1.5-like model
    unet=dict(sample_size=8, block_out_channels=[32, 64, 64], layers_per_block=1, cross_attention_dim=32,
              down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    vae=dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=16,
             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1))


def model_paths(a) -> tuple[Path, Path]:
    root = Path(a.workdir).expanduser() / ("sd15-tiny" if a.tiny else "sd15")
    return root / "diffusers", root / "model.safetensors"


# -- children: each runs in a fresh process (this script with --child) and returns JSON --------

def peak_rss_mib() -> dict:
    import resource
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return {"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "hwm_mib": hwm / 1024}


def child_build(a) -> dict:
    """The diffusers folder (random fp32 weights) and the single file of the same weights, if missing."""
    import shutil

    import torch
    folder, single = model_paths(a)
    if not (folder / "model_index.json").is_file():
        import diffusers
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from mezzotint.sd.tokenizer import BOS, EOS, clip_vocab
        cfg = TINY if a.tiny else SD15
        torch.manual_seed(0)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **cfg["text"]))
        vocab, merges = clip_vocab()  # diffusers wants transformers' tokenizer (mezzotint's is sd/clip.py)
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], bos_token=BOS,
                                  eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=77)
        sched = diffusers.EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
        pipe = diffusers.StableDiffusionPipeline(
            unet=diffusers.UNet2DConditionModel(**cfg["unet"]).eval(), vae=diffusers.AutoencoderKL(**cfg["vae"]).eval(),
            text_encoder=text.eval(), tokenizer=tokenizer, scheduler=sched, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp)
        os.replace(tmp, folder)  # only a complete folder gets the final name
        del pipe, text
    if not single.is_file():
        from mezzotint.sd import load_sd, save_single_file
        save_single_file(single, *load_sd(folder))
    return {}


def child_diffusers(a) -> dict:
    t0 = time.perf_counter()
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model_paths(a)[0], local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    t1 = time.perf_counter()
    # mezzotint's unit noise for this seed (diffusion/noise.py: one CPU generator per image,
    # a batch of one), drawn without importing mezzotint into diffusers' process
    f = pipe.vae_scale_factor
    noise = torch.randn((1, pipe.unet.config.in_channels, a.size // f, a.size // f),
                        generator=torch.Generator("cpu").manual_seed(SEED))

    def generate():
        return pipe(PROMPT, negative_prompt="", num_inference_steps=a.steps, guidance_scale=CFG, height=a.size,
                    width=a.size, latents=noise).images[0]
    image = generate()
    t2 = time.perf_counter()
    image.save(a.png)
    return {"load_s": t1 - t0, "generate_s": t2 - t1, **warm(a, generate), **peak_rss_mib()}


def warm(a, generate) -> dict:
    """With --warm, the time of a second image in the same process (a server's case)."""
    if not a.warm:
        return {}
    t0 = time.perf_counter()
    generate()
    return {"warm_s": time.perf_counter() - t0}


def mezzotint_pipeline(a):
    from mezzotint.pipeline import Pipeline
    if a.mode == "exact-resident":
        os.environ["MEZZOTINT_STREAM_WEIGHTS"] = "0"
    return Pipeline.load(model_paths(a)[1], "cpu", MODES[a.mode])


def child_mezzotint(a) -> dict:
    t0 = time.perf_counter()
    from mezzotint.pipeline import Request
    pipe = mezzotint_pipeline(a)
    t1 = time.perf_counter()

    def generate():
        return pipe(Request(prompt=PROMPT, seed=SEED, steps=a.steps, sampler="euler", cfg=CFG, width=a.size,
                            height=a.size, karras=False))[0].image
    image = generate()
    t2 = time.perf_counter()
    image.save(a.png)
    stopped = {k: s.stopped for k, s in pipe.streams.items() if s.stopped}  # streaming given up, and why
    return {"load_s": t1 - t0, "generate_s": t2 - t1, **warm(a, generate), **peak_rss_mib(), "stopped": stopped}


def child_unet(a) -> dict:
    """FLOPs of one guided UNet call (batch 2: unconditional and conditional rows), and its time."""
    import torch
    import torch.utils.flop_counter as fc
    pipe = mezzotint_pipeline(a)
    f, c = pipe.config.vae.factor, pipe.config.unet.in_channels
    dt = next(pipe.unet.parameters()).dtype
    x = torch.randn(2, c, a.size // f, a.size // f, generator=torch.Generator().manual_seed(0)).to(dt)
    ctx, mask = pipe.text.encode(["", PROMPT])
    ctx = ctx.to(dt)
    t = torch.full((2,), 500.0)
    # PyTorch has no formula for its CPU flash-attention kernel: count it as the others are
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v)}
    import mezzotint.nn as mnn
    fast_paths = mnn._ONEDNN, mnn._PACKED_CONV
    with torch.inference_mode():
        # the counter knows aten's convolution and matmul, not oneDNN's own ops: count the
        # same arithmetic on the aten path, then time the real one
        mnn._ONEDNN = mnn._PACKED_CONV = False
        with fc.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
            pipe.unet(x, t, ctx, mask)
        mnn._ONEDNN, mnn._PACKED_CONV = fast_paths
        pipe.unet(x, t, ctx, mask)  # warm-up (packs the conv weights)
        times = []
        for _ in range(a.unet_calls):
            t0 = time.perf_counter()
            pipe.unet(x, t, ctx, mask)
            times.append(time.perf_counter() - t0)
    return {"flops": counter.get_total_flops(), "call_s": statistics.median(times)}


def child_peak(a) -> dict:
    """The machine's fp32 matmul peak: the best GFLOP/s on large square matrices of torch.mm
    (MKL) and of oneDNN's GEMM (which mezzotint's linear layers use)."""
    import torch
    best = {"mkl": 0.0, "onednn": 0.0}
    gemms = {"mkl": lambda x, y: torch.mm(x, y), "onednn": lambda x, y: torch.ops.mkldnn._linear_pointwise(
        x, y, None, "none", [], "")}  # x @ y.T: the same FLOPs
    for n in (2048, 4096):
        x, y = torch.randn(n, n), torch.randn(n, n)
        for name, f in gemms.items():
            f(x, y)  # warm-up
            for _ in range(3):
                t0 = time.perf_counter()
                f(x, y)
                best[name] = max(best[name], 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"gflops": max(best.values()), **best}


def child_error(a) -> dict:
    """Fast mode's error: every UNet call of a float32 generation (its guided batch of 2),
    and the decoder call on its final latent, run in float32 and in fast mode on the same
    inputs; relative L2 error ||fast - fp32|| / ||fp32|| of each output."""
    import torch

    from mezzotint.pipeline import Pipeline, Request
    exact, fast = (Pipeline.load(model_paths(a)[1], "cpu", m) for m in ("float32", MODES[a.mode]))
    calls = []
    hook = exact.unet.register_forward_hook(lambda m, args, kw, out: calls.append((args, kw, out.clone())),
                                            with_kwargs=True)
    [res] = exact(Request(prompt=PROMPT, seed=SEED, steps=a.steps, sampler="euler", cfg=CFG, width=a.size,
                          height=a.size, karras=False))
    hook.remove()
    dt = next(fast.unet.parameters()).dtype

    def cast(v, i):  # as the Denoiser does: the timestep (argument 1) stays float32
        return v.to(dt) if torch.is_tensor(v) and v.is_floating_point() and i != 1 else v

    def rel(y, ref):
        return float((y.float() - ref).norm() / ref.norm())
    with torch.inference_mode():
        unet = [rel(fast.unet(*(cast(v, i) for i, v in enumerate(args)), **{k: cast(v, -1) for k, v in kw.items()}),
                    out) for args, kw, out in calls]
        z = res.latent[None]
        decoder = rel(fast.vae.decode(z.to(dt)), exact.vae.decode(z))
    return {"dtype": str(dt).removeprefix("torch."), "unet": unet, "decoder": decoder}


CHILDREN = {"build": child_build, "diffusers": child_diffusers, "mezzotint": child_mezzotint,
            "unet": child_unet, "peak": child_peak, "error": child_error}


# -- the parent: never imports torch, so no child starts from a large process ------------------

def run_child(a, role: str, **extra) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        argv = [sys.executable, __file__, "--child", role, "--result", result, "--workdir", a.workdir, "--steps",
                a.steps, "--threads", a.threads, "--unet-calls", a.unet_calls, *(["--tiny"] if a.tiny else []),
                *(["--warm"] if a.warm else [])]
        argv += [x for k, v in extra.items() for x in (f"--{k}", v)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        p = subprocess.run([str(x) for x in argv], capture_output=True, text=True, env=env, check=False)
        if p.returncode:
            sys.exit(f"child {role} {extra} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
        return json.loads(result.read_text())


def mark(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def image_diff(png_a, png_b) -> float:
    import numpy as np
    from PIL import Image
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (png_a, png_b))
    return float(np.abs(a - b).mean())  # in 1/255


def read_through(path: Path) -> None:
    """Reads every file under `path` into the page cache. Before each run, so that each starts
    from the same cache, whatever ran before it: this workplace's machines page out file
    pages left idle for a minute (DAMON), and the model read during the other contender's run
    was found cold (a 5 s slower load and first step), warm when a mezzotint mode ran right
    after another mezzotint mode."""
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass


def bench_size(a, size: int, tmp: Path) -> list[bool]:
    """Alternating runs at one size; prints its table, returns whether each target is met."""
    contenders = {"diffusers": ("diffusers", {}), **{f"mezzotint {m}": ("mezzotint", {"mode": m}) for m in a.modes}}
    runs = {n: [] for n in contenders}
    for r in range(a.runs):
        for n, (role, extra) in contenders.items():
            png = tmp / f"{size}-{n.replace(' ', '-')}-{r}.png"
            read_through(model_paths(a)[0 if role == "diffusers" else 1])
            res = run_child(a, role, size=size, png=png, **extra)
            runs[n].append({**res, "png": png})
            second = f"  second image {res['warm_s']:6.1f} s" if a.warm else ""
            stopped = "".join(f"\n    {k} stopped streaming: {why}" for k, why in res.get("stopped", {}).items())
            print(f"  {size}px run {r + 1}/{a.runs} {n:<24} load {res['load_s']:6.1f} s  generate "
                  f"{res['generate_s']:7.1f} s{second}  VmHWM {res['hwm_mib']:7.0f} MiB{stopped}", flush=True)
    keys = ("load_s", "generate_s", *(("warm_s",) if a.warm else ()), "hwm_mib", "maxrss_mib")
    med = {n: {k: (max if k.endswith("mib") else statistics.median)(x[k] for x in rs) for k in keys}
           for n, rs in runs.items()}
    print(f"\n{size}x{size}, {a.steps} Euler steps, cfg {CFG}, {a.threads} threads: medians of {a.runs} runs, "
          f"largest peak memory")
    print(f"  {'':<26}{'generate s':>11}{'load s':>9}{'VmHWM MiB':>11}{'maxrss MiB':>12}"
          f"{'second image s':>16}" * a.warm)
    for n, m in med.items():
        print(f"  {n:<26}{m['generate_s']:>11.2f}{m['load_s']:>9.2f}{m['hwm_mib']:>11.0f}{m['maxrss_mib']:>12.0f}"
              + (f"{m['warm_s']:>16.2f}" if a.warm else ""))
    met, d = [], med["diffusers"]
    for mode in a.modes:
        n, m = f"mezzotint {mode}", med[f"mezzotint {mode}"]
        gen, load, rss = m["generate_s"] / d["generate_s"], m["load_s"] / d["load_s"], m["hwm_mib"] / d["hwm_mib"]
        diff = max(image_diff(x["png"], y["png"]) for x in runs[n] for y in runs["diffusers"])
        if mode == "fast":
            met.append(gen <= TARGETS["fast_time"])
            print(f"  {n} / diffusers: generate {gen:.2f} = {1 / gen:.2f}x faster (target >= 3x: {mark(met[-1])}), "
                  f"load {load:.2f}, peak RSS {rss:.2f}; mean |image difference| {diff:.3f}/255")
            if a.warm:  # both second images: mezzotint's weights are packed by then
                w = m["warm_s"] / d["warm_s"]
                met.append(w <= TARGETS["fast_time"])
                cold = (m["load_s"] + m["generate_s"]) / (d["load_s"] + d["generate_s"])
                print(f"  {n} / diffusers, second image: {w:.2f} = {1 / w:.2f}x faster "
                      f"(target >= 3x: {mark(met[-1])}); load + first image {cold:.2f}")
            continue
        met += [gen <= TARGETS["time"], rss <= TARGETS["rss"], diff < 1]
        print(f"  {n} / diffusers: generate {gen:.2f} (target <= {TARGETS['time']}: {mark(met[-3])}), "
              f"load {load:.2f}, peak RSS {rss:.2f} (target <= {TARGETS['rss']}: {mark(met[-2])})")
        print(f"  mean |image difference| {diff:.3f}/255, largest over run pairs (target < 1/255: {mark(diff < 1)})")
    print()
    return met


def bench_error(a) -> list[bool]:
    met = []
    for size in a.sizes:
        r = run_child(a, "error", size=size, mode="fast")
        worst = max(r["unet"])
        met += [worst <= TARGETS["fast_error"], r["decoder"] <= TARGETS["fast_error"]]
        print(f"fast mode ({r['dtype']}) vs float32, {size}x{size}, relative L2 error per call (target <= "
              f"{TARGETS['fast_error']:.0%}): UNet, {len(r['unet'])} calls: largest {worst:.2%}, median "
              f"{statistics.median(r['unet']):.2%} ({mark(met[-2])}); decoder {r['decoder']:.2%} ({mark(met[-1])})")
    print()
    return met


def bench_unet(a) -> list[bool]:
    p = run_child(a, "peak")
    peak = p["gflops"]
    print(f"UNet throughput in mezzotint (one guided call, batch 2; median of {a.unet_calls} calls) against "
          f"the fp32 matmul peak, {peak:.1f} GFLOP/s (best of torch.mm {p['mkl']:.1f} and oneDNN {p['onednn']:.1f}, "
          f"n = 2048 and 4096, {a.threads} threads)")
    print(f"  {'mode':<8}{'size':>6}{'GFLOP/call':>12}{'s/call':>9}{'GFLOP/s':>9}{'of peak':>9}   "
          f"target >= {TARGETS['unet']:.0%}")
    met = []
    for mode in a.modes:
        for size in a.sizes:
            r = run_child(a, "unet", size=size, mode=mode)
            rate = r["flops"] / r["call_s"] / 1e9
            if mode == "fast":  # fewer-bit arithmetic: the fp32 peak is no yardstick
                print(f"  {mode:<8}{size:>6}{r['flops'] / 1e9:>12.1f}{r['call_s']:>9.3f}{rate:>9.1f}")
                continue
            met.append(rate / peak >= TARGETS["unet"])
            print(f"  {mode:<8}{size:>6}{r['flops'] / 1e9:>12.1f}{r['call_s']:>9.3f}{rate:>9.1f}"
                  f"{rate / peak:>9.1%}   {mark(met[-1])}", flush=True)
    return met


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--runs", type=int, default=2, help="runs of each pipeline per size")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["exact"])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--unet-calls", type=int, default=3, help="timed UNet calls per size")
    p.add_argument("--warm", action="store_true",
                   help="also time a second image in each process (a server's case: caches filled, weights packed)")
    p.add_argument("--parts", nargs="+", choices=["runs", "error", "unet"], default=["runs", "error", "unet"],
                   help="what to measure (default all)")
    p.add_argument("--workdir", default=str(Path("~/.cache/mezzotint-bench").expanduser()))
    p.add_argument("--tiny", action="store_true", help="a shrunken model, to check the script quickly")
    for internal in ("--child", "--result", "--png", "--mode"):
        p.add_argument(internal, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import torch
        torch.set_num_threads(a.threads)
        Path(a.result).write_text(json.dumps(CHILDREN[a.child](a)))
        return
    folder, single = model_paths(a)
    print(f"model: {'tiny SD 1.5-like' if a.tiny else 'SD 1.5 shapes'}, random fp32 weights; diffusers loads "
          f"{folder}, mezzotint {single}")
    print(f"machine: {os.cpu_count()} cores, {a.threads} threads used, load average {os.getloadavg()[0]:.2f} "
          f"(near 0 for trustworthy timings)\n", flush=True)
    if importlib.util.find_spec("accelerate") is None:
        print("warning: accelerate is not installed: diffusers loads without low_cpu_mem_usage (slower, more memory)\n")
    run_child(a, "build")
    met = []
    with tempfile.TemporaryDirectory(prefix="mezzotint-bench-") as tmp:
        for size in a.sizes if "runs" in a.parts else ():
            met += bench_size(a, size, Path(tmp))
    if "fast" in a.modes and "error" in a.parts:
        met += bench_error(a)
    if "unet" in a.parts:
        met += bench_unet(a)
    print(f"\ntargets met: {sum(met)} of {len(met)}")


if __name__ == "__main__":
    main()

"""First-step probe: does the x0 prediction of a sampler's first step put the named objects
on the named sides? For each canonical position prompt (judge.prompt_set; pairs of one
colour left out) and S noises (one generator, seed 0), the guided x0 at sigmas[0] is
decoded; each named colour's centroid is the palette-closeness weighted mean of the pixel
coordinates; a case agrees when the centroids are ordered as the relation says. With
"prior" last, what the layout prior adds is decoded instead (64x64 models).

    python scripts/first_step_probe.py MODEL [S=4] [CFG=3] [prior]
"""
import sys

import numpy as np
import torch

from mezzotint.data.shapes import COLOURS
from mezzotint.diffusion.guidance import CFGDenoiser
from mezzotint.evaluate.judge import prompt_set
from mezzotint.pipeline import Pipeline, defaults_for

model = sys.argv[1]
S = int(sys.argv[2]) if len(sys.argv) > 2 else 4
cfg = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
prior = len(sys.argv) > 4 and sys.argv[4] == "prior"  # decode what the layout prior paints instead
torch.set_num_threads(2)
pipe = Pipeline.load(model, device="cpu")
prompts = [p for p, c in prompt_set(50) if c == "position"]
req = defaults_for(pipe.config, prompts[0])
sig = pipe.sigmas(req)
yy, xx = np.mgrid[0:64, 0:64] / 63.0


def centroid(img, colour):
    d = ((img - np.array(COLOURS[colour], np.float32)) ** 2).sum(-1)
    w = np.exp(-d / (2 * 40.0 ** 2))
    return (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()


agree = n = 0
margin = []
for p in prompts:
    words = p.split()
    c1, c2 = words[1], [w for w in words if w in COLOURS][1]
    if c1 == c2:
        continue
    rel = "left" if "left" in p else "right" if "right" in p else "above" if "above" in p else "below"
    cond, uncond = pipe.encode_prompts([p] * S, "")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(S, pipe.config.unet.out_channels, 16, 16, generator=g) * float((1 + sig[0] ** 2) ** 0.5)
    with torch.inference_mode():
        if prior:
            lay = pipe.unet.layout
            blank = torch.zeros(1, lay.pos_in.out_features, 16, 16)
            x0 = lay(blank, cond["context"][:1], cond["context_mask"][:1])[:, :x.shape[1]]
        else:
            x0 = CFGDenoiser(pipe.denoiser, cond, uncond, cfg)(x, sig[0].expand(S))
    for im in pipe.decode(x0):
        a = np.asarray(im, np.float32)
        (x1, y1), (x2, y2) = centroid(a, c1), centroid(a, c2)
        m = {"left": x2 - x1, "right": x1 - x2, "above": y2 - y1, "below": y1 - y2}[rel]
        margin.append(m)
        agree += m > 0
        n += 1
print(f"{model}: first-step side agreement {agree / n:.3f} ({agree}/{n}), mean margin {np.mean(margin):+.4f}")

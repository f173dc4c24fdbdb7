"""Key tables between our (= diffusers') parameter names and the original CompVis /
Stability single-file layout, and the model configs read off the original tensors.

Each table maps one of OUR keys to (original key, part): part is None, or (i, n) when
the original stores n of our tensors stacked along dim 0 (OpenCLIP's fused q/k/v). The
tables run from our side because our module tree lists every key we need; loading
looks each up, and writing the original layout is the same table read the other way.
Written after diffusers' convert_from_ckpt / single_file_utils, as rules not lists.
"""
from __future__ import annotations

import re

from ..config import TextConfig, UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: a Hugging Face CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14's text tower

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_key(key: str, cfg: UNetConfig) -> tuple[str, None]:
    """Our UNet key -> original key (without UNET_PREFIX)."""
    n = cfg.num_res_blocks
    L = len(cfg.channel_mult)

    def res(rest):  # "conv1.weight" -> "in_layers.2.weight"
        name, tail = rest.split(".", 1)
        return f"{_RES[name]}.{tail}"

    rules = [
        (r"time_embedding\.linear_(\d)\.(.+)", lambda a, b: f"time_embed.{2 * int(a) - 2}.{b}"),
        (r"conv_in\.(.+)", lambda b: f"input_blocks.0.0.{b}"),
        (r"conv_norm_out\.(.+)", lambda b: f"out.0.{b}"),
        (r"conv_out\.(.+)", lambda b: f"out.2.{b}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"input_blocks.{1 + int(i) * (n + 1) + int(j)}.0.{res(r)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, r: f"input_blocks.{1 + int(i) * (n + 1) + int(j)}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda i, r: f"input_blocks.{(int(i) + 1) * (n + 1)}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d)\.(.+)", lambda k, r: f"middle_block.{2 * int(k)}.{res(r)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"output_blocks.{int(i) * (n + 1) + int(j)}.0.{res(r)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, r: f"output_blocks.{int(i) * (n + 1) + int(j)}.1.{r}"),
        # the upsampler follows the last ResBlock, after its transformer where the level has one
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, r: f"output_blocks.{int(i) * (n + 1) + n}."
                      f"{2 if L - 1 - int(i) in cfg.attention_levels else 1}.conv.{r}"),
    ]
    return _apply(rules, key), None


def vae_key(key: str, cfg: VAEConfig) -> tuple[str, None]:
    """Our autoencoder key -> original key (without VAE_PREFIX)."""
    L = len(cfg.channel_mult)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

    def block(rest):
        return rest.replace("conv_shortcut", "nin_shortcut")

    def mid_attn(rest):
        name, tail = rest.rsplit(".", 1)
        return f"{attn[name]}.{tail}"

    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda i, j, r: f"encoder.down.{i}.block.{j}.{block(r)}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", lambda i, r: f"encoder.down.{i}.downsample.{r}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"decoder.up.{L - 1 - int(i)}.block.{j}.{block(r)}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", lambda i, r: f"decoder.up.{L - 1 - int(i)}.upsample.{r}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", lambda p, k, r: f"{p}.mid.block_{int(k) + 1}.{block(r)}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda p, r: f"{p}.mid.attn_1.{mid_attn(r)}"),
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda p, r: f"{p}.norm_out.{r}"),
        (r"(.+)", lambda r: r),  # conv_in, conv_out, quant_conv, post_quant_conv
    ]
    return _apply(rules, key), None


def canonical_clip_key(key: str) -> str:
    """transformers >= 5 drops the "text_model." level of CLIPTextModel; files keep it."""
    return key if key.startswith("text_model.") else "text_model." + key


def clip_key(key: str) -> tuple[str, None]:
    """Our CLIPTextModel key -> SD 1.x key (without CLIP_PREFIX): the same HF layout."""
    return canonical_clip_key(key), None


def openclip_key(key: str) -> tuple[str, tuple[int, int] | None]:
    """Our CLIPTextModel key -> OpenCLIP key (without OPENCLIP_PREFIX)."""
    key = canonical_clip_key(key).removeprefix("text_model.")
    layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    qkv = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)", key)
    if m:
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", (qkv[m[2]], 3)
    rules = [
        (r"embeddings\.token_embedding\.weight", lambda: "token_embedding.weight"),
        (r"embeddings\.position_embedding\.weight", lambda: "positional_embedding"),
        (r"final_layer_norm\.(.+)", lambda r: f"ln_final.{r}"),
        (r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", lambda i, name, w: f"transformer.resblocks.{i}.{layer[name]}.{w}"),
    ]
    return _apply(rules, key), None


def _apply(rules, key: str) -> str:
    for pattern, fn in rules:
        m = re.fullmatch(pattern, key)
        if m:
            try:
                return fn(*m.groups())
            except KeyError:
                break
    raise KeyError(f"no original-layout name for {key!r}")


# -- configs from the original tensors ----------------------------------------------------

def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def unet_config(sd: dict, sd2: bool) -> UNetConfig:
    """Architecture of the UNet whose original keys (prefix stripped) and shapes are in `sd`."""
    keys = list(sd)
    conv_in = sd["input_blocks.0.0.weight"]
    ch0 = conv_in.shape[0]
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
    L = len(downs) + 1
    n = downs[0] - 1 if downs else len(blocks) - 1
    if n < 1 or blocks != list(range(L * n + L)) or downs != [(i + 1) * (n + 1) for i in range(L - 1)]:
        raise ValueError("input blocks do not form a Stable Diffusion UNet")
    widths = [sd[f"input_blocks.{1 + i * (n + 1)}.0.in_layers.2.weight"].shape[0] for i in range(L)]
    if any(w % ch0 for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of {ch0}")
    attention = tuple(i for i in range(L) if f"input_blocks.{1 + i * (n + 1)}.1.proj_in.weight" in sd)
    proj = sd["middle_block.1.proj_in.weight"]
    depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    return UNetConfig(
        in_channels=conv_in.shape[1], out_channels=sd["out.2.weight"].shape[0], channels=ch0,
        channel_mult=tuple(w // ch0 for w in widths), num_res_blocks=n, attention_levels=attention,
        # heads are not in the tensors: SD 2.x uses 64-wide heads, SD 1.x 8 heads everywhere
        head_dim=64, num_heads=0 if sd2 else 8, linear_proj=proj.ndim == 2,
        context_dim=sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        transformer_depth=depth, groups=32)


def vae_config(sd: dict) -> VAEConfig:
    keys = list(sd)
    conv_in = sd["encoder.conv_in.weight"]
    ch0 = conv_in.shape[0]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    if levels != list(range(len(levels))) or any(w % ch0 for w in widths):
        raise ValueError("encoder levels do not form a KL autoencoder")
    latent = sd["decoder.conv_in.weight"].shape[1]
    return VAEConfig(
        in_channels=conv_in.shape[1], latent_channels=latent, channels=ch0,
        channel_mult=tuple(w // ch0 for w in widths),
        num_res_blocks=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        mid_attention="encoder.mid.attn_1.q.weight" in sd, groups=32,
        scaling_factor=0.18215 if latent == 4 else 1.0)


def clip_config(sd: dict, openclip: bool) -> dict:
    """CLIPTextConfig arguments for the text tower in `sd` (prefix stripped).

    SD 2.x conditions on OpenCLIP's penultimate layer: as diffusers does, the last
    resblock is dropped and the final LayerNorm applied to the one before.
    """
    if openclip:
        emb, pos = sd["token_embedding.weight"], sd["positional_embedding"]
        layers = len(_indices(sd, r"transformer\.resblocks\.(\d+)\.")) - 1
        inner = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act = "gelu"
    else:
        emb = sd["text_model.embeddings.token_embedding.weight"]
        pos = sd["text_model.embeddings.position_embedding.weight"]
        layers = len(_indices(sd, r"text_model\.encoder\.layers\.(\d+)\."))
        inner = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        act = "quick_gelu"
    vocab, width = emb.shape
    if layers < 1:
        raise ValueError("text encoder has no layers")
    return dict(vocab_size=vocab, hidden_size=width, intermediate_size=inner, num_hidden_layers=layers,
                num_attention_heads=max(1, width // 64), max_position_embeddings=pos.shape[0],
                hidden_act=act, projection_dim=width, bos_token_id=min(49406, vocab - 1),
                eos_token_id=min(49407, vocab - 1), pad_token_id=1)


def text_config() -> TextConfig:
    # the text_encoder/ folder written beside the model (see save.py)
    return TextConfig(kind="clip", path="text_encoder", max_length=77, layer=-1, final_norm=True)

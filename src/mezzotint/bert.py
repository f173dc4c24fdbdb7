"""A BERT encoder and its WordPiece tokenizer without transformers at run time.

Importing transformers' BertModel took about 3 s of a 5 s `mezzotint generate` with the
built-in model (0.6 s of sampling). This module reads the same folder (config.json,
model.safetensors, tokenizer.json) with plain torch and the `tokenizers` library, under
transformers' names, so hidden states and token ids are the reference's (tests/test_bert.py
compares them with transformers). Folders it does not cover (other position embeddings,
weights only in .bin, no tokenizer.json) go to transformers (text.py).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import FastTokenizer, special_tokens


def supports(path: Path) -> bool:
    """Whether `path` is a BERT folder this module reads (else text.py uses transformers)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (cfg.get("model_type") == "bert" and cfg.get("position_embedding_type", "absolute") == "absolute"
            and cfg.get("hidden_act", "gelu") == "gelu" and (path / "model.safetensors").is_file()
            and (path / "tokenizer.json").is_file())


# The encoders are built on the meta device and their weights assigned from the file: no
# initialisation (meta-device init runs Python decompositions that import torch._dynamo, 1.3 s;
# on the CPU, CLIP ViT-L's init took 2 s) and no second copy of the weights.
class Linear(nn.Linear):
    def reset_parameters(self):
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self):
        pass


class LayerNorm(nn.LayerNorm):
    def reset_parameters(self):
        pass


class Output(SimpleNamespace):
    """What TextEncoder reads of a transformers model's output."""
    last_hidden_state: torch.Tensor
    hidden_states: tuple | None


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        # one sentence: token type 0 everywhere, as transformers does without token_type_ids
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(pos)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query, self.key, self.value = (Linear(c.hidden_size, c.hidden_size) for _ in range(3))

    def forward(self, x, mask):
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(D // self.heads))
        return out.transpose(1, 2).reshape(B, L, D)


class DenseNorm(nn.Module):
    """Projection, residual, LayerNorm: BERT's post-norm sublayer output."""

    def __init__(self, c, width):
        super().__init__()
        self.dense = Linear(width, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c, c.hidden_size)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c.intermediate_size)

    def forward(self, x, mask):
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class BertModel(nn.Module):
    """transformers' BertModel without the pooler, in inference: the same parameter names."""

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False) -> Output:
        x = self.embeddings(input_ids)
        mask = None  # no padding: no mask, as transformers skips it
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # keys only: padded rows still get values
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, mask)
            states.append(x)
        return Output(last_hidden_state=x, hidden_states=tuple(states) if output_hidden_states else None)

    def save_pretrained(self, folder):
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(vars(self.config), indent=2))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def load_model(path: Path, dtype=torch.float32) -> BertModel:
    from safetensors.torch import load_file
    defaults = dict(type_vocab_size=2, layer_norm_eps=1e-12, position_embedding_type="absolute")
    config = SimpleNamespace(**{**defaults, **json.loads((path / "config.json").read_text())})
    with torch.device("meta"):
        model = BertModel(config)
    state = load_file(path / "model.safetensors")
    # a BertFor* checkpoint nests the encoder under "bert."; heads, pooler and buffers are not ours
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    wanted = model.state_dict().keys()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(f"{path / 'model.safetensors'}: not a BERT encoder, missing {missing[:3]}")
    model.load_state_dict({k: state[k] for k in wanted}, assign=True)
    return model.to(dtype).eval().requires_grad_(False)


class WordPieceTokenizer(FastTokenizer):
    """BERT's tokenizer from the folder's tokenizer.json."""
    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

    def __init__(self, path: Path):
        from tokenizers import Tokenizer
        self.path = Path(path)
        super().__init__(Tokenizer.from_file(str(self.path / "tokenizer.json")))
        conf = special_tokens(self.path)
        self.cls_token_id = self._tok.token_to_id(conf.get("cls_token", "[CLS]"))
        self.sep_token_id = self._tok.token_to_id(conf.get("sep_token", "[SEP]"))
        self.pad_token_id = self._tok.token_to_id(conf.get("pad_token", "[PAD]"))
        if self.cls_token_id is None or self.sep_token_id is None:
            raise ValueError(f"{self.path / 'tokenizer.json'}: no [CLS] / [SEP] token")

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            if (self.path / name).is_file() and not (folder / name).exists():
                shutil.copyfile(self.path / name, folder / name)
